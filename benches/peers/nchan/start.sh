#!/usr/bin/env bash
# Starts the nginx + nchan peer on 127.0.0.1:PORT in the foreground (this process becomes
# the nginx master; SIGTERM or SIGINT stops it and its workers) and prints one "listening"
# line once the port accepts connections. Usage: start.sh PORT (or PORT in the
# environment). NCHAN_WORKERS sets worker_processes (default: auto, one per core).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=../lib.sh
source "$here/../lib.sh"
port_arg "$@"
workers="${NCHAN_WORKERS:-auto}"
nginx_bin="${NGINX:-/usr/sbin/nginx}"
if [[ ! -x "$nginx_bin" || ! -e /usr/lib/nginx/modules/ngx_nchan_module.so ]]; then
    echo "nginx or the nchan module is missing: run benches/peers/install.sh nchan" >&2
    exit 1
fi

# One runtime directory per port, reused between runs: config, pid file, temp paths.
rundir="${TMPDIR:-/tmp}/shardcast-peer-nchan-$port"
mkdir -p "$rundir"
sed -e "s|@PORT@|$port|g" -e "s|@WORKERS@|$workers|g" -e "s|@RUNDIR@|$rundir|g" \
    "$here/nginx.conf.in" > "$rundir/nginx.conf"

# nginx prints nothing when ready, so a helper waits (at most 20 s) for the port and prints
# the line. It is started detached (a background job of a subshell that exits at once), so
# it does not become a child of nginx, and it exits on its own.
announce() {
    for _ in $(seq 200); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "nchan peer listening on ws://127.0.0.1:$port ($("$nginx_bin" -v 2>&1 | sed 's/.*: //'), workers $workers)"
            return 0
        fi
        sleep 0.1
    done
    echo "nchan peer: port $port did not open within 20 s" >&2
}
( announce & )

exec "$nginx_bin" -p "$rundir" -e stderr -c "$rundir/nginx.conf"
