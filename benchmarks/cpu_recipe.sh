#!/usr/bin/env bash
# The CPU recipe (at most 2 hours on 2 cores), then its figures on the lossless test subset beside BM3D.
#
#   bash benchmarks/cpu_recipe.sh              # ~1 h 35 min of training in bf16, ~15 min of evaluation (BM3D cached)
#   SMOKE=1 bash benchmarks/cpu_recipe.sh      # a one-minute rehearsal of the same steps on a tiny budget
#   PHASE1_LR=1e-3 bash benchmarks/cpu_recipe.sh -S "model.channel_mult=[1,2,3,4]"   # overrides: -S for both phases
#   PHASE1_FROM=benchmarks/results/cpu-recipe-bf16/phase1/best.pt OUT=... bash benchmarks/cpu_recipe.sh -S ...
#                                            # phase 2 (and the evaluation) only, from an existing phase-1 model
#
# Phase 1 trains on the full CIFAR-10 copy (JPEG pixels); phase 2 fine-tunes the phase-1 EMA weights on the
# training images whose original pixels ../shared/data/cifar10-lossless-subset.npz holds (official train 0-3999, the
# ~3,600 of them in our train split): a model trained on JPEG pixels alone learns JPEG's smoothing. Every key is a
# params.yaml key; the same lines work with `dvc exp run`. Results: $OUT/{phase1,phase2}/ and $OUT/*.md.
set -euo pipefail
OUT=${OUT:-benchmarks/results/cpu-recipe}
ORIGINALS=${ORIGINALS:-../shared/data/cifar10-lossless-subset.npz}
export PYTHONUNBUFFERED=1

# The winners of benchmarks/levers.py: a 1.5M U-Net without attention (no gain at the same images, ~25% slower) and
# without dropout, eps-prediction, noise levels drawn log-uniformly over the range denoising uses (sigma 0.05-0.6);
# and of benchmarks/levers-capacity.yaml: batch 16 (a CPU does as many img/s at batch 16 as at 64, and 4x the
# optimizer steps win more than a wider model would). train.amp stays on auto: bf16 on CPUs with AVX512-BF16, in
# contiguous memory (1.5x the fp32 speed at the same PSNR: benchmarks/levers-amp.yaml), which buys 10 epochs of
# phase 1 in the time fp32 needed for 7 (PHASE1_EPOCHS overrides).
COMMON=(-S model.base_channels=32 -S model.num_res_blocks=2 -S "model.attention_resolutions=[]" -S model.dropout=0.0
        -S diffusion.prediction=eps -S diffusion.t_sampling=log_uniform -S diffusion.sigma_min=0.05
        -S diffusion.sigma_max=0.6 -S train.batch_size=16 -S train.channels_last=false -S train.val_images=500
        -S train.val_every=1 -S train.checkpoint_every=1)
PHASE1=(-S train.epochs=${PHASE1_EPOCHS:-10} -S train.lr=${PHASE1_LR:-2e-3} -S train.warmup_epochs=0.2
        -S train.ema_decay=0.999 -S "train.out_dir=$OUT/phase1")
PHASE1_BEST=${PHASE1_FROM:-$OUT/phase1/best.pt}
PHASE2=(-S "data.originals=$ORIGINALS" -S data.originals_only=true -S data.prepared_dir=data/prepared-originals
        -S "train.init_from=$PHASE1_BEST" -S train.epochs=12 -S train.lr=2e-4 -S train.warmup_epochs=0
        -S train.ema_decay=0.999 -S "train.out_dir=$OUT/phase2")
EVAL=(--n-images 1000 --bm3d-images 300 --ddim-steps 10,50 --ddim-images 300 --workers 2)
PHASE1+=("$@")  # the caller's -S overrides come last, so they win in both phases
PHASE2+=("$@")
if [ -n "${SMOKE:-}" ]; then
  OUT=/tmp/cpu-recipe-smoke
  PHASE1_FROM=""  # the rehearsal trains its own tiny phase 1
  PHASE1_BEST=$OUT/phase1/best.pt
  COMMON+=(-S model.base_channels=8 -S "model.channel_mult=[1,2]" -S model.groups=4 -S train.max_train_images=256
           -S train.val_images=16)
  PHASE1+=(-S train.epochs=1 -S "train.out_dir=$OUT/phase1")
  PHASE2+=(-S train.epochs=1 -S "train.init_from=$PHASE1_BEST" -S "train.out_dir=$OUT/phase2")
  EVAL=(--n-images 8 --bm3d-images 2 --ddim-steps 2 --ddim-images 4 --workers 1 --cache-dir "$OUT/cache")
fi
mkdir -p "$OUT"

stage() { echo "=== $1 ($(date +%T))"; }
if [ -z "${PHASE1_FROM:-}" ]; then
  stage "phase 1: full training set"
  ddim-denoise prepare "${COMMON[@]}" "${PHASE1[@]}"
  time ddim-denoise train "${COMMON[@]}" "${PHASE1[@]}"
  cp -r training "$OUT/phase1/training"
fi
stage "phase 2: fine-tune on the original-pixel training images"
ddim-denoise prepare "${COMMON[@]}" "${PHASE2[@]}"
time ddim-denoise train "${COMMON[@]}" "${PHASE2[@]}"
cp -r training "$OUT/phase2/training"
stage "evaluation on the lossless test subset"
python benchmarks/eval_lossless.py --checkpoint "$PHASE1_BEST" --n-images "${EVAL[1]}" --bm3d-images 0 \
  --ddim-steps "" --device cpu | tee "$OUT/phase1_table.md"
python benchmarks/eval_lossless.py --checkpoint "$OUT/phase2/best.pt" "${EVAL[@]}" --device cpu \
  | tee "$OUT/phase2_table.md"
stage done
