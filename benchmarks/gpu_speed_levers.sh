#!/usr/bin/env bash
# The next GPU training-speed lever, measured in one device call against the recipe's step. Each row is params.yaml's
# model at batch 512, bf16, compiled with params.yaml's train.inductor (Inductor's layouts forced: README, *Full-size
# recipe on a GPU*, session 13); its "warm-up" is the compile and graph-capture time that a recipe's first epoch
# pays. Coordinate-descent tuning and max-autotune each compiled past their limits in session 13's call (max-autotune
# still tuning after 98 s), so a call measures one of them (LEVER) with all the time the first row leaves.
#
#   bash benchmarks/gpu_speed_levers.sh          # on the GPU machine, with .whl/ carried (gpu_recipe.sh's header)
#   LEVER=max_autotune bash benchmarks/gpu_speed_levers.sh  # default: coordinate_descent
#   SMOKE=1 bash benchmarks/gpu_speed_levers.sh  # a CPU rehearsal of the same rows on a tiny model (about 2 minutes)
#   DEADLINE=540 bash benchmarks/gpu_speed_levers.sh  # rows that no longer fit DEADLINE seconds are skipped, said so
# Compare img/s with session 13's H200 figures only on an H200 (the device tool's kind: nvidia-h200); on another card,
# the first row is the baseline.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-speed-levers}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src:${PYTHONPATH:-}"
exec > >(tee "$OUT/log.txt") 2>&1
DEADLINE=${DEADLINE:-540}
COMMON=(--batch 512 --steps 30 --warmup 5)
GRAPHS=bf16_cl_compile_cg        # the recipe's step: channels_last, CUDA graphs
AUTOTUNE=bf16_cl_compile_ma      # Inductor's own convolution / matmul templates, timed against cuDNN / cuBLAS
if [ -n "${SMOKE:-}" ]; then  # CUDA graphs and autotuning need a GPU; the rehearsal checks the rows' plumbing
  COMMON=(-S model.base_channels=8 -S model.groups=4 -S model.num_heads=2 --batch 4 --steps 1 --warmup 1 --device cpu)
  GRAPHS=bf16_cl_compile AUTOTUNE=bf16_cl_compile
fi

row() {  # row LIMIT ARGS...: one train_speed.py run, cut off at LIMIT seconds or at what is left of DEADLINE
  local left=$((DEADLINE - SECONDS - 5)) want=$1
  shift
  if [ "$left" -lt 30 ]; then echo "=== skipped, ${left} s left: $*"; return; fi
  echo "=== $* ($((DEADLINE - SECONDS)) s left)"
  timeout -k 10 $((want < left ? want : left)) python3 benchmarks/train_speed.py "${COMMON[@]}" "$@"
  local rc=$?
  [ "$rc" -eq 0 ] || echo "=== exit $rc$([ "$rc" -eq 124 ] && echo ': cut off at its time limit')"
}
nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null
row 150 --modes "$GRAPHS"  # the recipe's step (session 13: 21,589 img/s on an H200, 51 s warm-up; 8 s cached)
case "${LEVER:-coordinate_descent}" in
  coordinate_descent) row "$DEADLINE" --modes "$GRAPHS" --inductor coordinate_descent_tuning=True ;;  # block by block
  max_autotune) row "$DEADLINE" --modes "$AUTOTUNE" ;;
  *) echo "LEVER=${LEVER}: use coordinate_descent or max_autotune"; exit 2 ;;
esac
