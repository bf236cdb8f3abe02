#!/usr/bin/env bash
# The checks that need an NVIDIA GPU, in one pass meant to fit in 8 minutes on one GPU
# (not yet timed on one: no GPU has been available).
#
#   scripts/gpu-check.sh pack [DIR]  where the Rust toolchain is: builds powerinferd and
#                                    the GPU tests with the cuda feature (release, stripped)
#                                    into DIR (default target/gpu-check), ~40 MiB
#   scripts/gpu-check.sh run [DIR]   on the GPU machine (no toolchain, no network needed):
#                                    runs them; results in $OUT when set, else DIR/results
#
# What `run` does, in order: the kernel crate's tests (NVRTC compiles every kernel for
# sm_80/86/89/90; every kernel against its host twin on the GPU, at every dtype and
# sparsity; the device trait's op sequences), the daemon's device tests and the hybrid
# engine on the GPU against the all-CPU run; then it synthesizes a 1B and a 7B model with
# planted sparsity (`powerinferd synth`), compares greedy decoding on the GPU with the CPU
# at several VRAM budgets, and benchmarks prompt processing and decoding on the CPU and
# on the GPU with budgets of 25/50/75/100% of the model file's size and one that holds
# everything (alternated with the CPU, CPU first and last). With the default model
# present (PI_GPU_CHECK_DEFAULT_MODEL, or already in ~/.local/share/powerinfer/models) it
# also runs against llama.cpp's reference logits and greedy against the CPU.
# summary.md collects it; every log is kept beside it.
#
# Needs the NVIDIA driver and NVRTC 13 (libnvrtc.so.13: a CUDA 13 toolkit, or the
# nvidia-cuda-nvrtc Python package), looked for on LD_LIBRARY_PATH, under CUDA_HOME and
# /usr/local/cuda, and in python3's packages. PI_GPU_CHECK_DEVICE (default cuda:0) names
# the device: `sim` rehearses the whole pass without a GPU (the GPU tests then skip, and
# the summary says the figures are the simulated device's, not a GPU's);
# PI_GPU_CHECK_SHAPES (default "1b 7b") the synthetic models' shapes for the greedy
# comparison and the benchmark.
set -euo pipefail

mode=${1:-}
dir=${2:-target/gpu-check}
case "$mode" in
pack)
  rm -rf "$dir" && mkdir -p "$dir/bin"
  cargo build --release -p powerinfer-daemon --features cuda
  cp target/release/powerinferd "$dir/bin/"
  # The test executables, by name, from cargo's own account of what it built.
  cargo test --release --no-run --message-format=json \
    -p powerinfer-kernels-cuda -p powerinfer-daemon -p powerinfer-tests \
    --features powerinfer-kernels-cuda/cuda,powerinfer-daemon/cuda,powerinfer-tests/cuda \
    | python3 -c '
import json, shutil, sys
import os
want = {("kernels-cuda", "kernels"), ("kernels-cuda", "device"), ("kernels-cuda", "cuda"),
        ("daemon", "powerinfer_daemon"), ("tests", "e2e")}
got = set()
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    crate = os.path.basename(os.path.dirname(m["manifest_path"]))
    key = (crate, m["target"]["name"])
    if key in want and m["profile"]["test"]:
        shutil.copy(m["executable"], sys.argv[1] + "/bin/test-" + "-".join(key))
        got.add(key)
missing = want - got
if missing:
    sys.exit(f"not built: {sorted(missing)}")
' "$dir"
  strip "$dir"/bin/*
  cp scripts/gpu-check.sh "$dir/"
  du -sh "$dir"
  echo "packed into $dir: run 'scripts/gpu-check.sh run $dir' on the GPU machine"
  exit 0
  ;;
run) ;;
*)
  echo "usage: $0 pack|run [DIR]" >&2
  exit 2
  ;;
esac

bin="$dir/bin"
[ -x "$bin/powerinferd" ] || { echo "no $bin/powerinferd: run '$0 pack $dir' first" >&2; exit 2; }
res=${OUT:-$dir/results}
mkdir -p "$res"
device=${PI_GPU_CHECK_DEVICE:-cuda:0}
read -r greedy_shape bench_shape <<<"${PI_GPU_CHECK_SHAPES:-1b 7b}"
work=$(mktemp -d "${TMPDIR:-/tmp}/pi-gpu-check.XXXXXX")
export POWERINFER_HOME="$work/home"
summary="$res/summary.md"
failures=0
start=$(date +%s)
note() { echo "$*" | tee -a "$summary"; }
elapsed() { echo "$(($(date +%s) - start)) s"; }

# NVRTC 13.
find_nvrtc() {
  local d
  for d in ${LD_LIBRARY_PATH:+${LD_LIBRARY_PATH//:/ }} "${CUDA_HOME:-/nonexistent}/lib64" /usr/local/cuda/lib64 \
    /usr/local/cuda/lib /usr/lib/x86_64-linux-gnu target/nvrtc-*/nvidia/cu13/lib; do
    [ -e "$d/libnvrtc.so.13" ] && { echo "$d"; return; }
  done
  python3 - <<'EOF' 2>/dev/null || true
