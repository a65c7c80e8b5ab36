#!/usr/bin/env bash
# The confirm stage of experiments/digits on a GPU, at a larger model and budget (issue 14's GPU path):
#
#   bash benchmarks/gpu_evidence.sh                     # on a CUDA machine, from the repository root
#   MODEL=SiT-B/2 STEPS=12800 bash benchmarks/gpu_evidence.sh
#
# Runs `disploss experiment digits` with --device cuda on the confirm stage's arms (the baseline and the screen's
# best three, experiments/digits/README.md), 3 seeds, 16 x 16 digits, and writes experiments/digits/confirm-gpu/
# (results.md, results.json, fid_vs_steps.png, sample grids) for the README's table, marked as GPU rows. Needs
# torch with CUDA, numpy, scikit-learn (the bundled digits), scipy and matplotlib; no network, no dataset.
# Environment: MODEL (SiT-S/2), STEPS (6400: twice the CPU confirm's), SEEDS (0,1,2), OUT
# (experiments/digits/confirm-gpu), PYTHON (python3), THREADS (4: the CPU side, the digit classifier and scoring).
# Estimate, not measured (no GPU was lent when this was written): SiT-S/2 on 16 x 16 x 3 at batch 64 is a few ms a
# step on an H100 / H200, so 12 runs of 6400 steps plus sampling should take well under 30 minutes.
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import torch, sklearn, scipy, matplotlib; assert torch.cuda.is_available(), 'no CUDA device'" || {
    echo "gpu_evidence: needs torch with a CUDA device, scikit-learn, scipy and matplotlib" >&2; exit 2; }
ARMS="baseline,infonce_l2+lam=0.05+tau=16,covariance,hinge"
"$PY" -m disploss experiment digits --device cuda --model "${MODEL:-SiT-S/2}" --arms "$ARMS" \
    --seeds "${SEEDS:-0,1,2}" --steps "${STEPS:-6400}" --evals 4 --image-size 16 --threads "${THREADS:-4}" \
    --out "${OUT:-experiments/digits/confirm-gpu}"
