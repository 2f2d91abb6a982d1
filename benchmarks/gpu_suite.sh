#!/usr/bin/env bash
# The GPU benchmark suite: W1 kernels, NF4 matmuls, decode graphs and W2 serving sweeps, in
# under 9 minutes on one H100 / H200, with nothing downloaded (dummy weights from the presets'
# config.json, random adapters) and no web framework needed (everything runs in-process).
# Everything lands in one folder:
#
#   bash benchmarks/gpu_suite.sh            # OUT=benchmarks/results/gpu-<date> by default
#   SMOKE=1 bash benchmarks/gpu_suite.sh    # or --smoke: every step on the CPU, tiny sizes
#   SKIP_SWEEP=1 bash benchmarks/gpu_suite.sh   # kernels, NF4 and graphs only
#
# Steps (each under `timeout`, its time printed and appended to $OUT/timings.txt):
#   exactness       not in SMOKE runs: the kernel, decode-graph, NF4 and mixed-adapter tests
#                   on the GPU (compiled Triton and the CUDA engine against the torch
#                   references and transformers + PEFT); needs pytest-xdist and bitsandbytes
#   kernels         python benchmarks/lora_kernels.py     (W1: shrink/expand vs gather+bmm)
#   nf4             python benchmarks/nf4.py              (fused NF4 vs dequant vs bf16)
#   graphs          python benchmarks/decode_graphs.py    (graph replay == eager on the demo,
#                   bf16 and NF4; decode step graphs vs eager, base vs LoRA; NF4 vs bf16 at
#                   batch 1)
#   sweep-bf16      loraserve bench sweep, bf16 base, n in SWEEP_ADAPTERS, decode graphs on
#                   (SMOKE: python benchmarks/sweep_baselines.py, the PEFT server beside it)
#   sweep-bf16-eager  the same with --enforce-eager (not in SMOKE runs: the CPU is eager anyway)
#   sweep-nf4       loraserve bench sweep, NF4 base, n in SWEEP_ADAPTERS, graphs on
#   tp-collectives  only with 2 or more GPUs visible: benchmarks/tp_collectives.py over NCCL
#   sweep-tp        only with 2 or more GPUs visible: sweep-bf16's loraserve run split across
#                   TP (default: every visible GPU, at most 8) devices, --enforce-eager (a split
#                   model steps eagerly)
#   sweep-baselines only when BASELINES is set: python benchmarks/sweep_baselines.py, the HF
#                   baselines beside loraserve at n in BASELINE_ADAPTERS. They run
#                   transformers generate on the 7B model and load
#                   every adapter into PEFT, so they do not fit the 9 minutes beside the rest.
#                   (SMOKE runs the PEFT server inside sweep-bf16 instead, and sweep-nf4 at n=2.)
#
# Knobs (environment): OUT, PY (default .venv/bin/python, else python3), LORASERVE (default
# .venv/bin/loraserve, else "$PY -m server.cli"), MODEL (default the llama-2-7b preset),
# SWEEP_ADAPTERS, NF4_ADAPTERS (sweep-nf4's n; SMOKE: 2), BASELINES, BASELINE_ADAPTERS,
# SWEEP_RANKS (8; S-LoRA's mixed set is 64,32,16,8), TP (sweep-tp's size), SWEEP_TARGETS,
# SWEEP_REQUESTS, SWEEP_RATE, SWEEP_ALPHA, EXACT_WORKERS, STEPS (the steps to run, by name,
# space-separated; default all), DISTINCT (adapter directories written per sweep,
# reused round-robin: 1000 rank-8 7B adapters would be 17 GB), and T_EXACT, T_KERNELS,
# T_NF4, T_GRAPHS, T_SWEEP, T_BASELINES (seconds per step).
set -euo pipefail

cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--smoke" ]]; then SMOKE=1; fi
SMOKE=${SMOKE:-0}
SKIP_SWEEP=${SKIP_SWEEP:-0}
export PYTHONUNBUFFERED=1

