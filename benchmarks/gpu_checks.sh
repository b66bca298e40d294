#!/usr/bin/env bash
# Everything this project checks on a GPU, in one go (CI has none): the CUDA test classes, the
# validate task through versa-run in bf16, the MoE-layer and decode benchmarks on gpt-oss-20b
# shapes, and the tiny playbook end to end on the GPU. Results go to $OUT (default /tmp/gpu_out).
#
#   bash benchmarks/gpu_checks.sh            # on a machine with one CUDA GPU and the project
#                                             # importable (pip install -e . or PYTHONPATH)
set -uo pipefail
OUT="${OUT:-/tmp/gpu_out}"
mkdir -p "$OUT"
repo="$(cd "$(dirname "$0")/.." && pwd)"
export PYTHONUNBUFFERED=1 VERSA_RUNNER_MIN_FREE_GB=1
if ! command -v versa-run >/dev/null; then  # a checkout without the console script
  mkdir -p /tmp/versa_bin && printf '#!/bin/sh\nexec python3 -m versa_runner "$@"\n' >/tmp/versa_bin/versa-run
  chmod +x /tmp/versa_bin/versa-run && export PATH="/tmp/versa_bin:$PATH"
fi
step() { echo "=== $* $(date -u +%H:%M:%S)" | tee -a "$OUT/steps.log"; }

step env
{ nvidia-smi -L; python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"; } 2>&1 | tee "$OUT/env.txt"

step cuda-tests
(cd "$repo" && python3 -m pytest -q -rs -s -p no:cacheprovider tests/test_forward.py \
  tests/test_forward_fast.py tests/test_forward_trained.py tests/test_validate.py \
  tests/test_eaft_collector.py tests/test_eaft_signals.py tests/test_eaftreap_scoring.py \
  -k "Cuda or cuda or gpu or Gpu") >"$OUT/cuda_tests.log" 2>&1
tail -5 "$OUT/cuda_tests.log"

step validate-bf16
(mkdir -p /tmp/gpu_validate && cd /tmp/gpu_validate &&
  versa-run --task validate_expert_math_toy --device cuda --dtype bfloat16 --no-detach &&
  cp reports/validate_gpt_oss_expert_math_toy.md "$OUT/validate_bf16.md") >"$OUT/validate.log" 2>&1
tail -3 "$OUT/validate.log"

step bench-moe
python3 "$repo/benchmarks/bench_moe.py" --tokens 4096 2>&1 | grep -v ExpertsInterface | tee "$OUT/bench_moe.txt"
python3 "$repo/benchmarks/bench_moe.py" --tokens 64 2>&1 | grep -v ExpertsInterface | tee -a "$OUT/bench_moe.txt"

step bench-decode
versa-run fixtures model /tmp/m20x2 --layers 2 --experts 32 --hidden 2880 --intermediate 2880 \
  --heads 64 --kv-heads 8 --head-dim 64 --sliding-window 128 --max-shard-bytes 4000000000 --overwrite \
  >"$OUT/m20x2.log" 2>&1
python3 "$repo/benchmarks/bench_decode.py" /tmp/m20x2 --batch-sizes 1,8,32 --prompt-len 128 \
  --new-tokens 128 --repeats 3 2>&1 | grep -E "^(device|batch)" | tee "$OUT/bench_decode.txt"

step bench-profile-20b
python3 "$repo/benchmarks/bench_profile.py" --shape 20b --seqs 2048,4096 --json "$OUT/bench_profile_20b.json" \
  2>&1 | grep -v ExpertsInterface | tee "$OUT/bench_profile_20b.txt"

step playbook-tiny
bash "$repo/scripts/playbook_tiny.sh" /tmp/gpu_playbook >"$OUT/playbook.log" 2>&1
echo "playbook exit $?" | tee -a "$OUT/steps.log"
cp /tmp/gpu_playbook/reports/*.md "$OUT/" 2>/dev/null
grep -h -E "device|gate verdict" "$OUT/playbook.log" | tail -3
step done
