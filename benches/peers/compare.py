#!/usr/bin/env python3
"""Runs every scenario against shardcast and every peer in one run, alternating them.

For each scenario, for each round, for each server: start it in its own process group
(`setsid`), wait for its "listening" line, run `shardcast bench ... --server-pid PID... --json`
with every pid of the group, then stop it by signalling the process group. The server's CPU
time (utime + stime from /proc/PID/stat) and RSS (VmRSS) are also sampled here over the
group for the whole run, connection setup included; the bench's own figures cover the run
after the connections are open. `--pin 0:1` runs every server on CPU 0 and the generator on
CPU 1 (taskset).

Usage: benches/peers/compare.py [--rounds N] [--servers a,b] [--scenarios a,b] [--pin S:G] [--out DIR]
Writes DIR/results.json (default benches/peers/results/), then runs charts.py on it: the SVG
charts in docs/img/ and the generated section of docs/benchmarks.md (machine, versions,
commands, results table). `--no-doc` skips that step.
"""
import argparse
import datetime
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
SERVERS = ["shardcast", "refrelay", "bun", "node-ws", "nchan", "gorilla", "python"]
CLK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def scenarios(args):
    fan = ["fanout", "--subscribers", "10000", "--topics", "1", "--publishers", "1", "--size", "64",
           "--duration", args.fanout_duration, "--warmup", "1s", "--drain-timeout", "3s"]
    out = [("chat", ["chat", "--clients", "200", "--size", "20", "--duration", "10s", "--warmup", "1s",
                     "--workers", "1"])]
    for r in args.rates.split(","):
        out.append((f"fanout-{r}", fan + ["--rate", r]))
    out.append(("idle", ["idle", "--connections", "15000", "--duration", "6s", "--warmup", "0s"]))
    out.append(("connect", ["connect", "--concurrency", "64", "--duration", "5s", "--warmup", "1s"]))
    return out


def stat(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields
    except OSError:
        return None


def group_pids(pgid):
    pids = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            f = stat(int(p))
            if f and int(f[2]) == pgid:
                pids.append(int(p))
    return pids


def group_cpu(pgid):
    """utime + stime (seconds) summed over the live processes of the group."""
    total = 0
    for p in group_pids(pgid):
        f = stat(p)
        if f:
            total += int(f[11]) + int(f[12])
    return total / CLK


def group_rss(pgid):
    """VmRSS (bytes) summed over the group."""
    total = 0
    for p in group_pids(pgid):
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * PAGE
        except OSError:
            pass
    return total


def start(name, port, pin=None):
    script = os.path.join(HERE, name, "start.sh")
    env = dict(os.environ)
    argv = [script, str(port)]
    if pin:
        argv = ["taskset", "-c", pin] + argv
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            start_new_session=True, env=env, text=True)
    deadline = time.time() + 30
    ok = [False]

    def wait():
        for line in proc.stdout:
            if "listening" in line:
                ok[0] = True
                break
    t = threading.Thread(target=wait, daemon=True)
    t.start()
    t.join(max(0, deadline - time.time()))
    if not ok[0]:
        stop(proc)
        raise RuntimeError(f"{name} did not start")
    # keep draining stdout so the server never blocks on a full pipe
    threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
    return proc


def stop(proc):
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    # wait for the whole group (nginx workers) to be gone
    for _ in range(50):
        if not group_pids(proc.pid):
            break
        time.sleep(0.1)


def run_one(bench, name, scen, argv, port, outdir, rnd, timeout, pin=None):
    """`pin`: (server CPUs, generator CPUs) for taskset, or None."""
    rec = {"server": name, "scenario": scen, "round": rnd, "started": time.time()}
    if pin:
        rec["pin"] = {"server": pin[0], "generator": pin[1]}
    try:
        proc = start(name, port, pin[0] if pin else None)
    except Exception as e:  # noqa: BLE001
        rec["error"] = str(e)
        return rec
    time.sleep(0.3)
    url = f"ws://127.0.0.1:{port}/ws/{{topic}}"
    jpath = os.path.join(outdir, "raw", f"{scen}.{name}.r{rnd}.json")
    cmd = [bench, "bench"] + argv + ["--url", url, "--json", jpath, "-q"]
    # Every process of the group (nginx's workers too): the bench sums their CPU and RSS.
    for pid in group_pids(proc.pid) or [proc.pid]:
        cmd += ["--server-pid", str(pid)]
    if pin:
        cmd = ["taskset", "-c", pin[1]] + cmd
    rec["command"] = " ".join(cmd)
    rss0 = group_rss(proc.pid)
    cpu0 = group_cpu(proc.pid)
    peak = [rss0]
    done = threading.Event()

    def sampler():
        while not done.wait(0.25):
            peak[0] = max(peak[0], group_rss(proc.pid))
    st = threading.Thread(target=sampler, daemon=True)
    st.start()
    t0 = time.time()
    try:
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=timeout)
        rec["exit"] = r.returncode
        if r.returncode != 0:
            rec["stderr"] = r.stderr[-2000:]
    except subprocess.TimeoutExpired:
        rec["exit"] = None
        rec["error"] = f"bench timed out after {timeout}s"
    wall = time.time() - t0
    cpu1 = group_cpu(proc.pid)
    done.set()
    st.join()
    rec["group"] = {"pids": group_pids(proc.pid), "cpu_s": round(cpu1 - cpu0, 3), "wall_s": round(wall, 3),
                    "rss_before": rss0, "rss_peak": peak[0]}
    alive = proc.poll() is None
    rec["server_alive_after"] = alive
    stop(proc)
    try:
        with open(jpath) as f:
            rec["bench"] = json.load(f)
    except (OSError, ValueError):
        rec["bench"] = None
    b = rec["bench"]
    if b:
        deliv = b.get("deliveries") or 0
        if deliv:
            rec["group"]["cpu_s_per_million_deliveries"] = rec["group"]["cpu_s"] / deliv * 1e6
        if scen == "idle" and b.get("idle") is not None:
            n = (b.get("connections") or {}).get("connected") or 0
            if n:
                rec["group"]["rss_per_conn"] = (peak[0] - rss0) / n
    return rec


