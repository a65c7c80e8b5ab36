#!/usr/bin/env bash
# The GPU rows of BENCHMARKS.md that are still open, in one run of under 8 minutes on one H100 / H200:
#
#   bash benchmarks/gpu_check.sh            # on a CUDA machine, from the repository root; results in $OUT
#   GPU_CHECK_DRY=1 bash benchmarks/gpu_check.sh   # tiny settings on the CPU: checks this script in ~2 minutes
#
# Needs python3 with torch and numpy, the repository and nothing else (no network, no dataset, no VAE, no install:
# our package runs from src/ through PYTHONPATH, the benchmark harness from benchmarks/bench; torchdiffeq is not
# needed). Each run writes OUT/<name>.json and OUT/<name>.log; a Markdown summary ends the output
# (benchmarks/summarize.py). Runs, in order, each cut off with `timeout` so that a slow one cannot eat the others'
# time:
#   1 latents   a synthetic latent cache in extract-latents' format (2048 images, 256 px -> 32x32x4)   ~5 s
#   2 step      `disploss bench` train section: one SiT-XL/2 training step alone (bf16 + compile, batch 256,
#               no dispersive term), synthetic latents already on the GPU: the step-only images/s        ~1.5-2 min
#   3 train     train.py itself, the real command line: `torchrun --nproc_per_node=1 train.py` (NCCL), the cache of
#               run 1 (--latents: loader workers, pinned memory), the same model, batch, bf16 and compile, logging,
#               EMA, the final checkpoint; 120 steps, a log line every 20. train_vs_step.json: the median images/s
#               of the log intervals after the first (which holds the compile) against run 2's number  ~3 min
#   4 profile   the XL/2 step (bf16, eager, batch 256) under torch.profiler: device-time shares of attention,
#               matmuls, optimizer, EMA and the rest, the top ops, a Chrome trace (OUT/profile.trace.json.gz)   ~30 s
#   5 paths     sampling code paths of SiT-XL/2 interleaved (bench paths section): dopri5 with one step size per
#               batch (the previous default) and per image, ab2 with 11 grid points eager / compile / bf16 at
#               batch 32 and 256; only when at least 150 s are left                                          ~2 min
#   6 (GPU_CHECK_ALL=1 only) the runs of the first GPU session: the dispersive loss alone and the reference's
#               configuration (TF32, eager, batch 32); their results are in benchmarks/results-h200/.
# Environment: OUT (default /tmp/disploss-gpu), PYTHON (python3), BUDGET_S (460), BATCH (training batch; default
# 256 where the GPU has >= 120 GiB, else 128), TRAIN_STEPS (120), REF_PATH (a reference checkout, run 6),
# GPU_CHECK_DRY=1 (tiny settings on the CPU, no compile).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/disploss-gpu}
PY=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-460}
TRAIN_STEPS=${TRAIN_STEPS:-120}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
START=$(date +%s)
left() { echo $((BUDGET_S - ($(date +%s) - START))); }
say() { echo "=== [gpu_check +$(($(date +%s) - START))s] $*"; }

if [ "${GPU_CHECK_DRY:-0}" = 1 ]; then
  DEV=(--device cpu --threads 1); TRAIN_DEV=(--device cpu)
  MODEL=SiT-T/2; IMAGE=64; CLASSES=10; COUNT=64
  STEPS=(--steps 2 --warmup 1); COMPILE=(); MEM_GIB=0; LOG_EVERY=5; TRAIN_STEPS=20; SAMPLE_BATCHES=2,4
  export OMP_NUM_THREADS=1
else
  DEV=(--device cuda); TRAIN_DEV=(--device cuda)
  MODEL=SiT-XL/2; IMAGE=256; CLASSES=1000; COUNT=2048
  STEPS=(--steps 10 --warmup 3); COMPILE=(--compile); LOG_EVERY=20; SAMPLE_BATCHES=32,256
  MEM_GIB=$("$PY" -c "import torch; print(torch.cuda.get_device_properties(0).total_memory // 2**30)" 2>/dev/null || echo 0)
fi
if [ -n "${BATCH:-}" ]; then TRAIN_BATCH=$BATCH
elif [ "${GPU_CHECK_DRY:-0}" = 1 ]; then TRAIN_BATCH=8
elif [ "$MEM_GIB" -ge 120 ]; then TRAIN_BATCH=256
else TRAIN_BATCH=128
fi
XL=(--model "$MODEL" --image-size "$IMAGE" --num-classes "$CLASSES")

