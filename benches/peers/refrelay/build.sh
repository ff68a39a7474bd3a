#!/usr/bin/env bash
# Builds the reference relay, bin/refrelay, from refrelay.c with gcc -O2 when the binary is
# missing or older than the source; otherwise does nothing. Used by start.sh and install.sh.
# Messages go to stderr (a runner reads start.sh's stdout for the "listening" line).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
src="$here/refrelay.c"
bin="$here/bin/refrelay"
if [[ -x "$bin" && ! "$src" -nt "$bin" ]]; then
    exit 0
fi
if ! command -v gcc > /dev/null; then
    echo "refrelay needs gcc: run benches/peers/install.sh refrelay" >&2
    exit 1
fi
mkdir -p "$here/bin"
# Build beside the target and rename, so two starts at once never run a half-written binary.
tmp="$(mktemp "$here/bin/.refrelay.XXXXXX")"
trap 'rm -f "$tmp"' EXIT
gcc -O2 -Wall -Wextra -o "$tmp" "$src" >&2
mv -f "$tmp" "$bin"
echo "built $bin" >&2