if [[ -z "${PY:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
if [[ -n "${LORASERVE:-}" ]]; then
  read -r -a LS <<<"$LORASERVE"
elif [[ -x .venv/bin/loraserve ]]; then
  LS=(.venv/bin/loraserve)
else
  LS=("$PY" -m server.cli)
fi

if [[ "$SMOKE" == 1 ]]; then
  export CUDA_VISIBLE_DEVICES=""  # the CPU, even on a GPU machine
  OUT=${OUT:-benchmarks/results/gpu-smoke-$(date +%Y%m%d-%H%M%S)}
  MODEL=${MODEL:-benchmarks/presets/tiny}
  KERNEL_ARGS=(--smoke)
  NF4_ARGS=(--shapes 256x256 --batches 1,4 --repeats 1)
  GRAPH_ARGS=(--smoke)
  SWEEP_ADAPTERS=${SWEEP_ADAPTERS:-0,2}
  NF4_ADAPTERS=${NF4_ADAPTERS:-2}
  BASELINE_ADAPTERS=${BASELINE_ADAPTERS:-0,2}
  # One sweep on the CPU runs the baselines beside loraserve (sweep-bf16 at 0 and 2 adapters
  # with the PEFT server), rather than a separate sweep-baselines step repeating loraserve.
  BF16_BASELINES=${BASELINES:-peft}
  BASELINES=""
  SIZES=(--num-requests "${SWEEP_REQUESTS:-6}" --rate "${SWEEP_RATE:-6}"
    --input-range 4,8 --output-range 2,4)
  DISTINCT=${DISTINCT:-2}
  T_KERNELS=${T_KERNELS:-120} T_NF4=${T_NF4:-60} T_GRAPHS=${T_GRAPHS:-120}
  T_SWEEP=${T_SWEEP:-120} T_BASELINES=${T_BASELINES:-120}
else
  OUT=${OUT:-benchmarks/results/gpu-$(date +%Y%m%d-%H%M%S)}
  MODEL=${MODEL:-benchmarks/presets/llama-2-7b}
  KERNEL_ARGS=()
  NF4_ARGS=()
  GRAPH_ARGS=()
  SWEEP_ADAPTERS=${SWEEP_ADAPTERS:-0,1,100,1000}
  NF4_ADAPTERS=${NF4_ADAPTERS:-$SWEEP_ADAPTERS}
  BASELINE_ADAPTERS=${BASELINE_ADAPTERS:-0,1}
  BASELINES=${BASELINES:-}
  BF16_BASELINES=""
  SIZES=(--num-requests "${SWEEP_REQUESTS:-32}" --rate "${SWEEP_RATE:-4}"
    --input-range 8,512 --output-range 8,512)
  DISTINCT=${DISTINCT:-100}
  T_EXACT=${T_EXACT:-180}
  T_KERNELS=${T_KERNELS:-60} T_NF4=${T_NF4:-45} T_GRAPHS=${T_GRAPHS:-135}
  T_SWEEP=${T_SWEEP:-90} T_BASELINES=${T_BASELINES:-300}
fi
W2=(--model "$MODEL" --load-format dummy --ranks "${SWEEP_RANKS:-8}"
  --targets "${SWEEP_TARGETS:-q_proj,k_proj,v_proj,o_proj}" "${SIZES[@]}"
  --cv 1 --alpha "${SWEEP_ALPHA:-1}" --seed 42)

mkdir -p "$OUT"
echo "results: $OUT (smoke: $SMOKE, python: $PY, loraserve: ${LS[*]})"
SUITE_START=$(date +%s.%N)

seconds() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }

# step NAME TIMEOUT_S COMMAND...: run one step, its output teed to $OUT/NAME.log. A step that
# fails or runs out of time is recorded and the suite goes on (a GPU is lent once: the other
# steps' numbers are still worth having); the suite's exit status says whether any failed.
FAILED=()
step() {
  local name=$1 limit=$2
  shift 2
  if [[ -n "${STEPS:-}" && " $STEPS " != *" $name "* ]]; then
    echo "== $name: not in STEPS"
    return
  fi
  echo "== $name (timeout ${limit}s): $*"
  local start end status=0
  start=$(date +%s.%N)
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log" || status=$?
  end=$(date +%s.%N)
  if [[ $status != 0 ]]; then
    FAILED+=("$name")
    echo "== $name: FAILED (exit $status; 124 = timed out)" | tee -a "$OUT/timings.txt"
  fi
  echo "== $name: $(seconds "$start" "$end") s" | tee -a "$OUT/timings.txt"
}

if [[ "$SMOKE" != 1 ]]; then
  step exactness "$T_EXACT" "$PY" -m pytest -v -p no:cacheprovider -rfE -n "${EXACT_WORKERS:-8}" \
    tests/kernels tests/engine/test_multilora.py tests/engine/test_decode_graphs.py \
    tests/engine/test_nf4_model.py tests/engine/test_lora_launches.py
fi
step kernels "$T_KERNELS" "$PY" benchmarks/lora_kernels.py --out "$OUT/kernels" "${KERNEL_ARGS[@]}"
step nf4 "$T_NF4" "$PY" benchmarks/nf4.py --out "$OUT/nf4" "${NF4_ARGS[@]}"
step graphs "$T_GRAPHS" "$PY" benchmarks/decode_graphs.py --out "$OUT/graphs" "${GRAPH_ARGS[@]}"

if [[ "$SKIP_SWEEP" == 1 ]]; then
  echo "== sweeps skipped (SKIP_SWEEP=1)"
else
  # The baselines are benchmark code, not part of loraserve bench: a sweep with them beside
  # loraserve is benchmarks/sweep_baselines.py (loraserve bench sweep's flags and --baselines).
  if [[ -n "$BF16_BASELINES" ]]; then
    BF16_SWEEP=("$PY" benchmarks/sweep_baselines.py --baselines "$BF16_BASELINES")
  else
    BF16_SWEEP=("${LS[@]}" bench sweep)
  fi
  step sweep-bf16 "$T_SWEEP" "${BF16_SWEEP[@]}" "${W2[@]}" --quantization none \
    --adapters "$SWEEP_ADAPTERS" --distinct-adapters "$DISTINCT" --out "$OUT/sweep-bf16"
  # On the CPU every step is eager already: the smoke run skips this repeat of sweep-bf16.
  if [[ "$SMOKE" != 1 ]]; then
    step sweep-bf16-eager "$T_SWEEP" "${LS[@]}" bench sweep "${W2[@]}" --quantization none \
      --adapters "$SWEEP_ADAPTERS" --distinct-adapters "$DISTINCT" \
      --enforce-eager --out "$OUT/sweep-bf16-eager"
  fi
  step sweep-nf4 "$T_SWEEP" "${LS[@]}" bench sweep "${W2[@]}" --quantization nf4 \
    --adapters "$NF4_ADAPTERS" --distinct-adapters "$DISTINCT" --out "$OUT/sweep-nf4"
  # Tensor parallelism needs several GPUs: with one (or the CPU of a smoke run), N = 1 only.
  GPUS=0
  if [[ "$SMOKE" != 1 ]] && command -v nvidia-smi >/dev/null; then
    GPUS=$(nvidia-smi -L | wc -l)
  fi
  TP=${TP:-$((GPUS > 8 ? 8 : GPUS))}
  if [[ $TP -ge 2 ]]; then
    step tp-collectives 60 "$PY" benchmarks/tp_collectives.py --world "$TP" --backend nccl \
      --out "$OUT/tp-collectives/tp_collectives.json"
    step sweep-tp "$T_SWEEP" "${LS[@]}" bench sweep "${W2[@]}" --quantization none \
      --adapters "$SWEEP_ADAPTERS" --distinct-adapters "$DISTINCT" \
      --tensor-parallel-size "$TP" --enforce-eager --out "$OUT/sweep-tp$TP"
  else
    echo "== sweep-tp skipped: $GPUS GPU(s) here, tensor parallelism needs 2 or more"
  fi
  if [[ -n "$BASELINES" ]]; then
    step sweep-baselines "$T_BASELINES" "$PY" benchmarks/sweep_baselines.py "${W2[@]}" \
      --quantization none --adapters "$BASELINE_ADAPTERS" --baselines "$BASELINES" \
      --out "$OUT/sweep-baselines"
  fi
  # The adapters are scratch: regenerated from the seed, and up to GBs each.
  rm -rf "$OUT"/sweep-*/adapters
fi

SUITE_END=$(date +%s.%N)
echo "== suite: $(seconds "$SUITE_START" "$SUITE_END") s, results in $OUT" | tee -a "$OUT/timings.txt"
if [[ ${#FAILED[@]} != 0 ]]; then
  echo "== failed steps: ${FAILED[*]}" | tee -a "$OUT/timings.txt"
  exit 1
fi
