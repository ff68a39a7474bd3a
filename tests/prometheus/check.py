#!/usr/bin/env python3
"""tests/prometheus/check.py: checks the Grafana dashboard and the alert rules against a real
Prometheus scraping a real shardcast.

Starts, all on loopback ports with a temporary directory: redis-server (so the node exports
its shardcast_bus_* series), shardcast with --bus, and Debian's prometheus scraping it every
second with docs/prometheus/alerts.yml loaded. Drives some traffic (`shardcast bench fanout`,
an HTTP publish, a refused request), then asks Prometheus's HTTP API that:
  * every series named by docs/grafana/shardcast.json or docs/prometheus/alerts.yml exists
    and has a sample;
  * every dashboard query evaluates and returns data (Grafana variables substituted);
  * every alert rule loaded, was evaluated, and has no error;
  * the traffic is visible (deliveries, ws and http publishes, fan-out observations, bus).

    python3 tests/prometheus/check.py            # SHARDCAST_BIN, PROMETHEUS, REDIS_SERVER override
Prints one line per check and ends with "N passed, N failed"; exit status 1 on any failure.
Every wait is on a real signal (a log line, an API state, a process exit) and bounded.
"""
import json
import os
import queue
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BIN = os.environ.get("SHARDCAST_BIN", os.path.join(REPO, "target", "release", "shardcast"))
PROMETHEUS = os.environ.get("PROMETHEUS", "prometheus")
REDIS = os.environ.get("REDIS_SERVER", "redis-server")
DASHBOARD = os.path.join(REPO, "docs", "grafana", "shardcast.json")
RULES = os.path.join(REPO, "docs", "prometheus", "alerts.yml")
# Grafana's variables, as the dashboard would fill them in.
GRAFANA_VARS = {"$__rate_interval": "30s", "$__interval": "30s", "$instance": ".*"}

results = {"passed": 0, "failed": 0}


def check(ok, what):
    results["passed" if ok else "failed"] += 1
    print(f"{'ok  ' if ok else 'FAIL'} {what}", flush=True)
    return ok


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A child process whose output lines are collected by a thread, so a caller can wait
    for a given line with a deadline."""

    def __init__(self, name, argv, **kw):
        self.name = name
        self.lines = queue.Queue()
        self.log = []
        self.p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, text=True, errors="replace", **kw)
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        for line in self.p.stdout:
            self.log.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, pattern, timeout):
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"{self.name}: no line matching {pattern!r} within {timeout} s:\n{''.join(self.log)}")
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise RuntimeError(f"{self.name} exited ({self.p.wait()}) before {pattern!r}:\n{''.join(self.log)}")
            if re.search(pattern, line):
                return

    def stop(self, timeout=30):
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        return self.p.returncode


def api(base, path, **params):
    url = f"{base}/api/v1/{path}"
    if params:
        url += "?" + urllib.parse.urlencode(params)
    with urllib.request.urlopen(url, timeout=5) as r:
        body = json.load(r)
    if body.get("status") != "success":
        raise RuntimeError(f"{url}: {body}")
    return body["data"]


def poll(what, timeout, probe, every=0.2):
    """Asks `probe` until it returns something truthy; the API state is the signal."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = probe()
        if got:
            return got
        time.sleep(every)
    raise RuntimeError(f"timed out after {timeout} s waiting for {what}")


def expressions():
    """(where, expr) for every dashboard query and every alert rule."""
    exprs = []
    dash = json.load(open(DASHBOARD))
    for panel in dash["panels"]:
        for t in panel.get("targets", []):
            exprs.append((f"dashboard: {panel['title']} [{t['refId']}]", t["expr"]))
    var = next(v for v in dash["templating"]["list"] if v["name"] == "instance")
    exprs.append(("dashboard: variable instance", var["definition"].replace("label_values(", "").split(",")[0]))
    rules_text = open(RULES).read()
    for m in re.finditer(r"^\s+- alert: (\w+)\n\s+expr: (.+)$", rules_text, re.M):
        exprs.append((f"rule: {m.group(1)}", m.group(2).strip()))
    return exprs


def series_names(exprs):
    names = set()
    for _, e in exprs:
        names.update(re.findall(r"\b(shardcast_[a-z_]+|up)\b(?!\s*\()", e))
    return sorted(names)


