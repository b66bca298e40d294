#!/usr/bin/env bash
# Compatibility entry point for the seed playbook: `bash .../scripts/versa_run_decode_bench_sglang_kaggle.sh ARGS` is
# `versa-run --task decode_bench ARGS`. The Kaggle notebook's proxy URL is read from REMOTE_JUPYTER_URL
# (or KAGGLE_URL / VERSA_RUN_URL) in the environment, or from --url-file, so it never appears on a
# command line; without one of them the job runs on this machine.
set -euo pipefail
exec versa-run --task decode_bench "$@"