def machine():
    m = {"nproc": os.cpu_count(), "kernel": os.uname().release}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    m["cpu"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            m["mem_total"] = f.readline().split(":")[1].strip()
    except OSError:
        pass
    return m


def versions(bench):
    v = {}
    try:
        out = subprocess.run([os.path.join(HERE, "install.sh"), "--versions"], capture_output=True, text=True,
                             timeout=60).stdout
        for line in out.splitlines():
            parts = line.strip().split(None, 1)
            if len(parts) == 2 and parts[0] in SERVERS:
                v[parts[0]] = parts[1]
    except Exception:  # noqa: BLE001
        pass
    try:
        rev = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "src"], capture_output=True,
                               text=True).stdout.strip()
        v["shardcast"] = f"{rev}{' + uncommitted src changes' if dirty else ''}"
    except Exception:  # noqa: BLE001
        pass
    return v


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--servers", default=",".join(SERVERS))
    ap.add_argument("--scenarios", default="")
    ap.add_argument("--rates", default="50,100,max")
    ap.add_argument("--fanout-duration", default="5s")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--bench", default=os.environ.get("SHARDCAST_BIN", os.path.join(ROOT, "target/release/shardcast")))
    ap.add_argument("--port", type=int, default=9400)
    ap.add_argument("--pin", default="",
                    help="SERVER_CPUS:GENERATOR_CPUS for taskset, e.g. 0:1 (every server alike)")
    ap.add_argument("--no-doc", action="store_true",
                    help="do not rewrite docs/img/bench-*.svg and the generated part of docs/benchmarks.md")
    ap.add_argument("--append", action="store_true",
                    help="add these runs to an existing results.json as further rounds")
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 20000), hard))
    os.environ["SHARDCAST_BIN"] = args.bench
    os.makedirs(os.path.join(args.out, "raw"), exist_ok=True)
    servers = args.servers.split(",")
    scens = scenarios(args)
    if args.scenarios:
        want = args.scenarios.split(",")
        scens = [s for s in scens if s[0] in want or s[0].split("-")[0] in want]
    res = {"started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": machine(), "versions": versions(args.bench), "load_start": os.getloadavg(),
           "rounds": args.rounds, "servers": servers, "scenarios": [s[0] for s in scens],
           "commands": {s[0]: "shardcast bench " + " ".join(s[1]) for s in scens}, "runs": []}
    out = os.path.join(args.out, "results.json")
    first = 0
    if args.append and os.path.exists(out):
        with open(out) as f:
            old = json.load(f)
        first = 1 + max((r["round"] for r in old["runs"] if r["scenario"] in res["scenarios"]), default=-1)
        old.setdefault("appended", []).append({k: res[k] for k in ("started_utc", "load_start", "scenarios")})
        old["rounds"] = max(old.get("rounds", 1), first + args.rounds)
        res = old
    pin = tuple(args.pin.split(":", 1)) if args.pin else None
    if pin and (len(pin) != 2 or not all(pin)):
        sys.exit("compare.py: --pin takes SERVER_CPUS:GENERATOR_CPUS, e.g. 0:1")
    res["pin"] = args.pin or None
    port = args.port
    for scen, argv in scens:
        for rnd in range(first, first + args.rounds):
            order = servers if rnd % 2 == 0 else list(reversed(servers))
            for name in order:
                port += 1
                rec = run_one(args.bench, name, scen, argv, port, args.out, rnd, timeout=120, pin=pin)
                rec["loadavg"] = os.getloadavg()
                res["runs"].append(rec)
                b = rec.get("bench") or {}
                print(f"{scen:12} r{rnd} {name:10} exit={rec.get('exit')} "
                      f"dps={b.get('deliveries_per_sec')} err={rec.get('error', '')}", flush=True)
                res["load_end"] = os.getloadavg()
                res["finished_utc"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
                with open(out, "w") as f:
                    json.dump(res, f, indent=1)
    print(f"wrote {out}")
    if not args.no_doc:
        subprocess.run([sys.executable, os.path.join(HERE, "charts.py"), out,
                        "--doc", os.path.join(ROOT, "docs", "benchmarks.md")], check=True)


if __name__ == "__main__":
    sys.exit(main())
