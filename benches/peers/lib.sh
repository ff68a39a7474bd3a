# Sourced by each peer's start.sh: `port_arg` reads the port and `require_installed` checks
# that the peer's install step has run. Nothing else lives here.

# Reads the port (first argument, else $PORT) into `port`, or exits 2 with the usage line.
port_arg() {
    port="${1:-${PORT:-}}"
    if ! [[ "$port" =~ ^[0-9]+$ ]]; then
        echo "usage: $0 PORT" >&2
        exit 2
    fi
}

# require_installed PEER PATH: exits 1, saying how to install PEER, unless PATH exists.
require_installed() {
    if [[ ! -e "$2" ]]; then
        echo "$1 is not installed (no $2): run benches/peers/install.sh $1" >&2
        exit 1
    fi
}
