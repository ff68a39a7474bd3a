#!/usr/bin/env python3
"""SVG charts, a markdown table and the generated part of docs/benchmarks.md, from the results
of benches/peers/compare.py.

Usage: python3 benches/peers/charts.py [RESULTS_JSON] [--out docs/img] [--table] [--doc FILE]
Plain SVG written by hand, standard library only. One chart per metric, one bar per server,
shardcast highlighted. With several rounds, each bar is the median of the rounds.
`--doc docs/benchmarks.md` replaces the text between the BEGIN and END markers of that file
with the run's date, pinning, machine, versions, commands, results table and charts (compare.py
does this at the end of every run); the analysis around the markers is written by hand.
"""
import argparse
import json
import os
import statistics

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))


def runs_by(res, scen):
    out = {}
    for r in res["runs"]:
        if r["scenario"] == scen:
            out.setdefault(r["server"], []).append(r)
    return out


def med(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def metric(res, scen, fn):
    """{server: median of fn(run)} in the server order of the results."""
    by = runs_by(res, scen)
    out = {}
    for s in res["servers"]:
        vals = []
        for r in by.get(s, []):
            try:
                vals.append(fn(r))
            except (KeyError, TypeError, ZeroDivisionError):
                vals.append(None)
        out[s] = med(vals)
    return out


def dps(r):
    return r["bench"]["deliveries_per_sec"]


def p99_ms(r):
    return r["bench"]["latency_us"]["p99"] / 1000


def p50_ms(r):
    return r["bench"]["latency_us"]["p50"] / 1000


def p999_ms(r):
    return r["bench"]["latency_us"]["p99_9"] / 1000


def loss(r):
    f = r["bench"]["fanout"]
    return f["lost"] / f["expected"] if f["expected"] else None


def cpu_per_m(r):
    """Server CPU s per million deliveries once the connections are open (the bench's figure,
    over every pid of the group); runs made before compare.py passed every pid fall back to
    the group figure, which includes the handshakes."""
    s = (r.get("bench") or {}).get("server") or {}
    if s.get("pids") and s.get("cpu_s_per_million_deliveries") is not None:
        return s["cpu_s_per_million_deliveries"]
    return r["group"]["cpu_s_per_million_deliveries"]


def rss_kib(r):
    return r["group"]["rss_per_conn"] / 1024


def hs(r):
    return r["bench"]["connect"]["handshakes_per_sec"]


def gen_share(r):
    return r["bench"]["generator_cpu"]["share_of_window"]


def esc(s):
    return str(s).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def fmt(v):
    if v is None:
        return "n/a"
    if v >= 1e6:
        return f"{v / 1e6:.2f}M"
    if v >= 1e4:
        return f"{v / 1e3:.0f}k"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def bar_svg(title, unit, values, note=""):
    """Horizontal bars, one per server; None draws as 'failed / n/a'."""
    names = list(values)
    w, left, right, top, bh, gap = 720, 110, 90, 46, 26, 10
    h = top + len(names) * (bh + gap) + 30
    vmax = max([v for v in values.values() if v] or [1])
    plot = w - left - right
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
           'font-family="sans-serif" font-size="13">',
           f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<text x="{w / 2}" y="20" text-anchor="middle" font-size="15" font-weight="bold">{esc(title)}</text>',
           f'<text x="{w / 2}" y="37" text-anchor="middle" fill="#555">{esc(unit)}</text>']
    for i, n in enumerate(names):
        y = top + i * (bh + gap)
        v = values[n]
        colour = "#d9480f" if n == "shardcast" else "#748ffc"
        weight = ' font-weight="bold"' if n == "shardcast" else ""
        out.append(f'<text x="{left - 8}" y="{y + bh * 0.7}" text-anchor="end"{weight}>{esc(n)}</text>')
        if v is None:
            out.append(f'<text x="{left + 4}" y="{y + bh * 0.7}" fill="#999">n/a (failed or not measured)</text>')
            continue
        bw = max(1.0, plot * v / vmax)
        out.append(f'<rect x="{left}" y="{y}" width="{bw:.1f}" height="{bh}" fill="{colour}"/>')
        out.append(f'<text x="{left + bw + 5:.1f}" y="{y + bh * 0.7}"{weight}>{esc(fmt(v))}</text>')
    out.append(f'<line x1="{left}" y1="{top - 4}" x2="{left}" y2="{h - 26}" stroke="#333"/>')
    if note:
        out.append(f'<text x="{left}" y="{h - 8}" fill="#555" font-size="11">{esc(note)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def charts(res):
    rates = [s.split("-", 1)[1] for s in res["scenarios"] if s.startswith("fanout-")]
    fixed = [r for r in rates if r != "max"]
    c = [("chat-deliveries", "chat: 200 clients, 20-byte messages", "deliveries/s (higher is better)",
          metric(res, "chat", dps))]
    if "max" in rates:
        c.append(("fanout-max-deliveries", "fanout --rate max: 1 -> 10,000 subscribers, 64 B",
                  "deliveries/s (higher is better)", metric(res, "fanout-max", dps)))
    for r in fixed:
        c.append((f"fanout-{r}-p99", f"fanout at {r} msg/s: 1 -> 10,000 subscribers, 64 B",
                  "p99 latency, ms (lower is better)", metric(res, f"fanout-{r}", p99_ms)))
    c.append(("idle-rss", "idle: 15,000 connections", "server RSS per connection, KiB (lower is better)",
              metric(res, "idle", rss_kib)))
    c.append(("cpu-chat", "server CPU per million deliveries: chat", "CPU seconds (lower is better)",
              metric(res, "chat", cpu_per_m)))
    if "max" in rates:
        c.append(("cpu-fanout-max", "server CPU per million deliveries: fanout --rate max",
                  "CPU seconds (lower is better)", metric(res, "fanout-max", cpu_per_m)))
    return c


def table(res):
    rates = [s for s in res["scenarios"] if s.startswith("fanout-")]
    cols = ["server", "chat deliv/s", "chat CPU s/M"]
    rows = {s: [s] for s in res["servers"]}
    for s, v in metric(res, "chat", dps).items():
        rows[s].append(fmt(v))
    for s, v in metric(res, "chat", cpu_per_m).items():
        rows[s].append(fmt(v))
    for scen in rates:
        r = scen.split("-", 1)[1]
        cols += [f"fanout {r}: deliv/s", "p50/p99/p99.9 ms", "loss", "CPU s/M"]
        d, p5, p9, p99, lo, cp = (metric(res, scen, f) for f in (dps, p50_ms, p99_ms, p999_ms, loss, cpu_per_m))
        for s in res["servers"]:
            lat = "n/a" if p9[s] is None else f"{p5[s]:.1f} / {p9[s]:.1f} / {p99[s]:.1f}"
            rows[s] += [fmt(d[s]), lat, "n/a" if lo[s] is None else f"{100 * lo[s]:.3g}%", fmt(cp[s])]
    cols += ["idle KiB/conn (group peak)", "idle KiB/conn (bench)", "connect hs/s"]
    for s, v in metric(res, "idle", rss_kib).items():
        rows[s].append(fmt(v))
    for s, v in metric(res, "idle", lambda r: r["bench"]["idle"]["server_rss_per_connection"] / 1024).items():
        rows[s].append(fmt(v))
    for s, v in metric(res, "connect", hs).items():
        rows[s].append(fmt(v))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for s in res["servers"]:
        lines.append("| " + " | ".join(rows[s]) + " |")
    return "\n".join(lines)


BEGIN = "<!-- BEGIN generated by benches/peers/charts.py --doc: do not edit by hand -->"
END = "<!-- END generated -->"


def doc_section(res, results_path, chart_names, img_dir, doc_path):
    """The generated part of docs/benchmarks.md: what ran, where, and what it measured."""
    rel = lambda p: os.path.relpath(p, os.path.dirname(os.path.abspath(doc_path)))
    m = res["machine"]
    load = lambda key: " / ".join(f"{x:.2f}" for x in res.get(key) or []) or "?"
    out = [BEGIN, "",
           f"Results file: `{os.path.relpath(results_path, ROOT)}`. Started {res.get('started_utc', '?')}, "
           f"finished {res.get('finished_utc', '?')}; {res.get('rounds', 1)} round(s) (rounds after the first "
           f"run the servers in reverse order); values are medians over the rounds. "
           + (f"Pinned with `taskset`: every server on CPU {res['pin'].split(':')[0]}, the generator on CPU "
              f"{res['pin'].split(':')[1]}." if res.get("pin") else "Nothing pinned.")
           + f" Load average (1/5/15 min) {load('load_start')} at the start, {load('load_end')} at the end.",
           "", "| machine | |", "|---|---|",
           f"| CPUs | {m.get('nproc')} (`{m.get('cpu', '?')}`) |",
           f"| kernel | `{m.get('kernel', '?')}` |",
           f"| memory | {m.get('mem_total', '?')} |",
           "", "| server | version |", "|---|---|"]
    for srv in res["servers"]:
        out.append(f"| {srv} | {res['versions'].get(srv, '?')} |")
    out += ["", "| scenario | command (plus `--url`, `--server-pid`, `--json`, `-q`) |", "|---|---|"]
    for scen in res["scenarios"]:
        out.append(f"| {scen} | `{res['commands'][scen]}` |")
    out += ["", table(res), ""]
    for name, title, _unit, _vals in chart_names:
        out.append(f"![{title}]({rel(os.path.join(img_dir, f'bench-{name}.svg'))})")
    out += ["", END]
    return "\n".join(out)


def write_doc(doc_path, section):
    with open(doc_path) as f:
        text = f.read()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"charts.py: {doc_path} has no {BEGIN!r} ... {END!r} markers")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    with open(doc_path, "w") as f:
        f.write(head + section + tail)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("results", nargs="?", default=os.path.join(HERE, "results", "results.json"))
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "img"))
    ap.add_argument("--table", action="store_true", help="also print a markdown table")
    ap.add_argument("--doc", help="rewrite the generated section of this file (docs/benchmarks.md)")
    args = ap.parse_args()
    with open(args.results) as f:
        res = json.load(f)
    os.makedirs(args.out, exist_ok=True)
    note = f"{res['machine'].get('cpu', '?')}, {res['machine'].get('nproc')} cores; " \
           f"{res.get('rounds', 1)} round(s), median; {res.get('started_utc', '')}"
    made = charts(res)
    for name, title, unit, vals in made:
        path = os.path.join(args.out, f"bench-{name}.svg")
        with open(path, "w") as f:
            f.write(bar_svg(title, unit, vals, note))
        print(path)
    if args.table:
        print(table(res))
    if args.doc:
        write_doc(args.doc, doc_section(res, os.path.abspath(args.results), made, args.out, args.doc))
        print(f"wrote the generated section of {args.doc}")


if __name__ == "__main__":
    main()
