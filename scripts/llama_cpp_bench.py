"""llama.cpp's speed on a GGUF model, measured the way llama-bench does, printed as
records shaped like `powerinferd bench --json` so the two can be compared line by line.

It drives libllama through the `llama_cpp` bindings of llama-cpp-python, which compiles
llama.cpp from source (`pip install llama-cpp-python`, once per machine, outside the
repository; never in CI). Usage:

    python3 scripts/llama_cpp_bench.py MODEL.gguf -p 512 -n 128 -r 5 -t 1,2 [--json]

ppN: N random tokens decoded as one batch from an empty cache. tgN: N tokens decoded one at
a time from an empty cache. One unmeasured warm-up run precedes the measured repetitions.
"""
import argparse
import json
import random
import statistics
import time

import llama_cpp as L


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("-p", default="512")
    ap.add_argument("-n", default="128")
    ap.add_argument("-r", type=int, default=5)
    ap.add_argument("-t", default="2")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    L.llama_backend_init()
    mparams = L.llama_model_default_params()
    model = L.llama_model_load_from_file(a.model.encode(), mparams)
    n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    tests = [("pp", int(x)) for x in a.p.split(",") if int(x) > 0] + [("tg", int(x)) for x in a.n.split(",") if int(x) > 0]
    records = []
    rng = random.Random(1234)
    for threads in [int(x) for x in a.t.split(",")]:
        for kind, n in tests:
            cparams = L.llama_context_default_params()
            cparams.n_ctx = n + 1
            cparams.n_batch = 512
            cparams.n_ubatch = 512
            cparams.n_threads = threads
            cparams.n_threads_batch = threads
            ctx = L.llama_init_from_model(model, cparams)
            samples = []
            for rep in range(a.r + 1):
                L.llama_memory_clear(L.llama_get_memory(ctx), True)
                toks = [rng.randrange(n_vocab) for _ in range(n)]
                start = time.perf_counter()
                if kind == "pp":
                    for i in range(0, n, 512):
                        chunk = toks[i:i + 512]
                        arr = (L.llama_token * len(chunk))(*chunk)
                        L.llama_decode(ctx, L.llama_batch_get_one(arr, len(chunk)))
                else:
                    one = (L.llama_token * 1)()
                    for t in toks:
                        one[0] = t
                        L.llama_decode(ctx, L.llama_batch_get_one(one, 1))
                L.llama_synchronize(ctx)
                if rep > 0:
                    samples.append(time.perf_counter() - start)
            L.llama_free(ctx)
            ts = [n / s for s in samples]
            rec = {"engine": "llama.cpp", "test": f"{kind}{n}", "n_threads": threads,
                   "avg_ts": statistics.mean(ts), "stddev_ts": statistics.stdev(ts) if len(ts) > 1 else 0.0,
                   "samples_ts": ts}
            records.append(rec)
            if not a.json:
                print(f"| llama.cpp | {threads} | {rec['test']} | {rec['avg_ts']:.2f} ± {rec['stddev_ts']:.2f} |", flush=True)
    if a.json:
        print(json.dumps(records, indent=2))


if __name__ == "__main__":
    main()
