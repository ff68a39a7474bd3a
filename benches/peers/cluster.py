#!/usr/bin/env python3
"""Cross-node fan-out: one shardcast node alone, then three nodes joined by a broker, side by side.

Setups, alternated in each round:
- `single`: one standalone node; the publisher and every subscriber on it.
- `redis`, `redis-cluster`, `nats`: the broker (started here on free loopback ports; a
  3-primary Redis Cluster for `redis-cluster`) and three nodes with `--bus`. The publisher is
  on node A; the subscribers go round robin over A, B and C (repeated `--url`), so a third of
  them are on the publisher's node and two thirds get each message through the broker.

Each run is one `shardcast bench fanout ... --json`, with every node's pid as a `--server-pid`
(their CPU is summed). The broker's CPU is read from /proc here. The bench splits deliveries
and latency by URL, so the latency the bus adds is the B and C figures against A's, measured
in the same run. Brokers and nodes are stopped after each run.

Usage: benches/peers/cluster.py [--rounds N] [--setups single,redis,...] [--subscribers N]
                                [--rate R] [--duration D] [--out FILE]
Needs target/release/shardcast (cargo build --release), redis-server, redis-cli and
nats-server (Debian: redis-server nats-server). Writes FILE (default
benches/peers/results/cluster.json) and prints a table.
"""
import argparse
import datetime
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
SETUPS = ["single", "redis", "redis-cluster", "nats"]
CLK = os.sysconf("SC_CLK_TCK")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def need(name):
    path = shutil.which(name) or (f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}") else None)
    if not path:
        sys.exit(f"cluster.py: {name} not found; install it (Debian: apt-get install redis-server nats-server)")
    return path