import glob, os, site, sys
roots = site.getsitepackages() + [site.getusersitepackages()] + sys.path
for r in roots:
    for hit in glob.glob(os.path.join(r, "nvidia", "**", "libnvrtc.so.13"), recursive=True):
        print(os.path.dirname(hit))
        sys.exit(0)
EOF
}
nvrtc=$(find_nvrtc | head -1)
if [ -n "$nvrtc" ]; then
  export LD_LIBRARY_PATH="$nvrtc${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
real_gpu=false
case "$device" in cuda:*) real_gpu=true ;; esac

: >"$summary"
note "# powerinfer-rs GPU check"
note ""
note "- date: $(date -u +%FT%TZ); device under test: $device"
note "- host: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo)"
if command -v nvidia-smi >/dev/null; then
  note "- GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -1)"
else
  note "- GPU: no nvidia-smi on this machine"
fi
note "- NVRTC: ${nvrtc:-not found}"
$real_gpu || note "- **rehearsal on $device: no figure below is a GPU's**"
note ""

# One test executable; a GPU test that skips is a failure on a GPU run.
run_tests() {
  local label=$1 exe=$2
  shift 2
  local log="$res/test-$label.log" rc=0
  PI_REQUIRE_NVRTC=1 timeout 600 "$bin/$exe" --test-threads 1 "$@" >"$log" 2>&1 || rc=$?
  local line
  line=$(grep -E '^test result:' "$log" | tail -1 || true)
  if [ $rc -ne 0 ]; then
    failures=$((failures + 1))
    note "- FAIL $label (exit $rc): ${line:-no result line}; see test-$label.log"
  elif $real_gpu && grep -q "SKIPPED" "$log"; then
    failures=$((failures + 1))
    note "- FAIL $label: a GPU test skipped on a GPU run: $(grep -m1 SKIPPED "$log")"
  else
    note "- ok $label: $line"
  fi
}

# The default model, when it is here (it does not download on a machine without a network).
default_model=""
for m in "${PI_GPU_CHECK_DEFAULT_MODEL:-}" "$HOME/.local/share/powerinfer/models/smollm2-135m.gguf"; do
  if [ -n "$m" ] && [ -f "$m" ]; then
    mkdir -p "$POWERINFER_HOME/models"
    ln -sf "$(realpath "$m")" "$POWERINFER_HOME/models/smollm2-135m.gguf"
    default_model="$POWERINFER_HOME/models/smollm2-135m.gguf"
    break
  fi
done
# The tests' fixtures (llama.cpp's reference logits) from the checkout the script runs in.
if [ -d tests/fixtures ]; then export POWERINFER_TEST_FIXTURES="$PWD/tests/fixtures"; fi

note "## Tests ($(elapsed))"
run_tests nvrtc test-kernels-cuda-cuda
run_tests kernels test-kernels-cuda-kernels --nocapture
run_tests device-ops test-kernels-cuda-device --nocapture
run_tests daemon-device test-daemon-powerinfer_daemon device::
run_tests hybrid test-tests-e2e hybrid::the_kernel_device_on_a_gpu --nocapture
grep -h "largest logit difference" "$res/test-hybrid.log" | sed 's/^/    /' >>"$summary" || true
if [ -n "$default_model" ] && [ -n "${POWERINFER_TEST_FIXTURES:-}" ]; then
  run_tests hybrid-default test-tests-e2e hybrid::the_default_model_on_a_gpu --nocapture
  grep -h "max |logit" "$res/test-hybrid-default.log" | sed 's/^/    /' >>"$summary" || true
