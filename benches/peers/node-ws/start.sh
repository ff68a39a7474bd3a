#!/usr/bin/env bash
# Starts the Node.js `ws` peer on 127.0.0.1:PORT in the foreground (exec: this process
# becomes node) and prints one "listening" line when ready. Usage: start.sh PORT (or PORT
# in the environment). Install first with benches/peers/install.sh node-ws.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=../lib.sh
source "$here/../lib.sh"
port_arg "$@"
require_installed node-ws "$here/node_modules/ws"
exec node "$here/server.mjs" "$port"
