#!/usr/bin/env python3
"""Fails when the top-level modules of a crate import each other in a circle.

    .ci/module-cycles.py crates/shardcast-core/src crates/shardcast-server/src ...

A module is a top-level file or directory of the crate's `src` (`shard/` and its files are one
module). An edge a -> b is any `crate::b` path in a's code outside its `#[cfg(test)] mod tests`
blocks and `tests.rs` files (`crate::{X, Y}` and `crate::X` resolve X through lib.rs's
`pub use b::...` re-exports). Doc comments count too: they name the dependency. It is a text
heuristic, not a compiler pass: enough to keep the layering rules of docs/ARCHITECTURE.md from
drifting back."""

import os
import re
import sys


def graph(src):
    mods = {}
    for dirpath, _, files in os.walk(src):
        for f in files:
            if not f.endswith(".rs") or f == "tests.rs":
                continue
            path = os.path.join(dirpath, f)
            rel = os.path.relpath(path, src)[:-3]
            mod = rel.split("/")[0]
            if mod in ("lib", "main"):
                continue
            text = re.split(r"#\[cfg\(test\)\]\s*mod tests\s*\{", open(path).read())[0]
            refs = set(re.findall(r"crate::([A-Za-z_]+)", text))
            for group in re.findall(r"crate::\{([^}]*)\}", text):
                refs.update(re.findall(r"[A-Za-z_]+", group))
            mods.setdefault(mod, set()).update(refs)
    lib = open(os.path.join(src, "lib.rs")).read()
    owner = {}
    for mod, items in re.findall(r"pub use ([a-z_]+)::\{?([^;]*)\}?;", lib):
        if mod != "crate":
            for item in re.findall(r"[A-Za-z_]+", items):
                owner[item] = mod
    return {m: {owner.get(r, r) for r in refs} & set(mods) - {m} for m, refs in mods.items()}


def cycles(g):
    index, low, stack, on, found, n = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(g[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return found


def main():
    failed = False
    for src in sys.argv[1:]:
        g = graph(src)
        found = cycles(g)
        if found:
            failed = True
            for comp in found:
                edges = [f"{a} -> {b}" for a in comp for b in sorted(g[a]) if b in comp]
                print(f"   {src}: modules in a circle: {', '.join(edges)}")
        else:
            print(f"   {src}: {len(g)} modules, no import cycle: ok")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
