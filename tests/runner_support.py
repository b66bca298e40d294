"""Helpers shared by tests/test_runner_*.py: run the real CLI in a subprocess, poll files, and
clean up process groups a test started (never by name, only by recorded pgid/pid)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from versa_runner.target import proc

LAUNCHER = [sys.executable, "-m", "versa_runner.target.launcher"]
"""The launcher from the checkout (runs upload it as launcher.pyz)."""
REPO = Path(__file__).resolve().parent.parent
TEST_NOTEBOOKS = REPO / "tests" / "notebooks"
TARGET_PYTHON = sys.executable
"""The interpreter an SSH target runs: this test run's own Python (the test venv's, with papermill and
ipykernel), named by absolute path because the sshd session's PATH may lack it. Never resolved
through symlinks: a venv's `bin/python` resolves to the base interpreter, which lacks the venv's
packages, and the machine's own `python3` has none of them."""


def runner_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """Environment for a CLI subprocess: small disk floor, fast heartbeat, isolated journal."""
    env = dict(os.environ)
    for name in ("VERSA_RUNNER_HOME", "REMOTE_JUPYTER_URL", "VERSA_RUN_URL", "KAGGLE_URL"):
        env.pop(name, None)  # a Jupyter URL in the environment would select the remote target
    env.update(VERSA_RUNNER_MIN_FREE_GB="0.05", VERSA_RUNNER_HEARTBEAT_S="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def cli(
    args: list[str], cwd: Path, env: dict[str, str], timeout_s: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run `versa-run ARGS` as a real process (python -m, so PATH does not matter)."""
    return subprocess.run(
        [sys.executable, "-m", "versa_runner.cli", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s, check=False,
    )  # fmt: skip


def only_run_id(output_dir: Path) -> str:
    runs = sorted((output_dir / ".versa_runner" / "runs").glob("*.json"))
    assert len(runs) == 1, [p.name for p in runs]
    return runs[0].stem


def run_dir(output_dir: Path, run_id: str) -> Path:
    return output_dir / "versa_runs" / run_id


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def read_status(output_dir: Path, run_id: str) -> dict:
    path = run_dir(output_dir, run_id) / "status.json"
    return json.loads(path.read_text()) if path.exists() else {}


def pid_alive(pid: int) -> bool:
    """True when the process exists and is not a zombie (the one /proc reader)."""
    return proc.is_alive(pid)


def pids_in_group(pgid: int) -> list[int]:
    """Live pids of process group `pgid`."""
    return proc.group_members(pgid)


def kill_run_processes(output_dir: Path, run_id: str) -> None:
    """Test cleanup: SIGKILL the launcher group and papermill group this run recorded."""
    status = read_status(output_dir, run_id)
    groups = [int(status[key]) for key in ("pgid", "papermill_pid") if status.get(key)]
    pid_file = output_dir / "artifacts" / "sleep_pids.txt"  # written by sleep.ipynb
    children: list[int] = []
    if pid_file.exists():
        kernel_pid, child_pid = (int(p) for p in pid_file.read_text().split())
        groups.append(kernel_pid)  # the kernel leads its own session
        children.append(child_pid)
    for pgid in groups:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except OSError:
            pass
    for pid in children:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
