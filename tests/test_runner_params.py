"""One declaration per task parameter: flags, help, validation and notebook cells agree."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import nbformat
import papermill
import pytest

from versa_runner import params, tasks
from versa_runner.errors import UsageError


@pytest.mark.parametrize("task_name", list(tasks.TASKS))
def test_every_notebook_parameter_has_a_flag_and_back(
    task_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    task = tasks.get_task(task_name)
    assert tasks.notebook_mismatches(task) == []
    caplog.set_level(logging.WARNING, logger="papermill")
    inspected = papermill.inspect_notebook(str(task.notebook_path()))
    # papermill parses every line (an `=` in a comment once hid a parameter from it, and every
    # run logged "Passed unknown parameter")
    assert set(inspected) == {p.name for p in task.params} | {"run_id"}
    assert "Unable to parse" not in caplog.text


def _doctored(tmp_path: Path, task: tasks.Task, extra_line: str) -> Path:
    path = tmp_path / f"{task.notebook}.ipynb"
    shutil.copy(task.notebook_path(), path)
    notebook = nbformat.read(path, as_version=4)
    cell = next(c for c in notebook.cells if "parameters" in c.metadata.get("tags", []))
    cell.source += "\n" + extra_line
    nbformat.write(notebook, path)
    return path


def test_a_notebook_parameter_without_a_flag_fails_the_check(tmp_path: Path) -> None:
    task = tasks.get_task("eaft_single")
    path = _doctored(tmp_path, task, "max_tokens_per_row = 0  # no flag declares this")
    assert tasks.notebook_mismatches(task, path) == [
        "eaft_single.ipynb: parameter 'max_tokens_per_row' has no flag in task eaft_single"
    ]
    drifted = _doctored(tmp_path, task, "")  # same names, text no longer generated
    assert "differs" in tasks.notebook_mismatches(task, drifted)[0]


def test_baseline_eval_rows_has_a_flag() -> None:
    task = tasks.get_task("build_pruned_20b_eaftreap_budgeted")
    assert tasks.parse_task_args(task, ["--baseline-eval-rows", "64"])["baseline_eval_rows"] == 64
    with pytest.raises(UsageError, match="--baseline-eval-rows: expected an integer in"):
        tasks.parse_task_args(task, ["--baseline-eval-rows", "-1"])


def test_bool_flags_take_every_spelling() -> None:
    task = tasks.get_task("build_pruned_20b_eaftreap_budgeted")
    for argv, expected in ((["--overwrite"], True), (["--overwrite=false"], False),
                           (["--overwrite", "yes"], True), (["--no-overwrite"], False)):  # fmt: skip
        assert tasks.parse_task_args(task, argv)["overwrite"] is expected, argv


def test_unknown_task_flag_suggests_the_close_one() -> None:
    task = tasks.get_task("build_pruned_20b_eaftreap_budgeted")
    with pytest.raises(UsageError) as caught:
        tasks.parse_task_args(task, ["--keep-fraction", "0.5"])
    assert "does not take '--keep-fraction' (did you mean --keep-frac?)" in str(caught.value)
    with pytest.raises(UsageError, match=r"did you mean eaft_single\?"):
        tasks.get_task("eaft_singel")


def test_task_help_lists_every_flag_with_allowed_values() -> None:
    for task in tasks.TASKS.values():
        text = tasks.task_help(task)
        for param in task.params:
            assert param.flag in text, (task.name, param.flag)
        assert task.outputs[0] in text


def test_declarations_refuse_what_papermill_cannot_parse() -> None:
    with pytest.raises(ValueError, match="must not contain '='"):
        params.Param("--x", "int", 0, "0 = off")
    cell = params.parameters_cell((params.Param("--names", "str_csv", "a,b", "names"),))
    assert cell.splitlines()[0] == 'names = ["a", "b"]  # names'
    assert json.loads(cell.splitlines()[0].split("=", 1)[1].split("#")[0]) == ["a", "b"]
