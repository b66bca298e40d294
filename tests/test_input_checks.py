"""Parameters are refused before any work (issue 14, "Parameters").

- Every numeric flag of every task refuses NaN and the infinities (`params.coerce`).
- What can be checked where the job runs is checked by preflight, before anything is staged:
  the checkpoint directory, local pack files, and --top-k against the checkpoint's experts.
  On the local target that is a usage error (exit 2); on a remote target (a real
  jupyter_server, a real sshd) a preflight refusal (exit 3). Either way one line naming the
  flag, no run journaled, no run directory written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from runner_support import cli, runner_env

from versa_runner import params, tasks
from versa_runner.errors import UsageError
from versa_runner.target import inputs

if TYPE_CHECKING:
    from jupyter_fixtures import JupyterServer
    from ssh_fixtures import SshServer

pytest_plugins = ["jupyter_fixtures", "ssh_fixtures"]

TINY = (
    Path(__file__).resolve().parent.parent
    / "kernels"
    / "versa_kernels"
    / "data"
    / "tiny_moe_trained"
)
NOT_FINITE = ("nan", "NaN", "inf", "-inf", "+Infinity", "1e999")

FLOAT_FLAGS = [
    (task.name, param)
    for task in tasks.TASKS.values()
    for param in task.params
    if param.kind in ("float", "float_csv")
]


@pytest.mark.parametrize("task_name, param", FLOAT_FLAGS, ids=lambda x: getattr(x, "flag", x))
@pytest.mark.parametrize("text", NOT_FINITE)
def test_every_numeric_flag_refuses_nan_and_infinities(task_name: str, param: params.Param,
                                                       text: str) -> None:  # fmt: skip
    value = f"0.5,{text}" if param.kind == "float_csv" else text
    with pytest.raises(UsageError) as caught:
        # `=`: argparse would read a leading "-" as the next flag
        tasks.parse_task_args(tasks.get_task(task_name), [f"{param.flag}={value}"])
    message = str(caught.value)
    assert message == f"{param.flag}: expected {param.allowed()}, got {text!r}", message
    assert "finite" in message or " in " in message  # the allowed values exclude it
    assert "\n" not in message


def test_float_flags_exist_and_finite_values_still_pass() -> None:
    assert len(FLOAT_FLAGS) >= 6  # keep-frac (both kinds), weights, quantile, class weights
    values = tasks.parse_task_args(tasks.get_task("build_pruned_20b_eaftreap_budgeted"),
                                   ["--keep-frac", "0.5", "--eaft-weight-cc", "-2.5"])  # fmt: skip
    assert values["keep_frac"] == 0.5 and values["eaft_weight_cc"] == -2.5


def _pack(path: Path) -> Path:
    path.write_bytes(b"PAR1" + b"\0" * 16 + b"PAR1")  # the magic is what preflight reads
    return path


def test_target_input_checks_on_real_files(tmp_path: Path) -> None:
    pruned = tmp_path / "pruned"
    pruned.mkdir()
    config = {"num_local_experts": 8, "num_local_experts_per_layer": [8, 4, 6],
              "num_experts_per_tok": 2}  # fmt: skip
    (pruned / "config.json").write_text(json.dumps(config))
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("not parquet")
    _pack(tmp_path / "packs.parquet")
    checks = [
        {"check": "checkpoint", "flag": "--model-path", "path": "pruned"},  # relative to root
        {"check": "experts_per_token", "flag": "--top-k", "value": 4, "path": "pruned"},
        {"check": "pack_files", "flag": "--calib-pack-files", "repo": "",
         "files": ["packs.parquet", str(tmp_path / "packs.parquet")]},
        {"check": "pack_files", "flag": "--calib-pack-files", "repo": "org/data",
         "files": ["packs/in_the_repo.parquet"]},  # a repo name: the job fetches it
        {"check": "experts_per_token", "flag": "--top-k", "value": 99, "path": "unreadable"},
        {"check": "keep_per_layer", "flag": "--min-keep-per-layer", "value": 8, "path": "pruned"},
        {"check": "keep_per_layer", "flag": "--min-keep-per-layer", "value": 99, "path": "nope"},
    ]  # fmt: skip
    assert inputs.check_inputs(str(tmp_path), checks) == []
    bad = [
        {"check": "checkpoint", "flag": "--model-path", "path": "missing"},
        {"check": "checkpoint", "flag": "--model-path", "path": "empty"},
        {"check": "checkpoint", "flag": "--model-path", "path": "notes.txt"},
        {"check": "experts_per_token", "flag": "--top-k", "value": 5, "path": str(pruned)},
        {"check": "pack_files", "flag": "--calib-pack-files", "repo": "org/data",
         "files": ["notes.txt", "/nowhere/x.parquet", "./gone.parquet", "empty"]},
        {"check": "pack_files", "flag": "--calib-pack-files", "repo": "", "files": ["a.parquet"]},
        {"check": "keep_per_layer", "flag": "--min-keep-per-layer", "value": 9, "path": "pruned"},
        {"check": "keep_per_layer", "flag": "--min-keep-per-layer", "value": 1, "path": "pruned"},
    ]  # fmt: skip
    problems = inputs.check_inputs(str(tmp_path), bad)
    assert problems == [
        "--model-path: 'missing' does not exist on the target; expected a checkpoint directory "
        "holding config.json",
        "--model-path: 'empty' holds no config.json; expected a checkpoint directory",
        "--model-path: 'notes.txt' is a file on the target; expected a checkpoint directory "
        "holding config.json",
        f"--top-k: expected an integer in [1, 4] (the checkpoint {str(pruned)!r} has 4 experts "
        "per layer), got 5",
        "--calib-pack-files: 'notes.txt' is not a parquet file",
        "--calib-pack-files: '/nowhere/x.parquet' does not exist on the target",
        "--calib-pack-files: './gone.parquet' does not exist on the target",
        "--calib-pack-files: 'empty' is not a file; expected parquet pack files",
        "--calib-pack-files: 'a.parquet' is not a file on the target and --calib-packs-repo is "
        "empty, so it cannot be fetched",
        "--min-keep-per-layer: expected an integer in [2, 8] (the checkpoint 'pruned' routes "
        "each token to 2 of 8 experts), got 9",
        "--min-keep-per-layer: expected an integer in [2, 8] (the checkpoint 'pruned' routes "
        "each token to 2 of 8 experts), got 1",
    ]


def test_input_checks_come_from_the_declaration() -> None:
    eaft = tasks.get_task("eaft_single")
    values = tasks.parse_task_args(eaft, ["--model-id", "m", "--model-path", "ck", "--top-k", "2"])
    kinds = {c["check"]: c for c in tasks.input_checks(eaft, values)}
    assert kinds["checkpoint"] == {"check": "checkpoint", "flag": "--model-path", "path": "ck"}
    assert kinds["experts_per_token"]["value"] == 2 and kinds["experts_per_token"]["path"] == "ck"
    assert kinds["pack_files"]["repo"] == tasks.CALIB_PACKS_REPO
    build = tasks.get_task("build_pruned_20b_eaftreap_budgeted")
    values = tasks.parse_task_args(build, ["--model-path", "ck", "--min-keep-per-layer", "8"])
    assert {"check": "keep_per_layer", "flag": "--min-keep-per-layer", "value": 8,
            "path": "ck"} in tasks.input_checks(build, values)  # fmt: skip
    # an empty --model-path is resolved from --model-id by the job: only top-k reads it
    values = tasks.parse_task_args(eaft, ["--model-id", "org/model"])
    assert [c["check"] for c in tasks.input_checks(eaft, values)] == [
        "pack_files", "experts_per_token"]  # fmt: skip


def _nothing_staged(out: Path) -> None:
    assert not list((out / ".versa_runner" / "runs").glob("*.json")), "a run was journaled"
    assert not list((out / "versa_runs").glob("*")), "a run directory was staged"


def _eaft_args(model_path: str, *extra: str) -> list[str]:
    return ["submit", "--task", "eaft_single", "--model-id", "tiny", "--model-path", model_path,
            "--num-blocks", "1", *extra]  # fmt: skip


LOCAL_CASES = [
    (["submit", "--task", "build_pruned_20b_eaftreap_budgeted", "--keep-frac", "nan"],
     "error: --keep-frac: expected a number in (0, 1], got 'nan'"),
    (["submit", "--task", "build_pruned_20b_eaftreap_budgeted", "--eaft-weight-cc=-inf"],
     "error: --eaft-weight-cc: expected a finite number, got '-inf'"),
    (_eaft_args("no/such/checkpoint"),
     "error: --model-path: 'no/such/checkpoint' does not exist on the target"),
    (_eaft_args(str(TINY), "--top-k", "17"),
     f"error: --top-k: expected an integer in [1, 16] (the checkpoint {str(TINY)!r} has 16"),
    (_eaft_args(str(TINY), "--calib-pack-files", "/no/such/pack.parquet"),
     "error: --calib-pack-files: '/no/such/pack.parquet' does not exist on the target"),
    (["submit", "--task", "build_pruned_20b_eaftreap_budgeted", "--model-path", str(TINY),
      "--min-keep-per-layer", "20"],
     "error: --min-keep-per-layer: expected an integer in [4, 16] (the checkpoint"),
    (["submit", "--task", "build_pruned_20b_eaftreap_budgeted"],  # the Kaggle default path
     "error: --model-path: '/kaggle/input/gpt-oss-20b/transformers/default/1' does not exist"),
    (["submit", "--notebook", "tests/notebooks/ok.ipynb", "-p", "x", ".nan"],
     "error: -p x: expected a finite number, got '.nan'"),
]  # fmt: skip


@pytest.mark.parametrize("args, line", LOCAL_CASES)
def test_local_target_refuses_bad_inputs_with_exit_2_and_stages_nothing(
    tmp_path: Path, args: list[str], line: str
) -> None:
    args = [str(Path(__file__).parent.parent / a) if a.startswith("tests/") else a for a in args]
    result = cli(args, tmp_path, runner_env(tmp_path))
    assert result.returncode == 2, result.stdout + result.stderr
    first = result.stderr.splitlines()[0]
    assert first.startswith(line), result.stderr
    assert "Traceback" not in result.stderr
    _nothing_staged(tmp_path)


REMOTE_CASES = [
    (_eaft_args("no/such/checkpoint"), "--model-path: 'no/such/checkpoint' does not exist"),
    (_eaft_args(str(TINY), "--top-k", "17"), "--top-k: expected an integer in [1, 16]"),
    (_eaft_args(str(TINY), "--calib-pack-files", "/no/such/pack.parquet"),
     "--calib-pack-files: '/no/such/pack.parquet' does not exist on the target"),
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("args, line", REMOTE_CASES)
def test_jupyter_preflight_refuses_bad_inputs_with_exit_3_before_staging(
    token_server: JupyterServer, tmp_path: Path, args: list[str], line: str
) -> None:
    from test_jupyter_e2e import connect_args, server_kernels

    runs = token_server.root_dir / "versa_runs"
    before = set(runs.iterdir()) if runs.exists() else set()
    result = cli([*args, *connect_args(token_server, tmp_path)], tmp_path, runner_env(tmp_path))
    assert result.returncode == 3, result.stdout + result.stderr
    assert result.stderr.splitlines()[0].startswith(f"error: {line}"), result.stderr
    _nothing_staged(tmp_path)
    assert (set(runs.iterdir()) if runs.exists() else set()) == before
    assert server_kernels(token_server) == []


@pytest.mark.slow
def test_ssh_preflight_refuses_bad_inputs_with_exit_3_before_staging(
    sshd: SshServer, tmp_path: Path
) -> None:
    from test_ssh_e2e import ssh_args, ssh_env

    remote = tmp_path / "remote"
    env = ssh_env(sshd, tmp_path)
    for args, line in REMOTE_CASES:
        result = cli([*args, *ssh_args(sshd, remote)], tmp_path, env)
        assert result.returncode == 3, result.stdout + result.stderr
        assert result.stderr.splitlines()[0].startswith(f"error: {line}"), result.stderr
        _nothing_staged(tmp_path)
        assert not (remote / "versa_runs").exists()
        assert not (remote / "versa_code").exists(), "code was uploaded before preflight"
