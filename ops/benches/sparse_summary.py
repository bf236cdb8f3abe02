"""Prints the criterion results of `cargo bench -p powerinfer-ops --bench sparse` as the
operator curve: time per FFN (µs) and the ratio to the dense FFN of the same shape and
thread count. Usage: python3 ops/benches/sparse_summary.py [target/criterion]"""
import json
import os
import sys

root = sys.argv[1] if len(sys.argv) > 1 else "target/criterion"
times = {}
for dirpath, _, files in os.walk(root):
    if "benchmark.json" in files and os.path.basename(dirpath) == "new":
        bench = json.load(open(os.path.join(dirpath, "benchmark.json")))
        if not bench["group_id"].startswith("ffn/"):
            continue
        est = json.load(open(os.path.join(dirpath, "estimates.json")))
        key = (bench["group_id"], bench["value_str"])
        times.setdefault(key, {})[bench["function_id"]] = est["median"]["point_estimate"] / 1e3

def order(name):
    return -1 if name == "dense" else -int(name.removeprefix("sparse"))

print(f"{'shape':<22}{'threads':>8}{'mode':>11}{'µs':>10}{'× dense':>9}")
for (group, threads), by_mode in sorted(times.items()):
    dense = by_mode.get("dense")
    for mode in sorted(by_mode, key=order):
        label = "dense" if mode == "dense" else mode.removeprefix("sparse") + "% act"
        ratio = by_mode[mode] / dense if dense else float("nan")
        print(f"{group.removeprefix('ffn/'):<22}{threads:>8}{label:>11}{by_mode[mode]:>10.1f}{ratio:>9.3f}")
