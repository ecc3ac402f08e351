#!/usr/bin/env bash
# Everything that needs a GPU, in one run of at most ~8 minutes on one GPU: a short loan of a GPU
# machine measures it all at once (issue #24).
#
#   bash benchmarks/gpu_window.sh          # on the GPU machine
#   bash benchmarks/gpu_window.sh --cpu    # the same steps at toy sizes on the CPU: a dry run,
#                                          # so that the first GPU run does not fail on a typo
#
# Parts: bench_gpu.py (eager vs train.compile vs compile with CUDA graphs, bf16, channels_last,
# batch 256; DALI 'mixed' decode vs synthetic batches where DALI is installed), the GPU-only
# tests, and the early-exit timing of bench_models.py. Each part runs even when one before it
# failed, under its own time limit; a summary lists each part's exit code and seconds.
# Figures go to $OUT when it is set (the device tool's folder that comes back), else benchmarks/,
# in gpu_window_<date>_<device>/: copy them into benchmarks/ and commit them with the date.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # run from the checkout, uninstalled
py=${PYTHON:-python3}
cpu=0
[[ ${1:-} == --cpu ]] && cpu=1

if ((cpu)); then
  device=cpu
  bench=(--device cpu --models resnet50_opt msdnet26 --batch-size 4 --steps 2 --images 64
         --image-size 64 --compile-models resnet50_opt --compile-modes default
         --compile-backend aot_eager)
  models=(--models resnet50_ann msdnet26 --batch 2 --size 64 --reps 1)
else
  device=$("$py" -c 'import torch; print(torch.cuda.get_device_name().replace(" ", "_"))') || {
    echo "no CUDA GPU visible; for a dry run: bash $0 --cpu" >&2; exit 2; }
  bench=(--device cuda --batch-size 256 --steps 30)
  models=(--device cuda --models resnet50_ann msdnet26 --batch 64 --reps 10)
fi
out=${OUT:-benchmarks}/gpu_window_$(date +%F)_$device
mkdir -p "$out"
summary=$out/summary.txt
{ date -u; "$py" -c 'import torch, timm; print("torch", torch.__version__, "timm",
  timm.__version__, "cuda", torch.version.cuda)'; nvidia-smi -L 2>/dev/null; } > "$summary"

run_part() {  # name, seconds allowed, command...
  local name=$1 limit=$2 started=$SECONDS code
  shift 2
  echo "== $name: $*" | tee -a "$summary"
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  code=$?
  echo "   exit $code after $((SECONDS - started)) s (log: $out/$name.log)" | tee -a "$summary"
  tail -n 4 "$out/$name.log"
}

# The training step's images/s: eager, compiled, compiled + CUDA graphs (traces in /tmp: large).
run_part bench_gpu 330 "$py" benchmarks/bench_gpu.py "${bench[@]}" --out "$out" \
  --profiles /tmp/gpu_window_profiles
# Tests that skip without a GPU (DALI's 'mixed' decode), run where there is one.
if "$py" -c 'import pytest, nvidia.dali' 2>/dev/null; then
  run_part gpu_tests 60 "$py" -m pytest -q -p no:cacheprovider tests/test_dali.py -k "mixed or gpu" -rs
else
  echo "== gpu_tests: skipped, pytest or NVIDIA DALI is not installed here" | tee -a "$summary"
fi
# What stopping at an early exit saves, against the cost table's prediction.
run_part early_exits 90 "$py" benchmarks/bench_models.py "${models[@]}"
echo "figures: $out" | tee -a "$summary"