def main():
    for tool in (BIN, PROMETHEUS, REDIS):
        if not shutil.which(tool):
            print(f"check.py: {tool} not found (Debian: apt-get install prometheus redis-server; "
                  "shardcast: cargo build --release)", file=sys.stderr)
            return 2
    exprs = expressions()
    names = series_names(exprs)
    tmp = tempfile.mkdtemp(prefix="shardcast-prom-")
    procs = []
    try:
        redis_port, shard_port, prom_port = free_port(), free_port(), free_port()
        redis = Proc("redis-server", [REDIS, "--port", str(redis_port), "--bind", "127.0.0.1",
                                      "--save", "", "--appendonly", "no", "--dir", tmp])
        procs.append(redis)
        redis.wait_for(r"Ready to accept connections", 20)

        env = dict(os.environ, RUST_LOG="info", NO_COLOR="1")
        node = Proc("shardcast", [BIN, "--listen", f"127.0.0.1:{shard_port}", "--bus",
                                  f"redis://127.0.0.1:{redis_port}", "--drain-delay", "0s"], env=env)
        procs.append(node)
        node.wait_for(r"shardcast listening", 20)

        with open(os.path.join(tmp, "prometheus.yml"), "w") as f:
            f.write(f"""# prometheus.yml written by tests/prometheus/check.py
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files: ["{RULES}"]
scrape_configs:
  - job_name: shardcast
    static_configs:
      - targets: ["127.0.0.1:{shard_port}"]
""")
        prom = Proc("prometheus", [PROMETHEUS, f"--config.file={tmp}/prometheus.yml",
                                   f"--storage.tsdb.path={tmp}/data", f"--web.listen-address=127.0.0.1:{prom_port}",
                                   "--log.level=info"], cwd=tmp)
        procs.append(prom)
        prom.wait_for(r"Server is ready to receive web requests", 30)
        base = f"http://127.0.0.1:{prom_port}"

        def target_up():
            targets = api(base, "targets")["activeTargets"]
            return any(t["health"] == "up" for t in targets)
        poll("the shardcast target to be up", 30, target_up)
        check(True, f"prometheus scrapes shardcast on 127.0.0.1:{shard_port} (bus: redis on {redis_port})")

        # Traffic: WebSocket fan-out for a few seconds, one HTTP publish, one refused request.
        bench = subprocess.run(
            [BIN, "bench", "fanout", "--url", f"ws://127.0.0.1:{shard_port}/ws/{{topic}}", "--subscribers", "20",
             "--topics", "2", "--publishers", "2", "--rate", "100", "--duration", "4s", "--warmup", "0s", "--quiet"],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
        check(bench.returncode == 0, f"bench fanout ran (exit {bench.returncode}) {bench.stderr[-300:] if bench.returncode else ''}")
        req = urllib.request.Request(f"http://127.0.0.1:{shard_port}/publish/bench0", data=b"hello",
                                     headers={"Content-Type": "text/plain"}, method="POST")
        with urllib.request.urlopen(req, timeout=5) as r:
            check(r.status == 202, "POST /publish/bench0 answered 202")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{shard_port}/not-here", timeout=5)
        except urllib.error.HTTPError as e:
            check(e.code == 404, "GET /not-here answered 404 (a handshake rejection)")

        # What the traffic must have left in Prometheus; waiting on it covers the next scrapes.
        def value(expr):
            r = api(base, "query", query=expr)["result"]
            return float(r[0]["value"][1]) if r else 0.0
        for expr in ['sum(shardcast_deliveries_total)', 'sum(shardcast_messages_published_total{source="ws"})',
                     'sum(shardcast_messages_published_total{source="http"})', 'sum(shardcast_publish_fanout_seconds_count)',
                     'sum(shardcast_handshake_rejections_total{reason="not_found"})', 'sum(shardcast_bus_published_total)',
                     'sum(shardcast_bus_round_trip_seconds_count)', 'sum(shardcast_bus_connected)']:
            try:
                got = poll(f"{expr} > 0", 20, lambda: value(expr) > 0 and value(expr))
                check(True, f"{expr} = {got:g}")
            except RuntimeError as e:
                check(False, str(e))

        for name in names:
            r = api(base, "query", query=f'count({{__name__="{name}"}})')["result"]
            n = int(float(r[0]["value"][1])) if r else 0
            check(n > 0, f"series {name}: {n} with a sample")

        for where, expr in exprs:
            q = expr
            for k, v in GRAFANA_VARS.items():
                q = q.replace(k, v)
            try:
                res = api(base, "query", query=q)["result"]
            except Exception as e:  # a bad query is a failure with its message
                check(False, f"{where}: {e}")
                continue
            if where.startswith("rule: "):
                check(True, f"{where}: evaluates ({len(res)} series over the threshold now, before its for:)")
            else:
                check(len(res) > 0, f"{where}: {len(res)} series")

        def rules_evaluated():
            rules = [r for g in api(base, "rules")["groups"] for r in g["rules"]]
            done = [r for r in rules if not r.get("lastEvaluation", "").startswith("0001")]
            return rules if len(done) == len(rules) and rules else None
        rules = poll("every rule to be evaluated", 20, rules_evaluated)
        for r in rules:
            check(r["health"] == "ok" and not r.get("lastError"),
                  f"rule {r['name']} loaded and evaluated: health {r['health']} {r.get('lastError', '')}".rstrip())

        code = node.stop()
        procs.remove(node)
        check(code == 0, f"shardcast exited {code} after SIGTERM")
    finally:
        for p in reversed(procs):
            p.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{results['passed']} passed, {results['failed']} failed")
    return 1 if results["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
