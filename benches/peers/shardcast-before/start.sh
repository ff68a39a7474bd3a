#!/usr/bin/env bash
# A second shardcast binary as one more peer, for an A/B inside a full comparison run
# (compare.py --servers shardcast,shardcast-before,...): starts $SHARDCAST_BEFORE_BIN (for
# example a release build of the commit before an engine change) exactly as
# ../shardcast/start.sh starts the checkout's. Usage: SHARDCAST_BEFORE_BIN=... start.sh PORT
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ -z "${SHARDCAST_BEFORE_BIN:-}" ]]; then
    echo "set SHARDCAST_BEFORE_BIN to the shardcast binary to compare against" >&2
    exit 2
fi
SHARDCAST_BIN="$SHARDCAST_BEFORE_BIN" exec "$here/../shardcast/start.sh" "$@"
