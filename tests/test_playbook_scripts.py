"""The seed playbook's wrapper scripts delegate to `versa-run` with the right task."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _run(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.endswith("_URL")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run(
        ["bash", str(SCRIPTS / script), *args], capture_output=True, text=True, env=env, timeout=120
    )


@pytest.mark.parametrize(
    "script, flag",
    [
        ("versa_run_eaft_single_kaggle.sh", "--seq-lens-csv"),
        ("versa_run_decode_bench_sglang_kaggle.sh", "--max-new-tokens"),
    ],
)
def test_wrappers_name_their_task(script: str, flag: str) -> None:
    result = _run(script, "--help")
    assert result.returncode == 0, result.stderr
    assert flag in result.stdout


def test_pruning_wrapper_validates_before_any_work(tmp_path: Path) -> None:
    result = _run(
        "versa_run_pruning_track_kaggle.sh", "--output-dir", str(tmp_path),
        "--task", "build_pruned_20b_eaftreap_budgeted", "--keep-frac", "1.5",
    )  # fmt: skip
    assert result.returncode == 2
    assert "--keep-frac" in result.stderr and len(result.stderr.strip().splitlines()) <= 2
    assert not (tmp_path / "artifacts").exists()
