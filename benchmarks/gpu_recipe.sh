#!/usr/bin/env bash
# The full-size (GPU) recipe in one call on a GPU machine: data, training-speed benchmark, 60-epoch training, and the
# lossless test-subset evaluation beside BM3D. Results land in $OUT (the device tool brings them back).
#
#   bash benchmarks/gpu_recipe.sh             # on the GPU machine, with .gpu/ and .whl/ carried along
#   SMOKE=1 bash benchmarks/gpu_recipe.sh     # a tiny CPU rehearsal of the same steps
#
# .gpu/ (git-ignored via .git/info/exclude, 49 MB) holds train_jpeg.npz (train_jpeg, train_offsets, y_train from
# ../shared/data/cifar10-jpeg.npz) and lossless_test.npz (x_test, y_test from cifar10-lossless-subset.npz); .whl/
# holds cp312 wheels the GPU image lacks (pydantic, pydantic-core, annotated-types, typing-inspection, bm3d, bm4d,
# PyWavelets). The device command installs .whl/ into /tmp/site first.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-recipe-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src:${PYTHONPATH:-}"
exec > >(tee "$OUT/log.txt") 2>&1

# The GPU recipe: batch 512 with the LR scaled to it, validation every 5 epochs (SSIM runs on the CPU).
RECIPE=(-S train.compile=true -S train.batch_size=512 -S train.lr=8e-4 -S train.warmup_epochs=2 -S train.val_every=5
        -S train.checkpoint_every=20 -S train.log_every=20 -S mlflow.log_model=false)
SPEED=(--batch 512 --steps 30 --warmup 5)
EVAL=(--n-images 1000 --bm3d-images 300 --ddim-steps 10,50 --workers 16)
TRAIN_LIMIT=330
if [ -n "${SMOKE:-}" ]; then
  RECIPE=(-S model.base_channels=8 -S model.channel_mult=[1,2] -S model.groups=4 -S model.num_heads=2
          -S train.epochs=1 -S train.max_train_images=64 -S train.batch_size=16 -S train.val_images=8
          -S train.device=cpu -S mlflow.log_model=false -S data.val_size=8)
  SPEED=(-S model.base_channels=8 --batch 4 --steps 1 --warmup 1)
  EVAL=(--n-images 8 --bm3d-images 2 --ddim-steps 2 --workers 2 --device cpu)
  TRAIN_LIMIT=120
fi

nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
time python3 benchmarks/gpu_prepare_data.py .gpu data/raw/cifar10.npz
python3 -m ddim_denoise.cli prepare "${RECIPE[@]}" -S data.val_size=5000 ${SMOKE:+-S data.val_size=8} || exit 1

if [ -z "${SKIP_SPEED:-}" ]; then
echo "=== training speed (eager)"
timeout 60 python3 benchmarks/train_speed.py "${SPEED[@]}" --modes fp32,bf16,bf16_cl
fi

echo "=== full recipe"
time timeout "$TRAIN_LIMIT" python3 -m ddim_denoise.cli train "${RECIPE[@]}"
cp training/summary.json training/steps.csv training/val.csv "$OUT"/ 2>/dev/null

echo "=== lossless test subset"
timeout 150 python3 benchmarks/eval_lossless.py --checkpoint models/best.pt --data .gpu/lossless_test.npz "${EVAL[@]}" \
  | tee "$OUT/lossless_table.md"

echo "=== the EMA weights in fp16 (fits the 16 MB return limit)"
python3 - "$OUT/gpu_ema_fp16.pt" <<'PY'
import sys, torch
from ddim_denoise.checkpoint import load_checkpoint, save_checkpoint
state = load_checkpoint("models/best.pt")
save_checkpoint(sys.argv[1], {"params": state["params"], "epoch": state["epoch"],
                              "ema": {k: v.half() if v.is_floating_point() else v for k, v in state["ema"].items()}})
PY

[ -n "${SKIP_SPEED:-}" ] && exit 0
echo "=== training speed (torch.compile)"
timeout 90 python3 benchmarks/train_speed.py "${SPEED[@]}" --modes bf16_cl,bf16_cl_compile