else
  note "- not run: the default model on the GPU against llama.cpp's logits (no default model or fixtures here)"
fi
note ""

# Models with planted sparsity.
pd() { "$bin/powerinferd" "$@"; }
note "## Models ($(elapsed))"
for shape in $(printf '%s\n' "$greedy_shape" "$bench_shape" | sort -u); do
  if pd synth "$work/$shape.gguf" --shape "$shape" >"$res/synth-$shape.log" 2>&1; then
    note "- $shape: $(grep -E '^wrote .*gguf \(' "$res/synth-$shape.log" | head -1)"
  else
    failures=$((failures + 1))
    note "- FAIL synth $shape: $(tail -1 "$res/synth-$shape.log")"
  fi
done
note ""

size_of() { stat -L -c %s "$1"; }
budget() { echo $(($(size_of "$1") * $2 / 100)); }

# Greedy decoding on the device against the CPU computing the same placement: the same
# tokens until the CPU's own top two are within 0.05 (a near tie rounding may flip); the
# chosen tokens' log-probs within 0.05 up to there. Budgets are shares of the model file's size ("all": room for
# everything).
cat >"$work/greedy.py" <<'EOF'
import json, sys
def steps(p):
    return [r for r in map(json.loads, open(p)) if "id" in r]
cpu, dev = steps(sys.argv[1]), steps(sys.argv[2])
worst, n = 0.0, min(len(cpu), len(dev))
for i in range(n):
    c, d = cpu[i], dev[i]
    top = c["top_logprobs"]
    margin = top[0]["logprob"] - top[1]["logprob"] if len(top) > 1 else 1e9
    if c["id"] != d["id"]:
        ok = margin < 0.05
        print(f"{'ok' if ok else 'FAIL'}: the same {i} tokens, then {d['id']} for {c['id']} "
              f"(the CPU's top two {margin:.3f} apart); log-prob gap {worst:.4f} before")
        sys.exit(0 if ok else 1)
    worst = max(worst, abs(c["logprob"] - d["logprob"]))
ok = worst < 0.05 and n == len(cpu) and n > 0
print(f"{'ok' if ok else 'FAIL'}: all {n} tokens the same; largest log-prob gap {worst:.4f}")
sys.exit(0 if ok else 1)
EOF
pct_budget() {
  if [ "$2" = all ]; then budget "$1" 300; else budget "$1" "$2"; fi
}
greedy() {
  local label=$1 model=$2 sparsity=$3 prompt=$4 pct out ref verdict b
  local common=(run "$model" -n 48 --temperature 0 --json --logprobs 2 --sparsity "$sparsity" --ctx 256)
  note "### $label ($sparsity), $device against the CPU ($(elapsed))"
  for pct in 25 50 75 100 all; do
    b=$(pct_budget "$model" $pct)
    # The CPU's run of the same placement: the simulated device computes the device's
    # part with the host's kernels (a placed model sums its FFN in another order than
    # the unplaced one, which a model like SmolLM2 amplifies in dense mode).
    ref="$res/greedy-$label-$pct-cpu.jsonl"
    out="$res/greedy-$label-$pct.jsonl"
    if ! pd "${common[@]}" --device sim --vram-budget "$b" "$prompt" >"$ref" 2>"$ref.log"; then
      failures=$((failures + 1))
      note "- FAIL at $pct on the CPU: $(tail -1 "$ref.log")"
      continue
    fi
    if ! pd "${common[@]}" --device "$device" --vram-budget "$b" "$prompt" \
      >"$out" 2>"$res/greedy-$label-$pct.log"; then
      failures=$((failures + 1))
      note "- FAIL at $pct: $(tail -1 "$res/greedy-$label-$pct.log")"
      continue
    fi
    if verdict=$(python3 "$work/greedy.py" "$ref" "$out"); then
      note "- budget $pct ($(head -1 "$res/greedy-$label-$pct.log")): $verdict"
    else
      failures=$((failures + 1))
      note "- budget $pct: $verdict"
    fi
  done
}
note "## Greedy decoding"
model="$work/$greedy_shape.gguf"
[ -e "$model" ] && greedy "$greedy_shape" "$model" predictor \
  "The planted neurons fire on some tokens and not on others, so"
if [ -n "$default_model" ]; then
  greedy smollm2-135m "$default_model" dense "The capital of France is"
else
  note "- the default model is absent (PI_GPU_CHECK_DEFAULT_MODEL names it): synthetic models only"