def cpu_s(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK
    except OSError:
        return 0.0


def wait_until(what, ready, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if ready():
            return
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


def port_open(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def redis_ping(port, cmd=b"PING\r\n", want=b"PONG"):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(cmd)
            return want in s.recv(4096)
    except OSError:
        return False


class Procs:
    """Processes started for one run; stopped together."""

    def __init__(self):
        self.procs = []
        self.dir = tempfile.mkdtemp(prefix="shardcast-cluster-")

    def spawn(self, argv, env=None):
        p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env=env, cwd=self.dir)
        self.procs.append(p)
        return p

    def stop(self):
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def redis_server(procs, port, extra=()):
    argv = [need("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", procs.dir, *extra]
    return procs.spawn(argv)


def start_broker(procs, setup):
    """Starts the broker; returns (bus URL, broker pids)."""
    if setup == "redis":
        port = free_port()
        p = redis_server(procs, port)
        wait_until("redis", lambda: redis_ping(port))
        return f"redis://127.0.0.1:{port}", [p.pid]
    if setup == "redis-cluster":
        ports = [free_port() for _ in range(3)]
        pids = []
        for port in ports:
            p = redis_server(procs, port, ["--cluster-enabled", "yes", "--cluster-config-file",
                                           f"nodes-{port}.conf", "--cluster-port", str(free_port())])
            pids.append(p.pid)
        for port in ports:
            wait_until("a redis cluster node", lambda port=port: redis_ping(port))
        subprocess.run([need("redis-cli"), "--cluster", "create"] + [f"127.0.0.1:{p}" for p in ports]
                       + ["--cluster-replicas", "0", "--cluster-yes"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for port in ports:
            wait_until("cluster_state:ok", lambda port=port: redis_ping(
                port, b"CLUSTER INFO\r\n", b"cluster_state:ok"))
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in ports), pids
    if setup == "nats":
        port = free_port()
        p = procs.spawn([need("nats-server"), "-a", "127.0.0.1", "-p", str(port)])
        wait_until("nats", lambda: port_open(port))
        return f"nats://127.0.0.1:{port}", [p.pid]
    raise ValueError(setup)


def metrics(port):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            text = r.read().decode()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        if line.startswith("shardcast_bus_") and " " in line and "{" not in line:
            k, v = line.rsplit(" ", 1)
            out[k] = float(v)
    return out


def start_nodes(procs, binary, n, bus):
    ports = [free_port() for _ in range(n)]
    pids = []
    for port in ports:
        argv = [binary, "--listen", f"127.0.0.1:{port}", "--ping-interval", "10m", "--pong-timeout", "10m"]
        if bus:
            argv += ["--bus", bus]
        pids.append(procs.spawn(argv).pid)
    for port in ports:
        wait_until("a node to listen", lambda port=port: port_open(port))
        if bus:
            wait_until("a node's bus to connect",
                       lambda port=port: metrics(port).get("shardcast_bus_connected") == 1.0)
    return ports, pids


def run(args, setup, rnd, outdir):
    procs = Procs()
    rec = {"setup": setup, "round": rnd, "started": time.time()}
    try:
        bus, broker_pids = (None, []) if setup == "single" else start_broker(procs, setup)
        ports, pids = start_nodes(procs, args.bin, 1 if setup == "single" else 3, bus)
        rec["bus"] = bus
        jpath = os.path.join(outdir, f"{setup}.r{rnd}.json")
        cmd = [args.bin, "bench", "fanout", "--subscribers", str(args.subscribers), "--topics", "1",
               "--publishers", "1", "--size", "64", "--rate", args.rate, "--duration", args.duration,
               "--warmup", "1s", "--drain-timeout", "3s",
               "--publish-url", f"ws://127.0.0.1:{ports[0]}/ws/{{topic}}"]
        for port in ports:
            cmd += ["--url", f"ws://127.0.0.1:{port}/ws/{{topic}}"]
        for pid in pids:
            cmd += ["--server-pid", str(pid)]
        cmd += ["--json", jpath, "-q"]
        rec["command"] = " ".join(cmd)
        b0 = sum(cpu_s(p) for p in broker_pids)
        t0 = time.time()
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        rec["wall_s"] = round(time.time() - t0, 3)
        rec["broker_cpu_s"] = round(sum(cpu_s(p) for p in broker_pids) - b0, 3) if broker_pids else None
        rec["exit"] = r.returncode
        if r.returncode != 0:
            rec["stderr"] = r.stderr[-2000:]
        rec["bus_metrics"] = [metrics(p) for p in ports] if bus else []
        with open(jpath) as f:
            rec["bench"] = json.load(f)
    except Exception as e:  # noqa: BLE001 - recorded, and the next run goes on
        rec["error"] = str(e)
    finally:
        procs.stop()
    return rec


def row(rec):
    b = rec.get("bench")
    if not b:
        return f"| {rec['setup']} | failed: {rec.get('error') or rec.get('stderr', '')[:80]} |"
    f = b.get("fanout") or {}
    lat = b.get("latency_us") or {}
    deliv = b.get("deliveries") or 0
    srv = (b.get("server") or {}).get("cpu_s")
    by = b.get("by_url") or []
    local = by[0]["latency_us"] if by and by[0].get("latency_us") else None
    remote = [u["latency_us"] for u in by[1:] if u.get("latency_us")]
    rp50 = max((x["p50"] for x in remote), default=None)
    rp99 = max((x["p99"] for x in remote), default=None)
    per_m = lambda s: f"{s / deliv * 1e6:.3f}" if s is not None and deliv else "–"  # noqa: E731
    fmt = lambda v: f"{v:.0f}" if v is not None else "–"  # noqa: E731
    return (f"| {rec['setup']} | {b['deliveries_per_sec'] / 1e6:.2f}M | {f.get('lost', '?')} | "
            f"{fmt(lat.get('p50'))} / {fmt(lat.get('p99'))} | "
            f"{fmt(local['p50']) if local else fmt(lat.get('p50'))} / {fmt(local['p99']) if local else fmt(lat.get('p99'))} | "
            f"{fmt(rp50)} / {fmt(rp99)} | {per_m(srv)} | {per_m(rec.get('broker_cpu_s'))} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--setups", default=",".join(SETUPS))
    ap.add_argument("--subscribers", type=int, default=3000)
    ap.add_argument("--rate", default="500", help="messages per second, or max")
    ap.add_argument("--duration", default="10s")
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "shardcast"))
    ap.add_argument("--out", default=os.path.join(HERE, "results", "cluster.json"))
    args = ap.parse_args()
    if not os.access(args.bin, os.X_OK):
        sys.exit(f"cluster.py: no shardcast binary at {args.bin}: run cargo build --release")
    setups = [s for s in args.setups.split(",") if s]
    for s in setups:
        if s not in SETUPS:
            sys.exit(f"cluster.py: unknown setup {s!r}; known: {', '.join(SETUPS)}")
    rawdir = tempfile.mkdtemp(prefix="shardcast-cluster-raw-")
    records = []
    for rnd in range(args.rounds):
        order = setups if rnd % 2 == 0 else list(reversed(setups))
        for setup in order:
            print(f"round {rnd}: {setup}", file=sys.stderr, flush=True)
            records.append(run(args, setup, rnd, rawdir))
    out = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "settings": {"subscribers": args.subscribers, "rate": args.rate, "duration": args.duration,
                     "size": 64, "topics": 1, "publishers": 1},
        "runs": records,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print("| setup | deliveries/s | lost | latency µs p50 / p99, all | on node A | on B and C (worse) "
          "| node CPU s per M deliveries | broker CPU s per M |")
    print("|---|---|---|---|---|---|---|---|")
    for rec in records:
        print(row(rec))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
