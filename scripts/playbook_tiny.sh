#!/usr/bin/env bash
# The seed playbook (shared/seeds: validate, build pruned, EAFT parity of base and pruned,
# gate summary, decode bench) end to end on one target, with the trained tiny gpt-oss model
# and generated Harmony calibration packs instead of the 13 GB checkpoint and the hub packs.
#
#   bash scripts/playbook_tiny.sh [WORKDIR]          # this machine (the local target)
#   REMOTE_JUPYTER_URL=... bash scripts/playbook_tiny.sh   # a Jupyter/Kaggle server
#
# The step-by-step variant of `versa-run demo` (which runs the same playbook as ONE job, from
# recipes/tiny/playbook-tiny_demo.yaml): each step here is the command a user types for the real
# model, with small sizes, one run per step. A smoke test of a whole set-up before spending hours
# of GPU time on the real one.
set -euo pipefail
work="${1:-playbook_tiny}"
mkdir -p "$work"
cd "$work"
run() { echo "+ versa-run $*" >&2; versa-run "$@"; }

run fixtures model models/base --trained --overwrite
run fixtures packs packs --rows 192
packs="$PWD/packs/packs/reasoning_style_10k_v2/reasoning_style_10k_v2.parquet,$PWD/packs/tool_agentic_10k_v6.parquet,$PWD/packs/packs/calib_prompt_10000_v2/calib_prompt_10000_v2.parquet"

# 0) expert math sanity
run --task validate_expert_math_toy --trials 2 --no-detach

# 1) pruned checkpoint, budgeted per layer with a safety core (16 experts per layer here)
run --task build_pruned_20b_eaftreap_budgeted --no-detach \
  --model-path "$PWD/models/base" --calib-pack-files "$packs" \
  --calib-pack-sample-strategy per_file --num-rows 96 --max-seq-length 512 --batch-size 4 \
  --keep-frac 0.75 --min-keep-per-layer 8 --max-keep-per-layer 16 \
  --core-pos-top-m 2 --core-count-top-m 0
pruned=$(python3 -c 'import json; print(json.load(open("artifacts/20b_pruned_models_eaftreap_budgeted/manifest.json"))["out_dir"])')

# 2) EAFT parity collectors for base and pruned on the same blocks (seq 1024 and 2048), and
#    base on the next 8 blocks (disjoint, same size): the noise floor
for model in "tiny-base:$PWD/models/base:0" "tiny-eaftreap075:$pruned:0" \
             "tiny-base-disjoint:$PWD/models/base:8"; do
  IFS=: read -r id path offset <<<"$model"
  run --task eaft_single --no-detach --model-id "$id" --model-path "$path" \
    --calib-pack-files "$packs" --seq-lens-csv 1024,2048 --num-blocks 8 --batch-size 2 \
    --sample-points 20000 --top-k 4 --block-offset "$offset"
done
base_json=$(ls -t artifacts/eaft_models/*/tiny-base.json | head -1)
pruned_json=$(ls -t artifacts/eaft_models/*/tiny-eaftreap075.json | head -1)
noise_json=$(ls -t artifacts/eaft_models/*/tiny-base-disjoint.json | head -1)

# 3) gate summary on the host (exit 1 = FAIL is a verdict, not an error of this script), and
#    the same gate on base vs base: what sampling noise alone does at this size
verdict=0
run summarize --left-json "$base_json" --right-json "$pruned_json" \
  --out-md reports/eaftreap_budgeted_keepfrac75_parity_summary.md \
  --noise-json "$base_json" "$noise_json" || verdict=$?
[ "$verdict" -le 1 ] || exit "$verdict"
run summarize --left-json "$base_json" --right-json "$noise_json" --noise-floor \
  --out-md reports/noise_base_vs_base.md || true

# 4) decode throughput sanity, base and pruned
for model in "base_k4:$PWD/models/base" "pruned_k4:$pruned"; do
  run --task decode_bench --no-detach --name "${model%%:*}" --model-path "${model#*:}" \
    --prompt-len 64 --max-new-tokens 32 --batch-sizes 1,4 --repeats 2
done

run summarize-decode artifacts/decode_bench/base_k4.json artifacts/decode_bench/pruned_k4.json \
  --out-md reports/decode_base_vs_pruned.md

echo "gate verdict: $([ "$verdict" = 0 ] && echo PASS || echo FAIL)" \
  "(reports/eaftreap_budgeted_keepfrac75_parity_summary.md; noise floor: reports/noise_base_vs_base.md)"
