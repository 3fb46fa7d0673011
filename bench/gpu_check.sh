#!/usr/bin/env bash
# The GPU figures, in two parts that each fit one device call (under 8 minutes):
#
#     OUT=/tmp/gpu bash bench/gpu_check.sh util SHAPES_DIR [HELA_DIR]
#     OUT=/tmp/gpu bash bench/gpu_check.sh handover [SHAPES_DIR]
#
# `util` (issue 24): how busy a `default.yaml` search keeps the GPU with 1, 2 and 4 workers per
# GPU, on each data folder, 50 s of searching each (bench/gpu_util.py: nvidia-smi sampling,
# epochs and trial-equivalents per hour, each worker's device, precision and threads).
# `handover`: the CUDA path and GPU throughput: the training step by layout and the loader with
# augmentation processes (bench/train.py), stitched inference against MONAI (bench/infer.py),
# then the handover on `shapes` as a user runs it on a GPU: a search with two workers on one GPU
# (bf16 autocast, channels_last, pinned memory, augmentation processes), rescoring, the final
# fit, the recipe trained on the same split, both scored on the test images by `evaluate` on
# CUDA, and `predict` on CUDA. Everything is logged under $OUT.
#
# On a machine without our dependencies, wheels in .whl/ are installed to /tmp/site first.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
PART=${1:-util}
DATA=$(realpath "${2:-../shared/datasets/shapes}")
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit 1
fi
# the project itself (the workers' fork server imports the installed packages); no index needed
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, optuna; print('torch', torch.__version__, torch.cuda.get_device_name(0), 'optuna', optuna.__version__)"
nproc
if [ "$PART" = util ]; then
    folders=(--data "$DATA")
    [ -n "${3:-}" ] && folders+=(--data "$(realpath "$3")")
    timeout 470 python3 bench/gpu_util.py "${folders[@]}" --seconds 50 --out "$OUT/util" 2>&1 \
        | tee "$OUT/util.txt"
    rm -f "$OUT"/util/*.db*; rm -rf "$OUT"/util/util-*/
    exit 0
fi
echo "== bench/train.py"
timeout 150 python3 bench/train.py --device cuda --steps 30 --repeats 3 --processes 0 4 2>&1 \
    | tee "$OUT/train.txt"
echo "== bench/infer.py"
timeout 90 python3 bench/infer.py --device cuda 2>&1 | tee "$OUT/infer.txt"
echo "== bench/handover.py (GPU)"
start=$(date +%s)
timeout 330 python3 bench/handover.py --data "$DATA" --out "$OUT/handover" \
    --search-args "--gpus all --workers-per-gpu 2" 2>&1 | tee "$OUT/handover.txt"
echo "handover wall: $(( $(date +%s) - start )) s"
tail -25 "$OUT/handover/search.log"
echo "== predict on CUDA"
timeout 60 python3 train_optuna.py predict --model "$OUT/handover/reports/handover/best.pt" \
    --images "$DATA/images" --out "$OUT/predictions" --device cuda 2>&1 | tail -3
ls "$OUT/predictions" | wc -l
rm -rf "$OUT/predictions" "$OUT/handover/storage"
