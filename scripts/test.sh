#!/usr/bin/env bash
# Install everything the tests need (CPU torch from the local wheel, the project, dev tools)
# and run the test suite. The README's test command and .ci/run both call this.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0 -e '.[gpu,dev]'
ruff check .
# The SSH target's tests start a real sshd (tests/ssh_fixtures.py): install it on a fresh CI box.
if [ ! -x /usr/sbin/sshd ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  { DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends openssh-server; } \
    >/dev/null 2>&1 || echo "warning: openssh-server could not be installed; SSH tests will skip" >&2
fi
# Tiny test models run faster on one thread, and jobs the tests start inherit this.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
python -m pytest -q -x --durations=15 "$@"
