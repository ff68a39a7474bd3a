#!/usr/bin/env python3
"""Server RSS per idle WebSocket connection, read from /proc.

Opens N raw WebSocket connections (handshake only, then silence) to a running shardcast and
reports (RSS after - RSS before) / N. Kernel socket memory is not in RSS and not counted.
Start the server with long heartbeats so the silent clients are not closed meanwhile:

    cargo build --release
    ./target/release/shardcast --listen 127.0.0.1:9100 --ping-interval 10m --pong-timeout 10m &
    python3 benches/idle_rss.py --connections 15000 --port 9100 --pid $!

Connections are spread over source addresses 127.0.0.2 and up, 5000 per address, and bind
with IP_BIND_ADDRESS_NO_PORT so the kernel picks each source port at connect time (ports held
in TIME_WAIT by an earlier run then do not make `bind` fail). This
client holds N sockets itself, so N must stay under its open-file limit. The `shardcast
bench idle` load generator is the full instrument; this script is the quick check.
"""
import argparse
import socket
import time

IP_BIND_ADDRESS_NO_PORT = 24  # linux/in.h; not exported by Python's socket module
PER_ADDRESS = 5000

REQUEST = (
    b"GET /ws/idle HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise SystemExit(f"no VmRSS for pid {pid}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--connections", type=int, default=15000)
    ap.add_argument("--port", type=int, default=9100)
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--batch", type=int, default=1000, help="handshakes in flight at once")
    ap.add_argument("--settle", type=float, default=2.0, help="seconds to wait before reading RSS")
    args = ap.parse_args()

    before = rss_kib(args.pid)
    socks = []
    for start in range(0, args.connections, args.batch):
        batch = []
        for i in range(start, min(start + args.batch, args.connections)):
            s = socket.socket()
            s.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            s.bind((f"127.0.0.{2 + i // PER_ADDRESS}", 0))
            s.connect(("127.0.0.1", args.port))
            s.sendall(REQUEST)
            batch.append(s)
        for s in batch:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = s.recv(4096)
                if not chunk:
                    raise SystemExit("server closed a connection during the handshake")
                head += chunk
            if not head.startswith(b"HTTP/1.1 101"):
                raise SystemExit(f"handshake refused: {head[:60]!r}")
        socks.extend(batch)
    time.sleep(args.settle)  # let the allocator return freed handshake buffers
    after = rss_kib(args.pid)
    per = (after - before) * 1024 / args.connections
    print(f"connections={args.connections} rss_before_kib={before} rss_after_kib={after} "
          f"per_connection_bytes={per:.0f}")


if __name__ == "__main__":
    main()