say "environment"
{
  date
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
  "$PY" - <<'EOF'
import importlib.util, os, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "cudnn", torch.backends.cudnn.version(), "cpus", os.cpu_count())
print("gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
for mod in ("numpy", "triton", "torchdiffeq", "diffusers"):
    print(f"{mod}: {'yes' if importlib.util.find_spec(mod) else 'MISSING'}")
EOF
  echo "model ${MODEL}, GPU memory ${MEM_GIB} GiB -> training batch ${TRAIN_BATCH}; budget ${BUDGET_S} s"
} 2>&1 | tee "$OUT/environment.txt"

# run NAME SECONDS COMMAND...: one process, cut off after SECONDS (at least 30); output in OUT/NAME.log.
run() {
  local name=$1 limit=$2
  shift 2
  [ "$limit" -lt 30 ] && limit=30
  say "$name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  say "$name finished with status $rc"
  return "$rc"
}
bench() { local name=$1 limit=$2; shift 2; run "$name" "$limit" "$PY" -u -m disploss bench "$@" --json "$OUT/$name.json"; }

# 1 latents
rm -rf "$OUT/latents"
run latents 60 "$PY" -m benchmarks.bench.latents "$OUT/latents" --count "$COUNT" --image-size "$IMAGE" \
  --num-classes "$CLASSES"

# 2 the step alone (what train.py runs each step), one compile
bench step 180 "${DEV[@]}" "${XL[@]}" --sections train --train-variants nodisp --precision bf16 "${COMPILE[@]}" \
  --batch "$TRAIN_BATCH" "${STEPS[@]}"

# 3 train.py, one process under torchrun (NCCL on CUDA, gloo in the dry run)
rm -rf "$OUT/train-results"
run train $(($(left) - 70)) "$PY" -m torch.distributed.run --standalone --nnodes=1 --nproc_per_node=1 train.py \
  --model "$MODEL" --image-size "$IMAGE" --num-classes "$CLASSES" --latents "$OUT/latents" \
  --global-batch-size "$TRAIN_BATCH" --precision bf16 "${COMPILE[@]}" --max-steps "$TRAIN_STEPS" \
  --log-every "$LOG_EVERY" --ckpt-every 1000000 --sample-every 0 --results-dir "$OUT/train-results" "${TRAIN_DEV[@]}"
"$PY" - "$OUT" <<'EOF'
import glob, json, statistics, sys
out = sys.argv[1]
try:
    step = json.load(open(f"{out}/step.json"))["train"]["ours_nodisp"]["images_per_sec"]
    (metrics,) = glob.glob(f"{out}/train-results/*/metrics.jsonl")
    rows = [json.loads(line) for line in open(metrics) if line.strip()]
    rows = [r for r in rows if "images_per_sec" in r][1:]  # the first interval holds the compile and the start
    rate = statistics.median(r["images_per_sec"] for r in rows)
    result = {"train_vs_step": {"train_images_per_sec": rate, "step_images_per_sec": step, "ratio": rate / step,
                                "intervals": len(rows), "first_step": rows[0]["step"], "last_step": rows[-1]["step"],
                                "per_interval": [r["images_per_sec"] for r in rows]}}
    json.dump(result, open(f"{out}/train_vs_step.json", "w"), indent=2)
    print(f"train.py {rate:.1f} img/s vs the step alone {step:.1f} img/s: {100 * rate / step:.1f}%")
except (OSError, ValueError, KeyError, IndexError, statistics.StatisticsError) as err:
    print(f"no train.py / step comparison: {type(err).__name__}: {err}")
EOF
rm -rf "$OUT/train-results"/*/checkpoints  # ~11 GB for XL/2 (model, EMA, optimizer)

# 4 profile of the step, eager bf16 (the op-level view; compile fuses the elementwise ops)
bench profile 60 "${DEV[@]}" "${XL[@]}" --sections profile --precision bf16 --batch "$TRAIN_BATCH" --warmup 2 \
  --profile-steps 3

# 5 sampling paths
if [ "$(left)" -ge 150 ]; then
  bench paths $(($(left) - 5)) "${DEV[@]}" "${XL[@]}" --sections paths --precision tf32 --paths-batches "$SAMPLE_BATCHES" \
    --steps 2 --warmup 1
else
  say "paths skipped: only $(left) s left"
fi

# 6 the first session's runs, on request
if [ "${GPU_CHECK_ALL:-0}" = 1 ]; then
  REF=(); [ -n "${REF_PATH:-}" ] && REF=(--reference-path "$REF_PATH")
  bench disp 120 "${DEV[@]}" --sections disp --precision tf32 "${STEPS[@]}"
  bench ref_tf32 150 "${DEV[@]}" "${XL[@]}" --sections train --precision tf32 --batch 32 "${STEPS[@]}" "${REF[@]}"
fi

say "summary (also in $OUT/summary.md)"
"$PY" benchmarks/summarize.py "$OUT"/*.json | tee "$OUT/summary.md"
say "done in $(($(date +%s) - START)) s"
