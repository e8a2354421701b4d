#!/usr/bin/env python3
"""Print the module-dependency cycles (strongly connected components) of a crate's src/.
Usage: module_cycles.py CRATE_SRC_DIR   (exit 1 when a cycle exists)"""
import re, glob, os, sys
src = sys.argv[1]
files = glob.glob(os.path.join(src, '*.rs')) + glob.glob(os.path.join(src, '*/mod.rs'))
def name(f):
    rel = os.path.relpath(f, src)
    return rel.split('/')[0][:-3] if '/' not in rel else rel.split('/')[0]
mods = {name(f) for f in files}
g = {}
for f in glob.glob(os.path.join(src, '**/*.rs'), recursive=True):
    m = os.path.relpath(f, src).split('/')[0].removesuffix('.rs')
    s = open(f).read().split('#[cfg(test)]')[0]
    deps = g.setdefault(m, set())
    for x in re.finditer(r'crate::\{([^}]*)\}', s, re.S):
        for part in re.split(r'[,\s]+', x.group(1)):
            p = part.split('::')[0].strip()
            if p in mods: deps.add(p)
    for x in re.finditer(r'crate::([a-z_0-9]+)', s):
        if x.group(1) in mods: deps.add(x.group(1))
    deps.discard(m)
sys.setrecursionlimit(10000)
idx, low, st, on, sccs, c = {}, {}, [], set(), [], [0]
def sc(v):
    idx[v] = low[v] = c[0]; c[0] += 1; st.append(v); on.add(v)
    for w in g.get(v, ()):
        if w not in idx: sc(w); low[v] = min(low[v], low[w])
        elif w in on: low[v] = min(low[v], idx[w])
    if low[v] == idx[v]:
        comp = []
        while True:
            w = st.pop(); on.discard(w); comp.append(w)
            if w == v: break
        sccs.append(comp)
for v in list(g):
    if v not in idx: sc(v)
bad = [sorted(s) for s in sccs if len(s) > 1]
for s in bad:
    print('cycle:', ' '.join(s))
    for m in s: print('  ', m, '->', ' '.join(sorted(d for d in g[m] if d in s)))
sys.exit(1 if bad else 0)
