#!/usr/bin/env bash
# The README's test command, and what .ci/run calls: build a fresh virtual environment in a
# temporary directory, install the project into it exactly as the README does (plus the `dev`
# extra), lint, and run the suite there. The venv is new on every run and sees no site packages
# of the machine, so a package installed by hand can never hide a missing install step.
#
# Arguments are passed to pytest (e.g. `bash scripts/test.sh -k ssh`).
# VERSA_TEST_VENV=DIR reuses (or creates) a venv at DIR instead: for quick local iteration only.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
if [ -n "${VERSA_TEST_VENV:-}" ]; then
  venv=$VERSA_TEST_VENV
else
  venv=$(mktemp -d "${TMPDIR:-/tmp}/versa-test-venv.XXXXXX")
  trap 'rm -rf "$venv"' EXIT
fi
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
echo "test venv: $venv ($(python --version))"

python -m pip install -q --disable-pip-version-check torch==2.13.0 -e '.[gpu,dev]'

ruff check .
mypy  # the files it checks are listed in pyproject's [tool.mypy]

# The SSH target's tests start a real sshd (tests/ssh_fixtures.py): install it on a fresh CI box.
if [ ! -x /usr/sbin/sshd ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  { DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends openssh-server; } \
    >/dev/null 2>&1 || echo "warning: openssh-server could not be installed; SSH tests will skip" >&2
fi

# tests/conftest.py sets the thread count and the SSH target's interpreter: plain `pytest` in
# this venv runs the same suite.
python -m pytest -q -x --durations=15 "$@"
