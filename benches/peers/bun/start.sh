#!/usr/bin/env bash
# Starts the Bun peer on 127.0.0.1:PORT in the foreground (exec: this process becomes bun)
# and prints one "listening" line when ready. Usage: start.sh PORT (or PORT in the
# environment). Install first with benches/peers/install.sh bun.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=../lib.sh
source "$here/../lib.sh"
port_arg "$@"
bun="$here/node_modules/.bin/bun"
require_installed bun "$bun"
# No telemetry or crash-report uploads from a benchmark run.
export DO_NOT_TRACK=1
exec "$bun" "$here/server.js" "$port"
