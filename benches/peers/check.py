#!/usr/bin/env python3
"""Checks that every peer (and shardcast itself) has the semantics of the comparison.

For each server named (default: all), it starts `benches/peers/NAME/start.sh PORT` on a
free loopback port, runs the checks below, stops the server and prints a table:

  path      two subscribers of /ws/t: A's text message reaches A (the sender) and B
  query     subscribers of /?topic=t and /ws?topic=t receive it too
  binary    B's binary message arrives as binary at A and B (opcode preserved)
  query-pub a /?topic=t (or /ws?topic=t) subscriber's message reaches A
  http-text POST /publish/t with text/plain: 2xx, a text frame at A and B
  http-bin  POST /publish/t with application/octet-stream: 2xx, a binary frame
  http-form POST /publish/t with application/x-www-form-urlencoded: a binary frame, as
            shardcast makes (a difference, not a failure, if a peer makes text)
  isolation a subscriber of /ws/u received none of the above
  ping      a client ping is answered with a pong
  srv-ping  the server pings an idle client within 30 s
  slow-drop a subscriber that stops reading is disconnected well before 16 MiB reach it,
            while a reading subscriber of the same topic gets every message

Run it with the venv's Python (it uses the `websockets` client):

    benches/peers/python/.venv/bin/python benches/peers/check.py [NAME ...]

NAME is one of shardcast, refrelay, bun, node-ws, nchan, gorilla, python. shardcast needs
`cargo build --release` first, the peers `benches/peers/install.sh`. Every wait is
bounded; a server's stderr goes to a log file named in the output.
"""
import argparse
import asyncio
import base64
import json
import os
import signal
import socket
import struct
import sys
import tempfile
import time
import urllib.error
import urllib.request

try:
    from websockets.asyncio.client import connect
except ImportError:
    sys.exit("needs the websockets client: run with benches/peers/python/.venv/bin/python")

HERE = os.path.dirname(os.path.abspath(__file__))
ALL = ["shardcast", "refrelay", "bun", "node-ws", "nchan", "gorilla", "python"]
COLUMNS = ["path", "query", "binary", "query-pub", "http-text", "http-bin", "http-form",
           "isolation", "ping", "srv-ping", "slow-drop"]
RECV_TIMEOUT = 3.0
SLOW_MESSAGE = 60_000          # bytes per message in the slow-consumer check
SLOW_TOTAL = 16 * 1024 * 1024  # bytes published at the stalled subscriber


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- a minimal raw WebSocket client, for what the websockets client hides --------------

def raw_connect(port, path, rcvbuf=None, timeout=5.0):
    """Opens a WebSocket with a plain socket; returns (socket, bytes read past the head)."""
    s = socket.socket()
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(timeout)
    s.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
               f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
               f"Sec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(4096)
        if not chunk:
            raise ConnectionError("closed during the handshake")
        head += chunk
    head, _, rest = head.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101"):
        raise ConnectionError(f"handshake refused: {head.splitlines()[0]!r}")
    return s, rest


def parse_frames(buf):
    """Splits complete server frames off buf: returns ([(opcode, payload)], rest)."""
    frames = []
    while len(buf) >= 2:
        opcode, n = buf[0] & 0x0F, buf[1] & 0x7F
        at = 2
        if n == 126:
            if len(buf) < 4:
                break
            n, at = struct.unpack(">H", buf[2:4])[0], 4
        elif n == 127:
            if len(buf) < 10:
                break
            n, at = struct.unpack(">Q", buf[2:10])[0], 10
        if len(buf) < at + n:
            break
        frames.append((opcode, buf[at:at + n]))
        buf = buf[at + n:]
    return frames, buf


def wait_for_ping(port, limit):
    """Seconds until the server pings a silent client, or None within limit."""
    start = time.monotonic()
    s, buf = raw_connect(port, "/ws/pingcheck")
    try:
        while time.monotonic() - start < limit:
            s.settimeout(max(0.1, limit - (time.monotonic() - start)))
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                return None
            frames, buf = parse_frames(buf + chunk)
            if any(op == 0x9 for op, _ in frames):
                return time.monotonic() - start
        return None
    finally:
        s.close()


def drain_stalled(s, buf, idle):
    """Reads a stalled subscriber until it is closed or quiet for `idle` seconds.

    Returns (data bytes received, how it ended)."""
    received = 0
    s.settimeout(idle)
    while True:
        frames, buf = parse_frames(buf)
        for op, payload in frames:
            if op in (0x1, 0x2):
                received += len(payload)
            elif op == 0x8:
                code = struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else None
                return received, f"close {code}"
        try:
            chunk = s.recv(1 << 20)
        except socket.timeout:
            return received, "still open"
        except ConnectionResetError:
            return received, "reset"
        if not chunk:
            return received, "EOF"
        buf += chunk


