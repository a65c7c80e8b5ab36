#!/usr/bin/env bash
# The GPU rows of BENCHMARKS.md in one run: about 5-7 minutes on one H100 / H200, compile warm-up included.
#
#   bash benchmarks/gpu_check.sh            # on a CUDA machine, from the repository root; results in $OUT
#
# Needs python3 with torch (and numpy); not our package's other dependencies: `import disploss` is lazy and
# the bench imports torch, numpy and our own modules only (torchdiffeq, if present, for dopri5; without it
# dopri5 is reported as skipped). Each run writes OUT/<name>.json and OUT/<name>.log; a summary in Markdown
# ends the output (benchmarks/summarize.py). Runs, cheapest first so a cut-off run still leaves numbers:
#   1 disp      the dispersive loss alone, ours vs the reference formula, B=32, M=256*1152, float32
#               with TF32 allowed (as in training)                                                ~20 s
#   2 ref_tf32  the reference's configuration: SiT-XL/2 256 px, TF32, no compile, local batch 32,
#               with and without disp                                                             ~40 s
#   3 xl_bf16   SiT-XL/2 256 px (32x32x4 latents), bf16 autocast + torch.compile, batch 256 where the
#               GPU has >= 120 GiB (H200), else 128 (H100: 256 does not fit without checkpointing),
#               with and without disp, MFU; retried at half the batch after an out-of-memory error
#               while at least 200 s are left; eager (no compile) when less than 240 s are left     ~3-4 min (2 compiles)
#   4 sample    SiT-XL/2 sampling at batch 256 (eager bf16), dopri5 (adaptive, capped at 300 NFE)
#               and Heun (50 grid points = 98 NFE), 2 batches each                                ~1-1.5 min
# Environment: OUT (default /tmp/disploss-gpu), PYTHON (python3), BUDGET_S (420: later runs get the time
# left, each is cut off with `timeout`), BATCH (override the training batch of run 3), REF_PATH (a reference
# checkout for --reference-path; its models.py needs timm), GPU_CHECK_DRY=1 (tiny settings on the CPU: checks
# this script in seconds).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/disploss-gpu}
PY=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-420}
mkdir -p "$OUT"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
START=$(date +%s)
left() { echo $((BUDGET_S - ($(date +%s) - START))); }
say() { echo "=== [gpu_check +$(($(date +%s) - START))s] $*"; }

if [ "${GPU_CHECK_DRY:-0}" = 1 ]; then
  DEV=(--device cpu --threads 1)
  XL=(--model SiT-T/2 --input-size 8 --num-classes 10)
  DISP=(--disp-batch 8 --disp-dim 4096)
  STEPS=(--steps 2 --warmup 1)
  REF_BATCH=4; SAMPLE_BATCH=2; COMPILE=(); MEM_GIB=0
else
  DEV=(--device cuda)
  XL=(--model SiT-XL/2 --image-size 256)
  DISP=()
  STEPS=(--steps 10 --warmup 3)
  REF_BATCH=32; SAMPLE_BATCH=256; COMPILE=(--compile)
  MEM_GIB=$("$PY" -c "import torch; print(torch.cuda.get_device_properties(0).total_memory // 2**30)" 2>/dev/null || echo 0)
fi
if [ -n "${BATCH:-}" ]; then TRAIN_BATCH=$BATCH
elif [ "${GPU_CHECK_DRY:-0}" = 1 ]; then TRAIN_BATCH=8
elif [ "$MEM_GIB" -ge 120 ]; then TRAIN_BATCH=256
else TRAIN_BATCH=128
fi
REF=()
[ -n "${REF_PATH:-}" ] && REF=(--reference-path "$REF_PATH")

say "environment"
{
  date
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
  "$PY" - <<'EOF'
import importlib.util, os, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "cudnn", torch.backends.cudnn.version(), "cpus", os.cpu_count())
print("gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
for mod in ("numpy", "torchdiffeq", "triton", "timm"):
    print(f"{mod}: {'yes' if importlib.util.find_spec(mod) else 'MISSING'}")
EOF
  echo "GPU memory ${MEM_GIB} GiB -> training batch ${TRAIN_BATCH}; budget ${BUDGET_S} s"
} 2>&1 | tee "$OUT/environment.txt"

# run NAME SECONDS ARGS...: one bench process, cut off after SECONDS (at least 30).
run() {
  local name=$1 limit=$2
  shift 2
  [ "$limit" -lt 30 ] && limit=30
  say "$name (limit ${limit}s): disploss bench $*"
  timeout --kill-after=10 "$limit" "$PY" -u -m disploss bench "$@" --json "$OUT/$name.json" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  say "$name finished with status $rc"
  return "$rc"
}

# tf32 as in training (bf16 runs allow TF32 too): the Gram matmul of our loss then runs in TF32, the
# reference's pdist does not; the JSON's abs_diff shows what that costs in accuracy.
run disp 120 "${DEV[@]}" --sections disp --precision tf32 "${DISP[@]}" "${STEPS[@]}"

run ref_tf32 150 "${DEV[@]}" "${XL[@]}" --sections train --precision tf32 --batch "$REF_BATCH" "${STEPS[@]}" "${REF[@]}"

# Run 4 needs ~90 s: keep that back from run 3. Two compiles (with and without disp) take ~2-3 min; with
# less than 240 s left, run 3 goes eager (bf16, no compile) rather than be cut off.
if [ "${#COMPILE[@]}" -gt 0 ] && [ $(($(left) - 90)) -lt 240 ]; then
  say "only $(left) s left: run 3 without --compile"
  COMPILE=()
fi
if ! run xl_bf16 $(($(left) - 90)) "${DEV[@]}" "${XL[@]}" --sections train --precision bf16 "${COMPILE[@]}" \
     --batch "$TRAIN_BATCH" "${STEPS[@]}"; then
  if grep -q "OutOfMemoryError\|out of memory" "$OUT/xl_bf16.log" && [ "$(left)" -ge 200 ]; then
    TRAIN_BATCH=$((TRAIN_BATCH / 2))
    run xl_bf16_b${TRAIN_BATCH} $(($(left) - 90)) "${DEV[@]}" "${XL[@]}" --sections train --precision bf16 \
      "${COMPILE[@]}" --batch "$TRAIN_BATCH" "${STEPS[@]}"
  fi
fi

run sample "$(left)" "${DEV[@]}" "${XL[@]}" --sections sample --precision bf16 --samplers dopri5,heun2 \
  --sample-batch "$SAMPLE_BATCH" --sample-batches 2 --sample-steps 50 --max-nfe 300 --warmup 2 --steps 1

say "summary (also in $OUT/summary.md)"
"$PY" benchmarks/summarize.py "$OUT"/*.json | tee "$OUT/summary.md"
say "done in $(($(date +%s) - START)) s"
