"""Concurrent local runs from one folder never see each other's outputs (issue 14, "Local runs").

Five detached runs of one task start together in one output folder, each with its own
parameters. Every run's executed notebook must show the report of that run, not the one a
neighbour wrote last to the task's shared report path (before the fix, 2 of 4 such runs showed
a neighbour's report: the notebook re-read `reports/<task>.md` after writing it).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from runner_support import cli, run_dir, runner_env

pytestmark = pytest.mark.slow

TASK = "validate_expert_math_toy"
RUNS = 5
TINY = (
    Path(__file__).resolve().parent.parent
    / "kernels"
    / "versa_kernels"
    / "data"
    / "tiny_moe_trained"
)


def _shown_reports(notebook: Path) -> list[str]:
    """Every markdown output the executed notebook displays."""
    cells = json.loads(notebook.read_text())["cells"]
    return [
        "".join(output["data"]["text/markdown"])
        for cell in cells
        for output in cell.get("outputs", [])
        if "text/markdown" in output.get("data", {})
    ]


def _trials_in(report: str) -> int:
    match = re.search(r"\| seeds x trials \| \[\d+\] x (\d+) \|", report)
    assert match, report[:400]
    return int(match.group(1))


def test_concurrent_local_runs_each_show_their_own_report(tmp_path: Path) -> None:
    env = runner_env(tmp_path)
    trials = list(range(1, RUNS + 1))
    for n in trials:  # detached: all five run at once
        submitted = cli(["submit", "--task", TASK, "--trials", str(n), "--device", "cpu"],
                        tmp_path, env)  # fmt: skip
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    run_ids = sorted(p.stem for p in (tmp_path / ".versa_runner" / "runs").glob("*.json"))
    assert len(run_ids) == RUNS
    for run_id in run_ids:
        waited = cli(["wait", run_id, "--timeout", "600"], tmp_path, env, timeout_s=660)
        assert waited.returncode == 0, waited.stdout + waited.stderr
    shown: dict[int, int] = {}
    for run_id in run_ids:
        asked = yaml.safe_load((run_dir(tmp_path, run_id) / "params.yaml").read_text())["trials"]
        for notebook in (run_dir(tmp_path, run_id) / "output.ipynb",
                         tmp_path / "reports" / "notebooks" / f"{run_id}_{TASK}.ipynb"):  # fmt: skip
            reports = _shown_reports(notebook)
            assert len(reports) == 1, notebook
            shown[asked] = _trials_in(reports[0])
            assert shown[asked] == asked, f"{notebook.name} shows another run's report"
    assert sorted(shown) == trials
    # The task's shared report is whole: the report of one of the runs, never a mix.
    shared = (tmp_path / "reports" / "validate_gpt_oss_expert_math_toy.md").read_text()
    assert _trials_in(shared) in trials and shared.endswith("\n")


def test_concurrent_decode_benches_of_one_name_each_show_their_own_table(tmp_path: Path) -> None:
    """Same --name (so the same report path), different --max-new-tokens: each executed notebook
    renders the table of its own run."""
    env = runner_env(tmp_path)
    tokens = [2, 3, 4]
    for n in tokens:
        submitted = cli(["submit", "--task", "decode_bench", "--name", "shared",
                         "--model-path", str(TINY), "--prompt-len", "8", "--max-new-tokens",
                         str(n), "--batch-sizes", "1", "--engine", "native", "--repeats", "1",
                         "--warmup", "0"], tmp_path, env)  # fmt: skip
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    run_ids = sorted(p.stem for p in (tmp_path / ".versa_runner" / "runs").glob("*.json"))
    for run_id in run_ids:
        waited = cli(["wait", run_id, "--timeout", "600"], tmp_path, env, timeout_s=660)
        assert waited.returncode == 0, waited.stdout + waited.stderr
    for run_id in run_ids:
        asked = yaml.safe_load((run_dir(tmp_path, run_id) / "params.yaml").read_text())
        (report,) = _shown_reports(run_dir(tmp_path, run_id) / "output.ipynb")
        assert f"{asked['max_new_tokens']} new tokens per request" in report, report[:300]