# ---- HTTP publish ------------------------------------------------------------------------

def post(port, topic, body, content_type):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/publish/{topic}", data=body,
                                 method="POST", headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            resp.read()
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code


# ---- the checks --------------------------------------------------------------------------

async def recv_data(ws, timeout=RECV_TIMEOUT):
    return await asyncio.wait_for(ws.recv(), timeout)


async def expect(ws, want, what):
    """Raises with a description unless ws's next message equals want (type included)."""
    try:
        got = await recv_data(ws)
    except asyncio.TimeoutError:
        raise AssertionError(f"{what}: nothing within {RECV_TIMEOUT:.0f} s")
    except Exception as e:  # closed
        raise AssertionError(f"{what}: {type(e).__name__} {e}")
    if type(got) is not type(want) or got != want:
        raise AssertionError(f"{what}: got {type(got).__name__} {got!r:.60}")


async def ws_open(port, path):
    return await connect(f"ws://127.0.0.1:{port}{path}", compression=None, max_size=None,
                         open_timeout=5, ping_interval=None, close_timeout=1)


async def run_checks(name, port, res, notes, stall):
    def ok(col, note=None):
        res[col] = "PASS"
        if note:
            notes.append(f"{col}: {note}")

    def bad(col, note, verdict="FAIL"):
        res[col] = verdict
        notes.append(f"{col}: {note}")

    ping_task = asyncio.create_task(asyncio.to_thread(wait_for_ping, port, 30.0))

    a = await ws_open(port, "/ws/t")
    b = await ws_open(port, "/ws/t")
    u = await ws_open(port, "/ws/u")
    queries = {}
    for path in ("/?topic=t", "/ws?topic=t"):
        try:
            queries[path] = await ws_open(port, path)
        except Exception as e:
            notes.append(f"query: {path} refused ({type(e).__name__}: {e})")
    await asyncio.sleep(0.3)  # let every subscription settle (nchan subscribes asynchronously)

    # path, and query receiving
    try:
        await a.send("hello-path")
        await expect(a, "hello-path", "sender A")
        await expect(b, "hello-path", "subscriber B")
        ok("path")
    except AssertionError as e:
        bad("path", str(e))
    got_query = []
    for path, q in queries.items():
        try:
            await expect(q, "hello-path", path)
            got_query.append(path)
        except AssertionError as e:
            notes.append(f"query: {e}")
    if got_query:
        ok("query", None if len(got_query) == 2 else f"only {', '.join(got_query)} works")
    else:
        bad("query", "no query form subscribes")

    # binary opcode
    try:
        await b.send(b"\x00\x01binary")
        await expect(a, b"\x00\x01binary", "A")
        await expect(b, b"\x00\x01binary", "sender B")
        for path in got_query:
            await expect(queries[path], b"\x00\x01binary", path)
        ok("binary")
    except AssertionError as e:
        bad("binary", str(e))

    # HTTP publish
    for col, body, ctype, want in (
        ("http-text", b"post-text", "text/plain", "post-text"),
        ("http-bin", b"\x01\x02post-binary", "application/octet-stream", b"\x01\x02post-binary"),
    ):
        try:
            status = await asyncio.to_thread(post, port, "t", body, ctype)
            if not 200 <= status < 300:
                raise AssertionError(f"status {status}")
            await expect(a, want, "A")
            await expect(b, want, "B")
            ok(col, f"status {status}")
        except AssertionError as e:
            bad(col, str(e))
    try:
        status = await asyncio.to_thread(post, port, "t", b"form=1",
                                         "application/x-www-form-urlencoded")
        got = await recv_data(a)
        await recv_data(b)
        if isinstance(got, bytes):
            ok("http-form", f"status {status}")
        else:
            bad("http-form", f"status {status}, arrives as a text frame", "text")
    except Exception as e:
        bad("http-form", f"{type(e).__name__} {e}")

    # query-form publishing (shardcast: receive-only by design)
    qpub = None
    for path in got_query:
        try:
            await queries[path].send("from-query")
            await expect(a, "from-query", f"A, from {path}")
            qpub = path
            break
        except AssertionError as e:
            notes.append(f"query-pub: {e}")
    if qpub:
        ok("query-pub", None if qpub == "/?topic=t" else f"via {qpub}")
    else:
        bad("query-pub", "query-form connections do not publish", "no")

    # client ping
    try:
        waiter = await a.ping(b"check")
        await asyncio.wait_for(waiter, RECV_TIMEOUT)
        ok("ping")
    except Exception as e:
        bad("ping", f"{type(e).__name__} {e}")

    # isolation: the other topic saw nothing at all
    try:
        got = await recv_data(u, 0.5)
        bad("isolation", f"/ws/u received {got!r:.40}")
    except asyncio.TimeoutError:
        ok("isolation")
    except Exception as e:
        bad("isolation", f"/ws/u closed: {type(e).__name__}")

    for ws in (a, b, u, *queries.values()):
        await ws.close()

    if res.get("slow-drop") != "skip":
        await slow_drop(port, ok, bad, stall)

    try:
        after = await asyncio.wait_for(ping_task, 40)
    except Exception as e:
        after = None
        notes.append(f"srv-ping: {type(e).__name__} {e}")
    if after is None:
        bad("srv-ping", "no ping within 30 s", "no")
    else:
        ok("srv-ping", f"first ping after {after:.1f} s")


