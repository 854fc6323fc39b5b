#!/usr/bin/env bash
# Several `ddim-denoise sweep run` workers on one study at once, so that one GPU trains several trials side by side
# (Optuna hands each worker its own trials; a journal storage serves processes on one machine). Exits with the first
# failed worker's status once all have ended.
#   bash pipelines/sweep/gpu/workers.sh N [sweep run options...]
set -u
workers=$1
shift
pids=()
for _ in $(seq "$workers"); do
  ddim-denoise sweep run "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || { rc=$?; [ "$status" -ne 0 ] || status=$rc; }
done
exit "$status"