fi
note ""

# Speed: llama-bench's pp/tg on the bench model, predictor sparsity, CPU and device
# alternated (CPU first and last), three repetitions each. A budget is a share of the
# model file's size; the device also holds the predictors and the KV cache, so the
# share of the neurons it takes is reported beside it. With PI_GPU_CHECK_LLAMA_BENCH
# naming a llama-bench built with CUDA, llama.cpp runs the same file dense with -ngl
# set to the same share of its layers, between ours.
note "## Speed, $bench_shape Q4_0 with planted sparsity ($(elapsed))"
model="$work/$bench_shape.gguf"
llama_bench=${PI_GPU_CHECK_LLAMA_BENCH:-}
if [ -e "$model" ]; then
  bench=(bench "$model" -p 128 -n 64 -r 3 --sparsity predictor --json)
  n_layer=$(pd inspect "$model" --json | python3 -c '
import json, sys
meta = json.load(sys.stdin)["metadata"]
print(next(e["value"] for e in meta if e["key"].endswith(".block_count")))' 2>/dev/null || echo 0)
  i=0
  for cfg in cpu 25 50 cpu 75 100 all cpu; do
    i=$((i + 1))
    out="$res/bench-$i-$cfg.json"
    if [ "$cfg" = cpu ]; then
      args=(--device cpu)
    else
      args=(--device "$device" --vram-budget "$(pct_budget "$model" "$cfg")")
    fi
    if ! pd "${bench[@]}" "${args[@]}" >"$out" 2>"$res/bench-$i-$cfg.log"; then
      failures=$((failures + 1))
      note "- FAIL bench $cfg: $(tail -1 "$res/bench-$i-$cfg.log")"
    fi
    if [ -n "$llama_bench" ] && [ "$cfg" != cpu ]; then
      if [ "$cfg" = all ]; then ngl=99; else ngl=$((n_layer * cfg / 100)); fi
      if ! "$llama_bench" -m "$model" -p 128 -n 64 -r 3 -ngl "$ngl" -o json \
        >"$res/llama-$i-$cfg-ngl$ngl.json" 2>"$res/llama-$i-$cfg.log"; then
        failures=$((failures + 1))
        note "- FAIL llama-bench -ngl $ngl: $(tail -1 "$res/llama-$i-$cfg.log")"
      fi
    fi
  done
  [ -n "$llama_bench" ] || note "- llama.cpp not compared: PI_GPU_CHECK_LLAMA_BENCH names no llama-bench"
  python3 - "$res" <<'EOF' | tee -a "$summary"
import glob, json, os, sys
rows = []
def order(p):
    return int(os.path.basename(p).split("-")[1]) * 2 + os.path.basename(p).startswith("llama")
for p in sorted(glob.glob(os.path.join(sys.argv[1], "bench-*.json")) +
                glob.glob(os.path.join(sys.argv[1], "llama-*.json")), key=order):
    try:
        recs = json.load(open(p))
    except ValueError:
        continue
    parts = os.path.basename(p).removesuffix(".json").split("-")
    cfg = parts[2]
    pct = "" if cfg in ("cpu", "all") else "%"
    for r in recs:
        if parts[0] == "llama":
            test = f"pp{r['n_prompt']}" if r.get("n_prompt") else f"tg{r['n_gen']}"
            rows.append(f"| llama.cpp {parts[3]} (budget {cfg}{pct}) | dense | - | "
                        f"{r['n_threads']} | {test} | {r['avg_ts']:.2f} ± {r['stddev_ts']:.2f} |")
            continue
        d = r.get("device") or {}
        where = "CPU" if cfg == "cpu" else f"{r['backends']} budget {cfg}{pct}"
        hot = f"{100 * d['hot_neuron_share']:.1f}%" if d else "-"
        used = f"{d['memory_used'] / 2**20:.1f} MiB" if d else "-"
        rows.append(f"| {where} | {hot} | {used} | {r['n_threads']} | {r['test']} "
                    f"| {r['avg_ts']:.2f} ± {r['stddev_ts']:.2f} |")
print("| where | hot neurons on the device | device memory | threads | test | t/s |")
print("| --- | ---: | ---: | ---: | --- | ---: |")
print("\n".join(rows))
EOF
fi
note ""
note "$failures failure(s); $(elapsed) in all"
rm -rf "$work"
[ $failures -eq 0 ]
