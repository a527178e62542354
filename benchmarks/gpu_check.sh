#!/usr/bin/env bash
# The GPU benchmarks of issue 4, as ONE script for one session of at most ~9 minutes on an H100.
#
# Prerequisites, on the machine with the network (the GPU machine has none):
#     bash benchmarks/fetch_wheels.sh        # trl, datasets, rapidfuzz, dill, multiprocess -> benchmarks/wheels/
# benchmarks/wheels/ is git-ignored, so it must travel explicitly (device tool: carry ["benchmarks/wheels"]).
#
# On the GPU machine, from the repository root:
#     OUT=/some/dir bash benchmarks/gpu_check.sh
#
# Steps (each guarded by `timeout`, all within BUDGET_S seconds, default 530):
#   1. install the wheels (--no-deps, into a separate directory) and use this checkout's prefdiag via PYTHONPATH
#   2. qwen0.5b side by side: prefdiag compare (cold cache), again (warm cache), TRL DPOTrainer.evaluate (bf16,
#      batch 8) -> $OUT/qwen_side_by_side.json
#   3. qwen0.5b, prefdiag --layout packed (FlexAttention), first run only -> $OUT/qwen_packed.json
#   4. llama8b (Llama-3-8B shape, built on the GPU), prefdiag --layout packed: MFU, peak memory, compile time
#      (first_batch_seconds) -> $OUT/llama8b_packed.json
#   5. llama8b, prefdiag default layout -> $OUT/llama8b.json (measured before: runs if time is left)
#   6. precision on qwen0.5b: fp32 truth vs prefdiag bf16 vs emulated TRL/naive bf16 -> $OUT/qwen_precision.json
#      (measured before: runs if time is left)
# Everything printed also goes to $OUT/gpu_check.log; $OUT/env.txt records the machine and package versions.
# At most 8 files come back from $OUT; this script writes 7.
set -u -o pipefail

cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1

BUDGET_S=${BUDGET_S:-530}
PY=${PYTHON:-python3}
QWEN_PAIRS=${QWEN_PAIRS:-1024}
PRECISION_PAIRS=${PRECISION_PAIRS:-128}
LLAMA_PAIRS=${LLAMA_PAIRS:-256}
STEPS=${STEPS:-"qwen-side-by-side qwen-packed llama8b-packed llama8b qwen-precision"}
PACKED=${PACKED:-"--layout packed"}  # prefdiag options of the packed steps (e.g. add --batch-tokens 32768)
# For a dry run without a GPU: DEVICE=cpu LAYERS=1 QWEN_PAIRS=8 PRECISION_PAIRS=4 STEPS=... (not a measurement)
DEVICE=${DEVICE:-cuda}
LAYERS=${LAYERS:-}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1

progress() { echo "=== [$(date +%H:%M:%S) +${SECONDS}s] $*"; }
wanted() { case " $STEPS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

# step NAME LIMIT_S CMD...: run CMD under `timeout`, cut to what is left of the budget; never aborts the script.
step() {
    local name=$1 limit=$2
    shift 2
    if [ "$name" != install ] && ! wanted "$name"; then
        progress "SKIP $name: not in STEPS"
        return 0
    fi
    local left=$((BUDGET_S - SECONDS - 5))
    if [ "$left" -lt 20 ]; then
        progress "SKIP $name: ${left}s left of the ${BUDGET_S}s budget"
        return 1
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    progress "START $name (limit ${limit}s)"
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    [ "$rc" = 124 ] && progress "TIMEOUT $name after ${limit}s" || progress "END $name rc=$rc"
    return $rc
}

# Models and data go where there is most room (llama8b needs ~32 GB for two bf16 copies).
if [ -z "${WORK:-}" ]; then
    WORK=/tmp/prefdiag-bench
    best=0
    for dir in /tmp /var/tmp "$HOME" "$PWD/.."; do
        avail=$(df -Pk "$dir" 2>/dev/null | awk 'NR==2 {print $4}')
        if [ -n "$avail" ] && [ "$avail" -gt "$best" ]; then best=$avail; WORK=$dir/prefdiag-bench; fi
    done
fi
mkdir -p "$WORK"

progress "environment"
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
    "$PY" -V
    lscpu | head -20 || true
    free -g || true
    df -h "$WORK" || true
    echo "WORK=$WORK OUT=$OUT BUDGET_S=$BUDGET_S"
    git log -1 --format='prefdiag commit %h %s' 2>/dev/null || true
    git status --porcelain -- prefdiag 2>/dev/null | head -20 || true
} | tee "$OUT/env.txt"

progress "install wheels"
if ls benchmarks/wheels/*.whl >/dev/null 2>&1; then
    step install 90 "$PY" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check \
        --target /tmp/bench-site benchmarks/wheels/*.whl
else
    progress "no benchmarks/wheels/*.whl: run benchmarks/fetch_wheels.sh and carry benchmarks/wheels"
fi
export PYTHONPATH="$PWD:/tmp/bench-site${PYTHONPATH:+:$PYTHONPATH}"
"$PY" - <<'EOF' 2>&1 | tee -a "$OUT/env.txt"
import importlib
for name in ("torch", "transformers", "accelerate", "peft", "tokenizers", "datasets", "trl", "rapidfuzz", "pandas",
             "pyarrow", "huggingface_hub", "prefdiag"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '?')} {getattr(module, '__file__', '')}")
    except Exception as exc:  # report and go on: the steps that need it will fail visibly
        print(f"{name} MISSING: {type(exc).__name__}: {exc}")
import torch
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF

BENCH=("$PY" benchmarks/bench_compare.py --device "$DEVICE" --dtype bfloat16 --work "$WORK" ${LAYERS:+--layers "$LAYERS"})

step qwen-side-by-side 180 "${BENCH[@]}" --shape qwen0.5b --pairs "$QWEN_PAIRS" --batch-size 8 \
    --deadline 175 --json "$OUT/qwen_side_by_side.json"

# The packed steps include compiling the attention kernel and the block masks (first_batch_seconds).
step qwen-packed 130 "${BENCH[@]}" --shape qwen0.5b --pairs "$QWEN_PAIRS" --skip-trl --skip-second \
    --prefdiag-args "$PACKED" --deadline 125 --json "$OUT/qwen_packed.json"

step llama8b-packed 220 "${BENCH[@]}" --shape llama8b --pairs "$LLAMA_PAIRS" --skip-trl --skip-second \
    --prefdiag-args "$PACKED" --deadline 215 --json "$OUT/llama8b_packed.json"

step llama8b 120 "${BENCH[@]}" --shape llama8b --pairs "$LLAMA_PAIRS" --skip-trl --skip-second \
    --deadline 115 --json "$OUT/llama8b.json"

left=$((BUDGET_S - SECONDS - 10))
step qwen-precision 100 "${BENCH[@]}" --shape qwen0.5b --pairs "$QWEN_PAIRS" --precision \
    --precision-pairs "$PRECISION_PAIRS" --deadline "$left" --json "$OUT/qwen_precision.json"

progress "done; results in $OUT:"
ls -la "$OUT"
