"""What a user sees: exit codes, "did you mean", help that lists flags, `list`, next commands,
quiet logs, and a sync that brings back only what the run wrote. Real processes and files."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

import nbformat
import pytest
from faultproxy import free_port
from nbformat.v4 import new_code_cell, new_notebook
from runner_support import cli, only_run_id, run_dir, runner_env

from versa_runner.backends.local import LocalBackend
from versa_runner.cli import main as versa_run
from versa_runner.runs import journal, next_steps, sync
from versa_runner.runs.journal import RunRecord


def _error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = versa_run(argv)
    return code, capsys.readouterr().err.splitlines()[0]


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--bogus-flag"], "versa-run: unknown argument '--bogus-flag'"),
        (["--jsno", "list"], "(did you mean --json?)"),
        (
            ["logs", "--folow"],
            "versa-run logs: unknown argument '--folow' (did you mean --follow?)",
        ),
        (["sync", "--with-checkpoint"], "(did you mean --with-checkpoints?)"),
        (["stauts"], "invalid choice: 'stauts'"),
        (["stauts"], "(did you mean status?)"),
        (["summarize", "--left-json", "a.json"], "required: --right-json, --out-md"),
    ],
)
def test_unknown_input_exits_2_with_did_you_mean(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    code, first_line = _error(argv, capsys)
    assert code == 2 and needle in first_line, first_line


@pytest.mark.parametrize(
    ("verb", "flags"),
    [
        ("summarize", ["--left-json", "--right-json", "--out-md", "--gates-json"]),
        ("fixtures", ["--layers", "--experts", "--tokenizer", "--trained", "--rows"]),
    ],
)
def test_help_of_summarize_and_fixtures_lists_their_flags(
    verb: str, flags: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        code = versa_run([verb, "--help"])
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr().out
    assert code == 0 and "examples:" in out
    for flag in flags:
        assert flag in out, (verb, flag)


def _record(root: Path, run_id: str, task: str, **extra) -> RunRecord:
    fields = dict(run_id=run_id, task=task, notebook=f"{task}.ipynb", backend="local",
                  target=f"local:{root}", root=str(root), run_dir=f"versa_runs/{run_id}",
                  job_cwd=str(root), params_hash="0", created_at=f"{run_id[:4]}-01-01T00:00:00")  # fmt: skip
    fields.update(extra)
    return RunRecord(**fields)


def _finished_run(root: Path, record: RunRecord, written: list[str], started: dt.datetime) -> None:
    rd = root / record.run_dir
    rd.mkdir(parents=True, exist_ok=True)
    ended = started + dt.timedelta(minutes=2, seconds=5)
    status = {"state": "succeeded", "exit_code": 0, "started_at": started.isoformat(),
              "ended_at": ended.isoformat()}  # fmt: skip
    (rd / "status.json").write_text(json.dumps(status))
    (rd / "exit_code").write_text("0\n")
    (rd / "written.json").write_text(json.dumps({"paths": written}))


def test_list_has_a_header_durations_targets_and_json_in_the_same_order(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = _record(tmp_path, "20260101T000000Z-aaaaaa", "eaft_single", backend="jupyter",
                  target="jupyter https://kkb.example/<redacted>", last_status={"state": "failed", "exit_code": 1, "elapsed_s": 3725.0})  # fmt: skip
    new = _record(tmp_path, "20260102T000000Z-bbbbbb", "decode_bench", backend="ssh",
                  target="ssh:me@gpu:22", last_status={"state": "running", "elapsed_s": 42.0})  # fmt: skip
    for record in (old, new):
        journal.save_record(tmp_path, record)
    assert versa_run(["--output-dir", str(tmp_path), "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["RUN", "ID", "TASK", "STATE", "DURATION", "TARGET", "CREATED", "AT"]
    assert lines[1].split()[:5] == [new.run_id, "decode_bench", "running", "42s", "ssh:me@gpu:22"]
    assert lines[2].split()[:4] == [old.run_id, "eaft_single", "failed", "1h02m"]
    assert versa_run(["--output-dir", str(tmp_path), "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["runs"]
    assert [r["run_id"] for r in rows] == [new.run_id, old.run_id]  # newest first, like the text
    assert rows[1]["duration_s"] == 3725.0 and rows[0]["target"] == "ssh:me@gpu:22"


def test_each_step_names_the_next_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    started = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
    manifest_path = "artifacts/20b_pruned_models_eaftreap_keepfrac/manifest.json"
    (tmp_path / manifest_path).parent.mkdir(parents=True)
    variants = {"k075": {"out_dir": "/data/pruned k075"}, "k060": {"out_dir": "/data/k060"}}
    (tmp_path / manifest_path).write_text(json.dumps({"variants": variants}))
    variant_manifest = "artifacts/20b_pruned_models_eaftreap_keepfrac/k075/manifest.json"
    (tmp_path / variant_manifest).parent.mkdir(parents=True)
    (tmp_path / variant_manifest).write_text(
        json.dumps({"variant_name": "k075", **variants["k075"]})
    )
    build = _record(tmp_path, "20260101T000000Z-aaaaaa", "build_pruned_20b_eaftreap_keepfrac")
    _finished_run(tmp_path, build, [manifest_path, variant_manifest], started)  # same k075 twice
    eaft_json = "artifacts/eaft_models/20260102T000000Z-bbbbbb/k075.json"
    eaft = _record(tmp_path, "20260102T000000Z-bbbbbb", "eaft_single")
    _finished_run(tmp_path, eaft, [eaft_json, "reports/notebooks/x.ipynb"], started)
    with LocalBackend(tmp_path) as backend:
        assert next_steps.after_success(backend, build) == [
            "versa-run --task eaft_single --model-id k075 --model-path '/data/pruned k075'",
            "versa-run --task eaft_single --model-id k060 --model-path /data/k060",
        ]
        assert next_steps.after_success(backend, eaft) == [
            f"versa-run summarize --left-json BASE_EAFT.json --right-json {eaft_json} "
            f"--out-md reports/eaft_pair_{eaft.run_id}.md"
        ]
        base = tmp_path / "artifacts/eaft_models/20260101T120000Z-eeeeee/base.json"
        base.parent.mkdir(parents=True)
        base.write_text("{}")  # collected earlier and synced here: the base to compare with
        (tmp_path / eaft_json).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / eaft_json).write_text("{}")
        [command] = next_steps.after_success(backend, eaft, local_dir=tmp_path)
        assert f"--left-json {base} --right-json {tmp_path / eaft_json}" in command
    journal.save_record(tmp_path, build)
    assert versa_run(["--output-dir", str(tmp_path), "wait", build.run_id]) == 0
    out = capsys.readouterr().out
    assert "next:\n  versa-run --task eaft_single --model-id k075" in out
    assert "elapsed 125 s" in out


def test_unreachable_target_exits_3_from_every_verb(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    monkeypatch.setenv("VERSA_RUNNER_PATIENCE_S", "0.1")
    closed = free_port()  # nothing listens here
    record = _record(Path("/srv/versa"), "20260101T000000Z-cccccc", "eaft_single", backend="ssh",
                     target=f"ssh:me@127.0.0.1:{closed}", job_cwd="/srv/versa")  # fmt: skip
    journal.save_record(tmp_path, record)
    base = ["--output-dir", str(tmp_path)]
    for argv in (["status"], ["logs"], ["logs", "--follow"], ["wait"], ["sync"],
                 ["kill", "--yes"]):  # fmt: skip
        code = versa_run([*base, *argv])
        err = capsys.readouterr().err
        assert code == 3, (argv, err)
        assert err.startswith("error: ") and "Traceback" not in err


def _sync_fixture(root: Path) -> tuple[RunRecord, RunRecord]:
    """Two runs into the same artifacts/: the first recorded what it wrote, the second runs."""
    t0 = dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=1)
    first = _record(root, "20260101T000000Z-aaaaaa", "build_pruned_20b_eaftreap_budgeted")
    mine = ["artifacts/b/manifest.json", "artifacts/b/model/model-00001.safetensors",
            "artifacts/b/model/config.json", "reports/b.md"]  # fmt: skip
    for rel in mine:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(rel)
        os.utime(root / rel, (t0.timestamp() + 60, t0.timestamp() + 60))
    _finished_run(root, first, mine, t0)
    (root / first.run_dir / "run.log").write_text("first\n")
    second = _record(root, "20260102T000000Z-bbbbbb", "eaft_single")
    rd = root / second.run_dir
    rd.mkdir(parents=True)
    started = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=1)
    (rd / "status.json").write_text(
        json.dumps({"state": "running", "started_at": started.isoformat()})
    )
    (rd / "run.log").write_text("second\n")
    (root / "artifacts/eaft_models/r2").mkdir(parents=True)
    (root / "artifacts/eaft_models/r2/m.json").write_text("{}")
    return first, second


def test_sync_brings_back_only_the_runs_own_outputs(tmp_path: Path) -> None:
    target, dest = tmp_path / "target", tmp_path / "dest"
    first, second = _sync_fixture(target)
    with LocalBackend(target) as backend:
        got = sync.sync_run(backend, second, dest)  # running: what changed since it started
        assert sorted(got.transferred) == ["artifacts/eaft_models/r2/m.json",
                                           f"{second.run_dir}/run.log"]  # fmt: skip
        got = sync.sync_run(backend, first, dest / "a")  # finished: what it recorded, no shards
        assert sorted(got.transferred) == ["artifacts/b/manifest.json",
                                           "artifacts/b/model/config.json", "reports/b.md",
                                           f"{first.run_dir}/run.log"]  # fmt: skip
        shards = sync.Selection(with_checkpoints=True, include=("artifacts/b/model/*",))
        got = sync.sync_run(backend, first, dest / "b", selection=shards)
        assert sorted(got.transferred) == ["artifacts/b/model/config.json",
                                           "artifacts/b/model/model-00001.safetensors"]  # fmt: skip
        narrowed = sync.Selection(exclude=("reports/*", "*.log"), only=("artifacts", "run.log"))
        got = sync.sync_run(backend, first, dest / "c", selection=narrowed)
        assert sorted(got.transferred) == ["artifacts/b/manifest.json",
                                           "artifacts/b/model/config.json"]  # fmt: skip


def test_launcher_records_what_the_run_wrote_and_logs_stay_quiet(tmp_path: Path) -> None:
    notebook = new_notebook(cells=[
        new_code_cell('run_id = ""', metadata={"tags": ["parameters"]}),
        new_code_cell("import pathlib, warnings\nimport tqdm.auto  # asks for ipywidgets\n"
                      "pathlib.Path('artifacts/q').mkdir(parents=True, exist_ok=True)\n"
                      "pathlib.Path('artifacts/q/out.json').write_text('{}')\nprint('QUIET_DONE')"),
    ])  # fmt: skip
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                       "language": "python"}  # fmt: skip
    nbformat.write(notebook, tmp_path / "quiet.ipynb")
    (tmp_path / "artifacts/old").mkdir(parents=True)
    (tmp_path / "artifacts/old/before.json").write_text("{}")
    os.utime(tmp_path / "artifacts/old/before.json", (1, 1))  # written long before this run
    env = runner_env(tmp_path)
    done = cli(["submit", "--notebook", str(tmp_path / "quiet.ipynb"), "--no-detach"], tmp_path,
               env, timeout_s=180)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    run_id = only_run_id(tmp_path)
    log = (run_dir(tmp_path, run_id) / "run.log").read_text()
    assert "QUIET_DONE" in log
    for noise in ("IPKernelApp] WARNING", "TqdmWarning", "IProgress", "Passed unknown parameter"):
        assert noise not in log, noise
    written = json.loads((run_dir(tmp_path, run_id) / "written.json").read_text())["paths"]
    assert "artifacts/q/out.json" in written
    assert f"reports/notebooks/{run_id}_quiet.ipynb" in written
    assert "artifacts/old/before.json" not in written
