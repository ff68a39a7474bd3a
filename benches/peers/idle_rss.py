#!/usr/bin/env python3
"""Server memory per idle WebSocket connection, for shardcast and the peers, from /proc.

Opens N WebSocket connections to /ws/idle (handshake, then silence except for answering
the server's pings) and reports (memory after - memory before) / N, summed over every
process of the server, so multi-process servers (nginx: master and workers) count whole:

    # start a peer itself (in its own process group) and stop it afterwards:
    benches/peers/idle_rss.py --start nchan --connections 5000
    # or measure a server already running: several pids, their descendants, or a group:
    benches/peers/idle_rss.py --port 9100 --pid 1234 --children
    benches/peers/idle_rss.py --port 9100 --pgid 1234

VmRSS is summed as asked; Pss (from smaps_rollup) is printed too, because RSS counts a
shared page once per process that touched it (nchan's shared memory zone, in every
worker). Kernel socket memory is in neither. Connections are spread over source addresses
127.0.0.2 and up, 5000 per address, bound with IP_BIND_ADDRESS_NO_PORT; this process holds
N sockets, so N must stay under its open-file limit. Uses only the standard library.

With `--tls CAFILE` the connections are `wss://` (the server's certificate must name
localhost and be signed by CAFILE); descriptors of the server are reported too, because a
TLS connection's cost there is the point (a TLS pump holds three per connection).
"""
import argparse
import base64
import json
import os
import selectors
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
IP_BIND_ADDRESS_NO_PORT = 24  # linux/in.h; not exported by Python's socket module
PER_ADDRESS = 5000


