#!/usr/bin/env bash
# Several `ddim-denoise sweep run` workers on one study at once, so that one GPU trains several trials side by side
# (Optuna hands each worker its own trials; a journal storage serves processes on one machine). Waits for all of them
# and exits with the status of the first, in start order, that failed. An interrupt or kill reaches every worker.
#   bash pipelines/sweep/gpu/workers.sh N [sweep run options...]
set -u
workers=${1:-}
if [[ ! $workers =~ ^[1-9][0-9]*$ ]]; then
  echo "workers.sh: the first argument must be the number of workers (1 or more), got '${workers}'" >&2
  exit 2
fi
shift
pids=()
trap 'kill -TERM "${pids[@]}" 2>/dev/null' INT TERM
for _ in $(seq "$workers"); do
  ddim-denoise sweep run "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid"
  rc=$?
  while [ "$rc" -gt 128 ] && kill -0 "$pid" 2>/dev/null; do  # wait was cut short by a trapped signal
    wait "$pid"
    rc=$?
  done
  [ "$status" -ne 0 ] || status=$rc
done
exit "$status"