async def slow_drop(port, ok, bad, stall):
    """A stalled subscriber must be dropped; a reading one must get everything.

    The stalled subscriber stays unread for `stall` more seconds after the last message."""
    stalled, rest = await asyncio.to_thread(raw_connect, port, "/ws/slow", 4096)
    fast = await ws_open(port, "/ws/slow")
    await asyncio.sleep(0.3)
    payload = os.urandom(SLOW_MESSAGE)
    count = SLOW_TOTAL // SLOW_MESSAGE
    sent = 0
    try:
        for i in range(count):
            # The publisher is itself a reading subscriber: it sends one message and waits
            # for it to come back, so it never has a backlog of its own.
            await fast.send(payload)
            await expect(fast, payload, f"reading subscriber, message {i}")
            sent += 1
        fast_ok = True
    except AssertionError as e:
        fast_ok = False
        fast_err = str(e)
    await fast.close()
    await asyncio.sleep(stall)
    total = sent * SLOW_MESSAGE
    received, end = await asyncio.to_thread(drain_stalled, stalled, rest, 3.0)
    stalled.close()
    mib = 1024 * 1024
    summary = (f"stalled subscriber got {received / mib:.1f} of {total / mib:.1f} MiB, "
               f"then {end}")
    if not fast_ok:
        bad("slow-drop", f"the reading subscriber failed after {sent} messages: {fast_err}; "
            + summary)
    elif end == "still open" or received >= total:
        bad("slow-drop", "not dropped: " + summary, "no")
    else:
        ok("slow-drop", summary)


async def check(name, args):
    res = {c: "-" for c in COLUMNS}
    notes = []
    if args.skip_slow:
        res["slow-drop"] = "skip"
    port = free_port()
    log = tempfile.NamedTemporaryFile(prefix=f"check-{name}-", suffix=".log", delete=False)
    proc = await asyncio.create_subprocess_exec(
        os.path.join(HERE, name, "start.sh"), str(port),
        stdout=asyncio.subprocess.PIPE, stderr=log, start_new_session=True)
    try:
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
        except asyncio.TimeoutError:
            line = b""
        if b"listening" not in line:
            notes.append(f"did not start (stderr in {log.name})")
            return res, notes
        notes.append(line.decode().strip())
        drain = asyncio.create_task(proc.stdout.read())
        try:
            await asyncio.wait_for(run_checks(name, port, res, notes, args.stall), 180)
        except Exception as e:
            notes.append(f"aborted: {type(e).__name__} {e}")
        drain.cancel()
    finally:
        # start.sh runs in its own session; its process group is the server (nginx: the
        # master and its workers).
        for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                await asyncio.wait_for(proc.wait(), grace)
                break
            except asyncio.TimeoutError:
                continue
        notes.append(f"server stderr: {log.name}")
    return res, notes


async def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", default=ALL, metavar="NAME")
    ap.add_argument("--skip-slow", action="store_true", help="skip the slow-consumer check")
    ap.add_argument("--stall", type=float, default=1.0, metavar="SECONDS",
                    help="how long the stalled subscriber stays unread after the last "
                         "message (default 1; nchan only drops after send_timeout, 10 s)")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = ap.parse_args()
    for n in args.names:
        if n not in ALL:
            sys.exit(f"unknown server {n!r}; choose from {', '.join(ALL)}")
    results = {}
    for name in args.names:
        print(f"== {name}", flush=True)
        res, notes = await check(name, args)
        results[name] = {"results": res, "notes": notes}
        for n in notes:
            print(f"   {n}", flush=True)
    print()
    print("| server | " + " | ".join(COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 1) + "|")
    for name, r in results.items():
        print(f"| {name} | " + " | ".join(r["results"][c] for c in COLUMNS) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    asyncio.run(main())
