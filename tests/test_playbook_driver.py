"""The playbook driver on steps that need no kernel: order, references, the record, and the
stop at the first failure (the notebook steps run end to end in test_recipes_e2e)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from versa_runner.recipes.driver import PLAN_SCHEMA_VERSION, StepFailed, main, run_plan

DECODE = {"schema_version": 1, "engine": "native", "prompt_len_tokens": 8, "max_new_tokens": 4,
          "repeats": 1}  # fmt: skip


def _decode(path: Path, name: str, tok_s: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**DECODE, "name": name,
                                "results": [{"batch_size": 1, "tok_s_total": tok_s}]}))  # fmt: skip


def _compare(name: str, base: str, pruned: str) -> dict:
    return {"name": name, "summarize_decode": {"base": base, "pruned": pruned,
                                               "out_md": f"reports/{name}.md"}}  # fmt: skip


def test_steps_run_in_order_and_the_record_lists_their_reports(tmp_path):
    _decode(tmp_path / "a.json", "a", 100.0)
    _decode(tmp_path / "b.json", "b", 150.0)
    plan = {"schema_version": PLAN_SCHEMA_VERSION, "name": "p",
            "steps": [_compare("first", "a.json", "b.json"), _compare("second", "b.json", "a.json")]}  # fmt: skip
    record = run_plan(plan, run_id="R", cwd=tmp_path, notebooks_dir=tmp_path)
    assert record["state"] == "succeeded"
    assert [s["name"] for s in record["steps"]] == ["first", "second"]
    assert record["reports"][0] == "reports/first.md" and (tmp_path / "reports/first.md").is_file()
    assert json.loads((tmp_path / "reports/playbook_R.json").read_text()) == record
    assert record["steps"][0]["decode"]["rows"][0]["ratio"] == pytest.approx(1.5)


def test_the_first_failure_stops_the_plan_with_a_message_naming_the_step(
    tmp_path, capsys, monkeypatch
):
    _decode(tmp_path / "a.json", "a", 100.0)
    plan = {"schema_version": PLAN_SCHEMA_VERSION, "name": "p", "steps": [
        _compare("ok", "a.json", "a.json"),
        {"name": "gate", "summarize": {"left": "missing.json", "right": "a.json", "out_md": "r.md"}},
        _compare("never", "a.json", "a.json")]}  # fmt: skip
    with pytest.raises(
        StepFailed, match=r"step 2/3 'gate' failed: left .*missing.json: file not found"
    ):
        run_plan(plan, run_id="R", cwd=tmp_path, notebooks_dir=tmp_path)
    record = json.loads((tmp_path / "reports/playbook_R.json").read_text())
    assert record["state"] == "failed" and record["failed_step"] == "gate"
    assert [s["state"] for s in record["steps"]] == ["done", "failed"]  # "never" did not run
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(json.dumps(plan))
    monkeypatch.chdir(tmp_path)  # the driver runs in the job's working directory
    assert main([str(plan_path), "R2", str(tmp_path)]) == 1
    assert "FAILED: step 2/3 'gate' failed" in capsys.readouterr().out


def test_a_reference_to_a_step_that_has_not_run_is_a_clear_failure(tmp_path):
    plan = {"schema_version": PLAN_SCHEMA_VERSION, "name": "p",
            "steps": [_compare("c", {"$output": "decode_base"}, "a.json")]}  # fmt: skip
    with pytest.raises(StepFailed, match="output of step 'decode_base', which has not run"):
        run_plan(plan, run_id="R", cwd=tmp_path, notebooks_dir=tmp_path)
