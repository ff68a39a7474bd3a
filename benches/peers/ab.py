#!/usr/bin/env python3
"""A/B two shardcast binaries on the same scenarios, alternating, pinned: every server run
gets CPU 0 (`--shards 1`), the generator (the second binary's `bench`) CPU 1. For engine
changes: run the binary before the change and the one after, several rounds, and quote the
medians (the machine is shared and noisy; alternating spreads the noise over both).

    benches/peers/ab.py BEFORE_BIN AFTER_BIN [--rounds 3] [--scenarios fanout-max,fanout-300,chat]

Prints one line per run and a table of medians; writes the raw JSON under --out (a temporary
directory by default). The scenarios are those of compare.py (docs/benchmarks.md)."""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

FANOUT = ["fanout", "--subscribers", "10000", "--topics", "1", "--publishers", "1",
          "--size", "64", "--duration", "5s", "--warmup", "1s", "--drain-timeout", "3s"]
SCENARIOS = {
    "fanout-max": FANOUT + ["--rate", "max"],
    "fanout-300": FANOUT + ["--rate", "300"],
    "fanout-100": FANOUT + ["--rate", "100"],
    "chat": ["chat", "--clients", "200", "--size", "20", "--duration", "10s", "--warmup", "1s",
             "--workers", "1"],
}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(binary, port):
    argv = ["taskset", "-c", "0", binary, "--listen", f"127.0.0.1:{port}", "--shards", "1",
            "--drain-delay", "0s", "--drain-timeout", "1s", "--ping-interval", "10m"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, RUST_LOG="warn"))
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"{binary} did not open port {port}")


def run(label, binary, bench, scenario, out, rnd):
    port = free_port()
    proc = serve(binary, port)
    path = os.path.join(out, f"{scenario}.{label}.r{rnd}.json")
    cmd = ["taskset", "-c", "1", bench, "bench"] + SCENARIOS[scenario] + [
        "--url", f"ws://127.0.0.1:{port}/ws/{{topic}}", "--server-pid", str(proc.pid),
        "--json", path, "-q"]
    try:
        subprocess.run(cmd, check=True, timeout=120, stdout=subprocess.DEVNULL)
    finally:
        proc.terminate()
        proc.wait(10)
    r = json.load(open(path))
    lat = r.get("latency_us") or {}
    server = r.get("server") or {}
    row = {
        "deliveries_per_sec": r["deliveries_per_sec"],
        "p50_ms": lat.get("p50", 0) / 1e3,
        "p99_ms": lat.get("p99", 0) / 1e3,
        "lost": (r.get("fanout") or {}).get("lost", 0),
        "cpu_s_per_m": server.get("cpu_s_per_million_deliveries"),
    }
    print(f"{scenario:<11} {label:<7} round {rnd}: {row['deliveries_per_sec'] / 1e6:6.2f}M/s "
          f"p50 {row['p50_ms']:7.1f} ms p99 {row['p99_ms']:7.1f} ms lost {row['lost']}"
          f" cpu/M {row['cpu_s_per_m']}", flush=True)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--scenarios", default="fanout-max,fanout-300,chat")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    out = a.out or tempfile.mkdtemp(prefix="ab-")
    os.makedirs(out, exist_ok=True)
    scenarios = a.scenarios.split(",")
    results = {}
    for rnd in range(a.rounds):
        # Alternate which binary goes first, round by round.
        order = [("before", a.before), ("after", a.after)]
        if rnd % 2:
            order.reverse()
        for scenario in scenarios:
            for label, binary in order:
                results.setdefault((scenario, label), []).append(
                    run(label, binary, a.after, scenario, out, rnd))
    print(f"\nmedians over {a.rounds} rounds (raw JSON in {out}):")
    for scenario in scenarios:
        for label in ("before", "after"):
            rows = results[(scenario, label)]
            med = lambda k: statistics.median(r[k] for r in rows)  # noqa: E731
            print(f"{scenario:<11} {label:<7} {med('deliveries_per_sec') / 1e6:6.2f}M/s "
                  f"p50 {med('p50_ms'):7.1f} ms p99 {med('p99_ms'):7.1f} ms "
                  f"lost {sum(r['lost'] for r in rows)}")


if __name__ == "__main__":
    sys.exit(main())
