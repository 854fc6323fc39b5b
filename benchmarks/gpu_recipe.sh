#!/usr/bin/env bash
# The full-size (GPU) recipe in one call on a GPU machine: data, training-speed benchmark, 60-epoch training, the
# phase-2 fine-tune on original pixels (as in the CPU recipe), and the lossless test-subset evaluation. Results land
# in $OUT (the device tool brings them back, with the EMA weights in fp16 for a local BM3D comparison).
#
#   bash benchmarks/gpu_recipe.sh             # on the GPU machine, with .gpu/ and .whl/ carried along
#   SMOKE=1 bash benchmarks/gpu_recipe.sh     # a tiny CPU rehearsal of the same steps
#   DEADLINE=540 bash benchmarks/gpu_recipe.sh  # every step's time limit shrinks to fit DEADLINE seconds in all
#   SKIP_PHASE2=1 / SKIP_SPEED=1              # leave out the fine-tune (and its table) / the speed benchmarks
#   COMPILE_MODE=default                      # phase 1 compiled without CUDA graphs (train.compile_mode)
#
# .gpu/ (git-ignored via .git/info/exclude, 58 MB): `python benchmarks/gpu_prepare_data.py pack ../shared/data .gpu`.
# .whl/ (2.7 MB) holds the cp312 wheels the GPU image lacks: `pip download --only-binary=:all: --python-version 3.12
# --platform manylinux2014_x86_64 --no-deps -d .whl pydantic==2.14.4 pydantic-core==2.50.5 annotated-types
# typing-inspection`; the device command installs them into /tmp/site first. Together they stay under the 64 MiB a
# run may carry, so BM3D (and its wheels) stays home: the GPU table has no BM3D column, and
#   python benchmarks/eval_lossless.py --checkpoint $OUT/gpu_ema_fp16.pt --n-images 300 --bm3d-images 300 --ddim-steps ""
# pairs the returned weights with the cached BM3D estimates here.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-recipe-out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
ROOT=$PWD
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT/src:${PYTHONPATH:-}"
exec > >(tee "$OUT/log.txt") 2>&1
# Everything the steps write (data/, models*/, training/, mlruns/) goes to a scratch folder, not the checkout: a
# rehearsal at home must not replace the pipeline's data, models and MLflow store. What matters is copied to $OUT.
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-recipe-work.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
ln -s "$ROOT/.gpu" "$WORK/.gpu" && ln -s "$ROOT/benchmarks" "$WORK/benchmarks" && cp "$ROOT/params.yaml" "$WORK/"
cd "$WORK" || exit 1

# The GPU recipe is params.yaml's (since session 12): compiled on a GPU, each step replayed as CUDA graphs, batch 512
# with the LR scaled to it, validation every 5 epochs (SSIM runs on the CPU). Here only what a benchmark run changes.
RECIPE=(-S train.compile_mode="${COMPILE_MODE:-reduce-overhead}" -S train.checkpoint_every=20 -S train.log_every=20
        -S mlflow.log_model=false)
# Speed: cuDNN's algorithm search on and off (eager, so no compilation), then the recipe's step at twice and at its
# batch, with a profile of the latter.
SPEED_CUDNN=(--batch 512 --steps 30 --warmup 5 --modes bf16_cl --cudnn-benchmark off,on)
SPEED=(--batch 1024,512 --steps 30 --warmup 5 --profile 10)
SPEED_MODES=bf16_cl_compile_cg
# Phase 2: the phase-1 EMA weights fine-tuned on the ~3,600 training images with original pixels (small batch, no
# compilation: 43,000 images take seconds).
PHASE2=(-S data.originals=.gpu/cifar10-lossless-subset.npz -S data.originals_only=true
        -S data.prepared_dir=data/prepared-originals -S train.init_from=models/best.pt -S train.out_dir=models-phase2
        -S train.compile=false -S train.epochs=12 -S train.batch_size=64 -S train.lr=1e-4 -S train.warmup_epochs=0
        -S train.val_every=4)
