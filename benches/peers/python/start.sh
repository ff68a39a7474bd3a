#!/usr/bin/env bash
# Starts the Python `websockets` peer on 127.0.0.1:PORT in the foreground (exec: this
# process becomes python) and prints one "listening" line when ready. Usage: start.sh PORT
# (or PORT in the environment). Install first with benches/peers/install.sh python.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=../lib.sh
source "$here/../lib.sh"
port_arg "$@"
require_installed python "$here/.venv/bin/python"
exec "$here/.venv/bin/python" "$here/server.py" "$port"
