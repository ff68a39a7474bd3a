#!/usr/bin/env bash
# Starts the Go gorilla/websocket hub peer on 127.0.0.1:PORT in the foreground (exec: this
# process becomes the server) and prints one "listening" line when ready. Usage: start.sh
# PORT (or PORT in the environment). Build first with benches/peers/install.sh gorilla.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=../lib.sh
source "$here/../lib.sh"
port_arg "$@"
require_installed gorilla "$here/bin/gorilla-peer"
exec "$here/bin/gorilla-peer" "$port"