EVAL=(--n-images 1000 --bm3d-images 0 --ddim-steps 10,50 --workers 16)
TRAIN_LIMIT=360  # 60 epochs took about 340 s on an H200 (session 10: 57 s of it compiling the first step)
# The device call has a hard limit: each step gets at most what is left of DEADLINE after the time the steps behind it
# need (RESERVE), so a slow step shortens itself, never the evaluation that gives its results a meaning.
DEADLINE=${DEADLINE:-540}
limit() {  # limit WANT RESERVE: seconds for a step that wants WANT while RESERVE must stay for the later steps
  local left=$((DEADLINE - SECONDS - $2))
  echo $(( left < $1 ? (left > 10 ? left : 10) : $1 ))
}
if [ -n "${SMOKE:-}" ]; then
  RECIPE=(-S model.base_channels=8 -S model.channel_mult=[1,2] -S model.groups=4 -S model.num_heads=2
          -S train.epochs=1 -S train.warmup_epochs=0 -S train.max_train_images=64 -S train.batch_size=16 -S train.val_images=8
          -S train.device=cpu -S mlflow.log_model=false -S data.val_size=8)
  PHASE2+=(-S train.epochs=1 -S train.val_every=1 -S train.max_train_images=32 -S train.batch_size=16)
  SPEED_CUDNN=(-S model.base_channels=8 --batch 4 --steps 1 --warmup 1 --modes bf16_cl --cudnn-benchmark off,on)
  SPEED=(-S model.base_channels=8 --batch 8,4 --steps 1 --warmup 1 --profile 2)
  SPEED_MODES=bf16_cl,bf16_cl_compile  # CUDA graphs need a GPU (on a CPU, reduce-overhead compiles for minutes)
  EVAL=(--n-images 8 --bm3d-images 0 --ddim-steps 2 --workers 2 --device cpu)
  TRAIN_LIMIT=120
fi

nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
time python3 benchmarks/gpu_prepare_data.py unpack .gpu data/raw/cifar10.npz || exit 1  # else prepare goes online
python3 -m ddim_denoise.cli prepare "${RECIPE[@]}" -S data.val_size=5000 ${SMOKE:+-S data.val_size=8} || exit 1

echo "=== full recipe"
# train.max_minutes ends the run after its last whole epoch that fits, so summary.json and a validated best.pt are
# written even when it runs long; the timeout stays as the hard stop (20 s later: start-up, the last validation).
PHASE1_LIMIT=$(limit "$TRAIN_LIMIT" 150)
time timeout "$PHASE1_LIMIT" python3 -m ddim_denoise.cli train "${RECIPE[@]}" \
  -S train.max_minutes="$(python3 -c "print(($PHASE1_LIMIT - 20) / 60)")"
cp training/summary.json training/steps.csv training/val.csv "$OUT"/ 2>/dev/null

LOSSLESS=.gpu/cifar10-lossless-subset.npz
if [ -z "${SKIP_PHASE2:-}" ]; then
  echo "=== phase 2: fine-tune on the original-pixel training images"
  python3 -m ddim_denoise.cli prepare "${RECIPE[@]}" "${PHASE2[@]}" || exit 1
  time timeout "$(limit 120 110)" python3 -m ddim_denoise.cli train "${RECIPE[@]}" "${PHASE2[@]}"
  mkdir -p "$OUT/phase2" && cp training/summary.json training/val.csv "$OUT/phase2/" 2>/dev/null
fi

echo "=== lossless test subset"
timeout "$(limit 60 90)" python3 benchmarks/eval_lossless.py --checkpoint models/best.pt --data $LOSSLESS "${EVAL[@]}" \
  --ddim-steps "" | tee "$OUT/phase1_table.md"
[ -z "${SKIP_PHASE2:-}" ] && timeout "$(limit 150 20)" python3 benchmarks/eval_lossless.py \
  --checkpoint models-phase2/best.pt --data $LOSSLESS "${EVAL[@]}" | tee "$OUT/lossless_table.md"

echo "=== the EMA weights of both phases in fp16 (each fits the 16 MB return limit)"
python3 - "$OUT" <<'PY'
import sys, torch
from ddim_denoise.checkpoint import load_checkpoint, save_checkpoint
from pathlib import Path
for source, name in [("models/best.pt", "gpu_phase1_ema_fp16.pt"), ("models-phase2/best.pt", "gpu_ema_fp16.pt")]:
    if not Path(source).exists():  # SKIP_PHASE2
        continue
    state = load_checkpoint(source)
    save_checkpoint(f"{sys.argv[1]}/{name}", {"params": state["params"], "epoch": state["epoch"], "ema": {
        k: v.half() if v.is_floating_point() else v for k, v in state["ema"].items()}})
PY

# Speed last, in whatever time is left.
[ -n "${SKIP_SPEED:-}" ] && exit 0
echo "=== training speed ($((DEADLINE - SECONDS)) s left)"
timeout "$(limit 60 120)" python3 benchmarks/train_speed.py "${SPEED_CUDNN[@]}"
timeout "$(limit 240 0)" python3 benchmarks/train_speed.py "${SPEED[@]}" --modes "$SPEED_MODES"
