#!/usr/bin/env bash
# Starts the reference relay (refrelay.c, single-threaded epoll in C) on 127.0.0.1:PORT in
# the foreground (exec: this process becomes the server), building it first with gcc if the
# binary is missing or older than the source. It prints one "listening" line when ready.
# Usage: start.sh PORT (or PORT in the environment).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=../lib.sh
source "$here/../lib.sh"
port_arg "$@"
"$here/build.sh"
exec "$here/bin/refrelay" "$port"
