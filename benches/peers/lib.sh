# Sourced by each peer's start.sh: reads the port (first argument, else $PORT) into `port`,
# or exits 2 with the usage line. Nothing else lives here.
port_arg() {
    port="${1:-${PORT:-}}"
    if ! [[ "$port" =~ ^[0-9]+$ ]]; then
        echo "usage: $0 PORT" >&2
        exit 2
    fi
}
