#!/usr/bin/env bash
# Issue 11 on one GPU in one call: the CUDA tests of the fast paths, then bench_profile.py.
#   OUT=/tmp/out bash benchmarks/gpu_speed.sh [20b|120b] [extra bench_profile args...]
set -uo pipefail
OUT="${OUT:-/tmp/gpu_out}"
mkdir -p "$OUT"
repo="$(cd "$(dirname "$0")/.." && pwd)"
shape="${1:-20b}"
shift || true
export PYTHONUNBUFFERED=1
step() { echo "=== $* $(date -u +%H:%M:%S)" | tee -a "$OUT/steps.log"; }

step env
{ nvidia-smi -L; python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"; free -g | head -2; df -h /dev/shm | tail -1; } 2>&1 | tee "$OUT/env.txt"

if [ "$shape" = "20b" ]; then
  step cuda-tests
  (cd "$repo" && timeout 240 python3 -m pytest -q -rs -s -p no:cacheprovider tests/test_forward_fast.py \
    tests/test_forward.py tests/test_forward_trained.py tests/test_eaft_collector.py \
    tests/test_eaft_signals.py tests/test_eaftreap_scoring.py -k "Cuda or cuda or gpu or Gpu") \
    >"$OUT/cuda_tests.log" 2>&1
  tail -8 "$OUT/cuda_tests.log"
fi

step "bench-profile $shape"
python3 "$repo/benchmarks/bench_profile.py" --shape "$shape" --json "$OUT/bench_$shape.json" "$@" 2>&1 \
  | grep -v "ExpertsInterface" | tee "$OUT/bench_$shape.txt"
step done
