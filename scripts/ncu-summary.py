#!/usr/bin/env python3
"""Per-kernel summary of an Nsight Compute raw CSV (`ncu --import X --csv --page raw
--metrics gpu__time_duration.sum`, as scripts/gpu-profile.sh writes): kernels sorted by
summed time, with call counts and µs per call. Usage: scripts/ncu-summary.py FILE.csv..."""
import csv,sys,collections
for f in sys.argv[1:]:
    rows=list(csv.reader(open(f)))[2:]
    tot=collections.defaultdict(float); cnt=collections.Counter()
    for r in rows:
        tot[r[4]]+=float(r[11]); cnt[r[4]]+=1
    T=sum(tot.values())
    print(f"== {f}: {len(rows)} kernels, {T:.0f} us total")
    for k,v in sorted(tot.items(), key=lambda x:-x[1])[:40]:
        print(f"  {k[:60]:60s} {cnt[k]:5d} {v:9.1f} us {100*v/T:5.1f}%  {v/cnt[k]:7.2f}/call")
