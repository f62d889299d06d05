"""Compare the two snapshots bench.memhold wrote: bytes per socket by traceback and by type (bench only).
`python -m bench.memreport DIR [frames] [top]`."""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

d = Path(sys.argv[1])
frames = int(sys.argv[2]) if len(sys.argv) > 2 else 6
top = int(sys.argv[3]) if len(sys.argv) > 3 else 40
n = int((d / "n").read_text())
t0, t1 = (json.loads((d / f"types{i}.json").read_text()) for i in (0, 1))
print(f"== by type (gc-tracked objects, sys.getsizeof), per socket, n={n}")
rows = []
for k in set(t1["sizes"]) | set(t0["sizes"]):
    ds = t1["sizes"].get(k, 0) - t0["sizes"].get(k, 0)
    dc = t1["counts"].get(k, 0) - t0["counts"].get(k, 0)
    rows.append((ds / n, dc / n, k))
rows.sort(reverse=True)
for s, c, k in rows[:30]:
    if abs(s) >= 8:
        print(f"{s:9.1f} B  {c:6.2f}/sock  {k}")
print(f"total gc-tracked: {sum(r[0] for r in rows):.1f} B/sock")
if (d / "snap1.pkl").exists():
    s0, s1 = (pickle.loads((d / f"snap{i}.pkl").read_bytes()) for i in (0, 1))
    import tracemalloc

    flt = [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, "<frozen importlib._bootstrap>")]
    s0, s1 = s0.filter_traces(flt), s1.filter_traces(flt)
    for key in ("filename", "lineno"):
        st = s1.compare_to(s0, key)
        print(f"\n== tracemalloc by {key}, per socket; total {sum(x.size_diff for x in st) / n:.1f} B")
        for x in st[: top if key == "lineno" else 15]:
            if abs(x.size_diff / n) < 8:
                continue
            fr = x.traceback[0]
            where = f"{fr.filename.split('site-packages/')[-1]}:{fr.lineno if key == 'lineno' else ''}"
            print(f"{x.size_diff / n:9.1f} B {x.count_diff / n:6.2f} blk  {where}")
    st = s1.compare_to(s0, "traceback")
    print(f"\n== tracemalloc by traceback ({frames} frames shown), per socket")
    for x in st[:top]:
        if abs(x.size_diff / n) < 16:
            continue
        print(f"{x.size_diff / n:9.1f} B {x.count_diff / n:6.2f} blk")
        for fr in list(x.traceback)[-frames:][::-1]:
            print(f"      {fr.filename.split('site-packages/')[-1]}:{fr.lineno}")
