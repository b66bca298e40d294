#!/usr/bin/env bash
# Install everything the tests need (CPU torch from the local wheel, the project, dev tools)
# and run the test suite. The README's test command and .ci/run both call this.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0 -e '.[gpu,dev]'
ruff check .
python -m pytest -q -x --durations=15 "$@"
