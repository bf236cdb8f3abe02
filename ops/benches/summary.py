"""Prints the criterion results of `cargo bench -p powerinfer-ops` as a table of GB/s
(throughput = bytes of weights read, or bytes copied/read for the bandwidth rows).
Usage: python3 ops/benches/summary.py [target/criterion]"""
import json
import os
import sys

root = sys.argv[1] if len(sys.argv) > 1 else "target/criterion"
rows = {}
for dirpath, _, files in os.walk(root):
    if "benchmark.json" in files and os.path.basename(dirpath) == "new":
        bench = json.load(open(os.path.join(dirpath, "benchmark.json")))
        est = json.load(open(os.path.join(dirpath, "estimates.json")))
        thr = bench.get("throughput") or {}
        nbytes = thr.get("BytesDecimal") or thr.get("Bytes")
        if not nbytes:
            continue
        ns = est["mean"]["point_estimate"]
        group, func, param = bench["group_id"], bench["function_id"], bench["value_str"]
        rows.setdefault((group, func), {})[param] = nbytes / ns  # bytes/ns == GB/s
threads = sorted({t for v in rows.values() for t in v})
print(f"{'benchmark':<40}" + "".join(f"{t:>10}" for t in threads))
for (group, func), by_t in sorted(rows.items()):
    print(f"{group + '/' + func:<40}" + "".join(f"{by_t.get(t, float('nan')):>10.1f}" for t in threads))
