#!/usr/bin/env bash
# Starts shardcast itself on 127.0.0.1:PORT in the foreground (exec), with the same calling
# convention as the peers, so a runner can treat it as one more peer. Extra arguments go to
# shardcast (for example --ping-interval 10m). Usage: start.sh PORT [FLAGS...]. Uses
# target/release/shardcast of this checkout (cargo build --release), or $SHARDCAST_BIN.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
port="${1:-${PORT:-}}"
if ! [[ "$port" =~ ^[0-9]+$ ]]; then
    echo "usage: $0 PORT [FLAGS...]" >&2
    exit 2
fi
shift || true
bin="${SHARDCAST_BIN:-$here/../../../target/release/shardcast}"
if [[ ! -x "$bin" ]]; then
    echo "no shardcast binary at $bin: run cargo build --release" >&2
    exit 1
fi
# shardcast logs its "listening" line to stderr; like the nchan peer, a detached helper
# prints one on stdout once the port accepts connections (it gives up after 20 s).
announce() {
    for _ in $(seq 200); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "shardcast listening on ws://127.0.0.1:$port"
            return 0
        fi
        sleep 0.1
    done
    echo "shardcast: port $port did not open within 20 s" >&2
}
( announce & )
exec "$bin" --listen "127.0.0.1:$port" "$@"