def proc_stat(pid):
    """(ppid, pgrp) of pid, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return int(fields[1]), int(fields[2])


def all_pids():
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def server_pids(args):
    """Every pid that makes up the server right now."""
    if args.pgid is not None:
        return sorted(p for p in all_pids() if (proc_stat(p) or (0, -1))[1] == args.pgid)
    pids = set(args.pid)
    if args.children:
        parents = {p: (proc_stat(p) or (0, 0))[0] for p in all_pids()}
        grew = True
        while grew:
            grew = False
            for p, pp in parents.items():
                if pp in pids and p not in pids:
                    pids.add(p)
                    grew = True
    return sorted(p for p in pids if proc_stat(p) is not None)


def descriptors(pids):
    n = 0
    for pid in pids:
        try:
            n += len(os.listdir(f"/proc/{pid}/fd"))
        except FileNotFoundError:
            pass
    return n


def memory_kib(pids):
    """(VmRSS sum, Pss sum) in KiB over pids."""
    rss = pss = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss += int(line.split()[1])
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        pss += int(line.split()[1])
        except FileNotFoundError:
            pass
    return rss, pss


def handshake_request(port, path):
    key = base64.b64encode(os.urandom(16)).decode()
    return (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: 13\r\n\r\n").encode()


def open_connections(port, path, n, batch, tls=None):
    socks = []
    for start in range(0, n, batch):
        pending = []
        for i in range(start, min(start + batch, n)):
            s = socket.socket()
            s.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            s.bind((f"127.0.0.{2 + i // PER_ADDRESS}", 0))
            s.settimeout(10)
            s.connect(("127.0.0.1", port))
            if tls is not None:
                s = tls.wrap_socket(s, server_hostname="localhost")
            s.sendall(handshake_request(port, path))
            pending.append(s)
        for s in pending:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = s.recv(4096)
                if not chunk:
                    raise SystemExit(f"server closed connection {len(socks)} in the handshake")
                head += chunk
            if not head.startswith(b"HTTP/1.1 101"):
                raise SystemExit(f"handshake refused: {head.splitlines()[0]!r}")
            s.setblocking(False)
            socks.append(s)
    return socks


def pong(payload):
    """A masked pong frame (payload under 126 bytes, as pings are)."""
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x8A, 0x80 | len(payload)]) + mask + body


def idle(socks, seconds):
    """Waits, answering pings; returns how many connections the server closed meanwhile."""
    sel = selectors.DefaultSelector()
    for s in socks:
        sel.register(s, selectors.EVENT_READ, bytearray())
    closed = 0
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        for key, _ in sel.select(timeout=left):
            s, buf = key.fileobj, key.data
            try:
                chunk = s.recv(65536)
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                continue
            except OSError:
                chunk = b""
            if not chunk:
                sel.unregister(s)
                closed += 1
                continue
            buf += chunk
            while len(buf) >= 2 and (buf[1] & 0x7F) < 126 and len(buf) >= 2 + (buf[1] & 0x7F):
                op, n = buf[0] & 0x0F, buf[1] & 0x7F
                if op == 0x9:
                    s.send(pong(bytes(buf[2:2 + n])))
                del buf[:2 + n]
    sel.close()
    return closed


def start_peer(name, port):
    proc = subprocess.Popen([os.path.join(HERE, name, "start.sh"), str(port)],
                            stdout=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 30
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    line = b""
    while b"\n" not in line and time.monotonic() < deadline:
        if sel.select(timeout=deadline - time.monotonic()):
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                break
            line += chunk
    sel.close()
    if b"listening" not in line:
        stop_peer(proc)
        raise SystemExit(f"{name} did not start on port {port}")
    print(line.decode().strip(), file=sys.stderr)
    return proc


def stop_peer(proc):
    for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(grace)
            return
        except subprocess.TimeoutExpired:
            continue


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--connections", type=int, default=5000)
    ap.add_argument("--port", type=int, help="the server's port (with --start: default free)")
    ap.add_argument("--path", default="/ws/idle")
    who = ap.add_mutually_exclusive_group(required=True)
    who.add_argument("--start", metavar="NAME",
                     help="start benches/peers/NAME/start.sh and measure its process group")
    who.add_argument("--pid", type=int, action="append", default=[],
                     help="a server process (repeatable)")
    who.add_argument("--pgid", type=int, help="every process of this process group")
    ap.add_argument("--children", action="store_true", help="add the --pid's descendants")
    ap.add_argument("--batch", type=int, default=100, help="handshakes in flight at once")
    ap.add_argument("--settle", type=float, default=3.0,
                    help="seconds to wait (answering pings) before each reading")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--tls", metavar="CAFILE", help="connect with TLS, trusting CAFILE")
    args = ap.parse_args()

    proc = None
    if args.start:
        if args.port is None:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                args.port = s.getsockname()[1]
        proc = start_peer(args.start, args.port)
        args.pgid = proc.pid  # start.sh was started as a session leader
    elif args.port is None:
        ap.error("--port is required unless --start is given")
    try:
        time.sleep(args.settle)
        pids = server_pids(args)
        if not pids:
            raise SystemExit("no server process found")
        rss0, pss0 = memory_kib(pids)
        fds0 = descriptors(pids)
        tls = None
        if args.tls:
            tls = ssl.create_default_context(cafile=args.tls)
        t0 = time.monotonic()
        socks = open_connections(args.port, args.path, args.connections, args.batch, tls)
        opened = time.monotonic() - t0
        closed = idle(socks, args.settle)
        pids = server_pids(args)
        rss1, pss1 = memory_kib(pids)
        fds1 = descriptors(pids)
        for s in socks:
            s.close()
    finally:
        if proc is not None:
            stop_peer(proc)
    n = args.connections
    result = {
        "server": args.start or "pids",
        "processes": len(pids),
        "connections": n,
        "closed_by_server": closed,
        "open_seconds": round(opened, 2),
        "rss_before_kib": rss0,
        "rss_after_kib": rss1,
        "rss_per_connection_bytes": round((rss1 - rss0) * 1024 / n),
        "pss_before_kib": pss0,
        "pss_after_kib": pss1,
        "pss_per_connection_bytes": round((pss1 - pss0) * 1024 / n),
        "tls": bool(args.tls),
        "descriptors_per_connection": round((fds1 - fds0) / n, 2),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(" ".join(f"{k}={v}" for k, v in result.items()))
    if closed:
        print(f"warning: the server closed {closed} of the idle connections", file=sys.stderr)


if __name__ == "__main__":
    main()
