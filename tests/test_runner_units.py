"""Journal, run ids, secrets/redaction, sync (idempotence, resume, unsafe paths), log reading,
progress and state derivation: fast tests against real files through LocalBackend."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
from pathlib import Path

import pytest
from runner_support import LAUNCHER

from versa_runner.backends.local import LocalBackend
from versa_runner.errors import TransferError, UnsafePathError, UsageError
from versa_runner.runs import journal, lifecycle, logs, sync
from versa_runner.runs.journal import RunRecord
from versa_runner.runs.secrets import Redactor, collect_job_environment, encode_secrets_env
from versa_runner.runs.status import RunState, RunStatus, read_progress, read_status


def _record(run_id: str, root: Path, **extra) -> RunRecord:
    fields = dict(run_id=run_id, task="t", notebook="t.ipynb", backend="local", target=f"local:{root}",
                  root=str(root), run_dir=f"versa_runs/{run_id}", job_cwd=str(root), params_hash="0",
                  created_at=dt.datetime.now(dt.timezone.utc).isoformat())  # fmt: skip
    fields.update(extra)
    return RunRecord(**fields)


def test_run_id_format_sorts_by_time() -> None:
    early = lifecycle.new_run_id(dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc))
    late = lifecycle.new_run_id(dt.datetime(2026, 1, 2, 3, 4, 6, tzinfo=dt.timezone.utc))
    assert re.fullmatch(r"20260102T030405Z-[0-9a-f]{6}", early)
    assert early < late


def test_journal_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VERSA_RUNNER_HOME", raising=False)
    with pytest.raises(UsageError, match="no runs"):
        journal.resolve_run(tmp_path, None)
    for run_id in ("20260101T000000Z-aaaaaa", "20260101T000000Z-aabbbb", "20260102T000000Z-cccccc"):
        journal.save_record(tmp_path, _record(run_id, tmp_path))
    assert (tmp_path / ".versa_runner" / "runs" / "20260102T000000Z-cccccc.json").exists()
    assert journal.resolve_run(tmp_path, None).run_id == "20260102T000000Z-cccccc"
    assert journal.resolve_run(tmp_path, "last").run_id == "20260102T000000Z-cccccc"
    assert journal.resolve_run(tmp_path, "20260102").run_id == "20260102T000000Z-cccccc"
    assert journal.resolve_run(tmp_path, "20260101T000000Z-aaaaaa").run_id.endswith("aaaaaa")
    with pytest.raises(UsageError, match="ambiguous: 2 runs"):
        journal.resolve_run(tmp_path, "20260101T000000Z-aa")
    with pytest.raises(UsageError, match="matches no run"):
        journal.resolve_run(tmp_path, "1999")
    record = journal.resolve_run(tmp_path, "20260102")
    record.log_offset = 123
    journal.save_record(tmp_path, record)
    assert journal.load_record(tmp_path, record.run_id).log_offset == 123
    monkeypatch.setenv("VERSA_RUNNER_HOME", str(tmp_path / "elsewhere"))
    assert journal.list_run_ids(tmp_path) == []
    journal.save_record(tmp_path, _record("20260103T000000Z-dddddd", tmp_path))
    assert (tmp_path / "elsewhere" / "runs" / "20260103T000000Z-dddddd.json").exists()


def test_redactor_masks_values_and_proxy_urls() -> None:
    redact = Redactor(["hf_abcdefghijkl", "ab"])  # too-short values are not masked
    text = ("token hf_abcdefghijkl at https://kkb.kaggle.net/k/12/eyJhbGciOi.J9/proxy/api/kernels "
            "and http://user:pw@host:8888/lab?token=zz99&x=1 and ab")  # fmt: skip
    out = redact(text)
    assert "hf_abcdefghijkl" not in out and "eyJhbGciOi" not in out and "zz99" not in out
    assert "pw@" not in out and out.endswith("and ab")
    assert "https://kkb.kaggle.net/***" in out


def test_job_environment_splits_secrets_and_refuses_connection(monkeypatch) -> None:
    environ = {"HF_TOKEN": "hf_secret_value", "KAGGLE_URL": "https://x/k/1/jwt/proxy"}
    job = collect_job_environment(
        secret_names=["HF_TOKEN"], env_pairs=["MODE=fast", "MY_API_KEY=k123"], environ=environ
    )
    assert job.public == {"MODE": "fast"} and job.secrets == {
        "HF_TOKEN": "hf_secret_value",
        "MY_API_KEY": "k123",
    }
    assert encode_secrets_env(job.secrets) == b'HF_TOKEN="hf_secret_value"\nMY_API_KEY="k123"\n'
    with pytest.raises(UsageError, match="--secret MISSING: the variable is not set"):
        collect_job_environment(secret_names=["MISSING"], env_pairs=[], environ=environ)
    with pytest.raises(UsageError, match="never forwarded"):
        collect_job_environment(secret_names=["KAGGLE_URL"], env_pairs=[], environ=environ)
    with pytest.raises(UsageError, match="never forwarded"):
        collect_job_environment(
            secret_names=[], env_pairs=["X_URL=https://h/k/1/j/proxy"], environ=environ
        )


@pytest.mark.parametrize(
    "bad", ["/etc/passwd", "../outside.txt", "reports/../../x", "a//b", "C:/x", ""]
)
def test_safe_destination_refuses_escapes(tmp_path: Path, bad: str) -> None:
    with pytest.raises(UnsafePathError):
        sync.safe_destination(tmp_path, bad)


def test_safe_destination_refuses_symlink_out(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "reports").symlink_to(outside)
    with pytest.raises(UnsafePathError, match="symlink"):
        sync.safe_destination(dest, "reports/x.md")
    (dest / "inside").mkdir()
    (dest / "artifacts").symlink_to(dest / "inside")
    assert (
        sync.safe_destination(dest, "artifacts/y.json")
        == (dest / "inside" / "y.json").resolve().parent.parent / "artifacts" / "y.json"
    )


def _fake_run(root: Path, run_id: str) -> RunRecord:
    (root / "artifacts" / "sub").mkdir(parents=True)
    (root / "reports").mkdir()
    (root / "artifacts" / "sub" / "big.bin").write_bytes(os.urandom(300_000))
    (root / "reports" / "r.md").write_text("report ✓\n")
    (root / "reports" / "link.md").symlink_to("/etc/hostname")  # never followed by the manifest
    run = root / "versa_runs" / run_id
    run.mkdir(parents=True)
    started = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=1)  # before any file above
    (run / "status.json").write_text(json.dumps({"started_at": started.isoformat()}))
    (run / "output.ipynb").write_text('{"cells": []}')
    (run / "run.log").write_text("log\n")
    return _record(run_id, root)


def test_sync_transfers_changes_once_and_resumes(tmp_path: Path) -> None:
    target_root, dest = tmp_path / "target", tmp_path / "dest"
    record = _fake_run(target_root, "20260101T000000Z-abcdef")
    backend = LocalBackend(target_root)
    first = sync.sync_run(backend, record, dest)
    assert sorted(first.transferred) == ["artifacts/sub/big.bin", "reports/r.md",
                                         f"{record.run_dir}/output.ipynb", f"{record.run_dir}/run.log"]  # fmt: skip
    assert (dest / "artifacts/sub/big.bin").read_bytes() == (
        target_root / "artifacts/sub/big.bin"
    ).read_bytes()
    assert not (dest / "reports/link.md").exists()
    assert first.notebook_copy == dest / "reports/notebooks/20260101T000000Z-abcdef_t.ipynb"
    again = sync.sync_run(backend, record, dest)
    assert again.transferred == [] and again.bytes_transferred == 0
    # unchanged files (same size and mtime) are not rehashed: the target keeps a hash cache
    cache = json.loads((target_root / "versa_runs" / "manifest_cache.json").read_text())
    assert cache["reports/r.md"]["sha256"] == sync.sha256_file(target_root / "reports/r.md")
    # A changed file is fetched again, resuming from an existing partial download.
    new = os.urandom(200_000)
    (target_root / "artifacts/sub/big.bin").write_bytes(new)
    part = dest / "artifacts/sub/big.bin.part"
    part.write_bytes(new[:50_000])
    third = sync.sync_run(backend, record, dest)
    assert third.transferred == ["artifacts/sub/big.bin"] and third.bytes_transferred == 150_000
    assert (dest / "artifacts/sub/big.bin").read_bytes() == new and not part.exists()
    # A corrupt partial download fails the checksum and is removed, never renamed into place.
    (target_root / "reports/r.md").write_text("changed\n")
    (dest / "reports/r.md.part").write_text("WRONG!!")
    with pytest.raises(TransferError, match="sha256 mismatch"):
        sync.sync_run(backend, record, dest)
    assert (
        not (dest / "reports/r.md.part").exists()
        and (dest / "reports/r.md").read_text() == "report ✓\n"
    )
    assert sync.sync_run(backend, record, dest).transferred == ["reports/r.md"]


def test_sync_on_local_target_transfers_nothing(tmp_path: Path) -> None:
    record = _fake_run(tmp_path, "20260101T000000Z-abcdef")
    for _ in range(2):
        result = sync.sync_run(LocalBackend(tmp_path), record, tmp_path)
        assert result.transferred == [] and result.bytes_transferred == 0
    assert json.loads((tmp_path / sync.LOCAL_MANIFEST).read_text())["reports/r.md"][
        "size_bytes"
    ] == len("report ✓\n".encode())


def test_log_reader_keeps_multibyte_characters_whole(tmp_path: Path, monkeypatch) -> None:
    record = _record("20260101T000000Z-abcdef", tmp_path)
    log_path = tmp_path / record.run_dir / "run.log"
    log_path.parent.mkdir(parents=True)
    text = "αβγ ✓ café\n" * 3 + "last line\n"
    log_path.write_bytes(text.encode())
    monkeypatch.setattr(logs, "LOG_READ_BYTES", 5)  # split characters across reads
    reader = logs.LogReader(LocalBackend(tmp_path), record)
    assert reader.read_new() == text and reader.offset == len(text.encode())
    with open(log_path, "ab") as fh:
        fh.write("ü".encode()[:1])
    assert reader.read_new() == ""  # half a character waits for its second byte
    with open(log_path, "ab") as fh:
        fh.write("ü".encode()[1:] + b"\n")
    assert reader.read_new() == "ü\n"
    tail, offset = logs.tail_lines(LocalBackend(tmp_path), record, 2)
    assert tail == "last line\nü\n" and offset == log_path.stat().st_size


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))


def test_state_derivation_from_files(tmp_path: Path) -> None:
    record = _record("20260101T000000Z-abcdef", tmp_path)
    run = tmp_path / record.run_dir
    backend = LocalBackend(tmp_path)
    assert read_status(backend, record).state is RunState.LOST
    _write(run / "input.ipynb", "{}")
    assert read_status(backend, record).state is RunState.STARTING
    started = dt.datetime.now(dt.timezone.utc).isoformat()
    _write(
        run / "status.json",
        {"state": "running", "heartbeat_interval_s": 1.0, "started_at": started},
    )
    _write(run / "heartbeat", "x")
    assert read_status(backend, record).state is RunState.RUNNING
    old = run.joinpath("heartbeat").stat().st_mtime - 10
    os.utime(run / "heartbeat", (old, old))
    assert read_status(backend, record).state is RunState.STALE  # 10 s > 4 x 1 s
    _write(run / "exit_code", "3\n")  # exit_code written, final status.json not yet
    status = read_status(backend, record)
    assert status.state is RunState.FAILED and status.exit_code == 3
    _write(run / "status.json", {"state": "killed", "exit_code": 143})
    assert read_status(backend, record).state is RunState.KILLED
    assert RunState.KILLED.is_terminal and not RunState.RUNNING.is_terminal


def test_progress_counts_code_cells(tmp_path: Path) -> None:
    record = _record("20260101T000000Z-abcdef", tmp_path)
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=30)
    from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

    def cell(state: str, **papermill: str) -> dict:
        return {"papermill": {"status": state, **papermill}}

    notebook = new_notebook(cells=[  # what papermill writes: a valid nbformat 4 notebook
        new_markdown_cell("# t", metadata=cell("completed")),
        new_code_cell("a = 1", metadata=cell("completed")),
        new_code_cell("b = 2", metadata=cell("completed")),
        new_code_cell("c = 3", metadata=cell("running", start_time=now.isoformat())),
        new_code_cell("d = 4", metadata=cell("pending")),
    ])  # fmt: skip
    _write(tmp_path / record.run_dir / "output.ipynb", notebook)
    progress = read_progress(LocalBackend(tmp_path), record)
    assert (progress.cells_done, progress.cells_total, progress.current_cell) == (2, 4, 3)
    assert 29 <= progress.current_cell_elapsed_s < 60
    _write(tmp_path / record.run_dir / "output.ipynb", '{"cells": [')  # torn write
    assert read_progress(LocalBackend(tmp_path), record) is None


def test_wait_times_out_with_injected_clock(tmp_path: Path) -> None:
    from versa_runner.errors import WaitTimeoutError

    record = _record("20260101T000000Z-abcdef", tmp_path)
    run = tmp_path / record.run_dir
    _write(run / "input.ipynb", "{}")
    _write(run / "status.json", {"state": "running", "heartbeat_interval_s": 60.0,
                                 "started_at": dt.datetime.now(dt.timezone.utc).isoformat()})  # fmt: skip
    _write(run / "heartbeat", "x")
    ticks = iter(range(100))
    sleeps: list[float] = []
    with pytest.raises(WaitTimeoutError) as info:
        logs.wait(LocalBackend(tmp_path), record, timeout_s=5, poll_s=2,
                       clock=lambda: float(next(ticks)), sleep=sleeps.append)  # fmt: skip
    assert info.value.exit_code == 124 and sleeps and all(s == 2 for s in sleeps)


def test_launcher_bootstrap_failure_and_secret_handling(tmp_path: Path) -> None:
    """The launcher alone (no papermill reached): secrets loaded then deleted, names-only logging,
    a failing bootstrap step ends the run as bootstrap_failed with exit code 5."""
    import subprocess
    import sys

    run = tmp_path / "versa_runs" / "r1"
    run.mkdir(parents=True)
    secret = "bootstrap-secret-123456"
    (run / "secrets.env").write_bytes(encode_secrets_env({"MY_TOKEN": secret}))
    step = "import os, sys; print('token length', len(os.environ['MY_TOKEN'])); sys.exit(3)"
    launch = {
        "cwd": str(tmp_path),
        "bootstrap": [{"argv": [sys.executable, "-c", step], "timeout_s": 30}],
    }
    (run / "launch.json").write_text(json.dumps(launch))
    done = subprocess.run([*LAUNCHER, str(run)], timeout=60, check=False)
    assert done.returncode == 5
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "bootstrap_failed" and status["exit_code"] == 5
    assert (run / "exit_code").read_text().strip() == "5"
    log = (run / "run.log").read_text()
    assert "token length 23" in log and "loaded 1 secret(s): MY_TOKEN" in log
    assert "bootstrap step 1 failed with exit code 3" in log
    assert secret not in log + (run / "status.json").read_text()
    assert not (run / "secrets.env").exists()
    record = _record("r1", tmp_path, run_dir="versa_runs/r1")
    assert read_status(LocalBackend(tmp_path), record).state is RunState.BOOTSTRAP_FAILED


def _launcher_run(tmp_path: Path, name: str, steps: list[dict]) -> Path:
    run = tmp_path / "versa_runs" / name
    run.mkdir(parents=True)
    launch = {"cwd": str(tmp_path), "bootstrap": steps, "kill_grace_s": 2}
    (run / "launch.json").write_text(json.dumps(launch))
    return run


def test_launcher_bootstrap_timeout_and_stop_signal_end_the_step(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    run = _launcher_run(tmp_path, "timeout", [{"argv": sleeper, "timeout_s": 0.5}])
    started = time.monotonic()
    done = subprocess.run([*LAUNCHER, str(run)], timeout=60, check=False)
    assert done.returncode == 5 and time.monotonic() - started < 20
    assert "failed with exit code 124" in (run / "run.log").read_text()

    run = _launcher_run(tmp_path, "stopped", [{"argv": sleeper, "timeout_s": 600}])
    proc = subprocess.Popen([*LAUNCHER, str(run)], start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        log = run / "run.log"
        while not log.exists() or "bootstrap step 1:" not in log.read_text(errors="replace"):
            assert time.monotonic() < deadline, "the bootstrap step never started"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 128 + signal.SIGTERM
        assert json.loads((run / "status.json").read_text())["state"] == "killed"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_output_plain_json_and_redaction(tmp_path: Path) -> None:
    import io

    from versa_runner.cli.output import Output
    from versa_runner.errors import JobFailedError

    record = _record("20260101T000000Z-abcdef", tmp_path, secret_names=["HF_TOKEN"])
    out, err = io.StringIO(), io.StringIO()
    plain = Output(stream=out, err_stream=err, redactor=Redactor(["hf_value_1234"]),
                   command_options="--output-dir /x")  # fmt: skip
    plain.submitted(record, detached=True)
    plain.log_text("token=hf_value_1234 done\n")
    plain.error(JobFailedError("run failed hf_value_1234", hint="read the log"))
    text = out.getvalue()
    assert "versa-run wait 20260101T000000Z-abcdef --output-dir /x" in text
    assert "hf_value_1234" not in text + err.getvalue() and "token=*** done" in text
    assert err.getvalue() == "error: run failed ***\nhint: read the log\n"
    out = io.StringIO()
    machine = Output(json_mode=True, stream=out, err_stream=io.StringIO())
    machine.submitted(record, detached=False)
    machine.status(record, RunStatus(RunState.SUCCEEDED, exit_code=0))
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["secret_names"] == ["HF_TOKEN"] and first["detached"] is False
    assert second["state"] == "succeeded" and second["exit_code"] == 0


class _FlakyLog(LocalBackend):
    """Fault injector in front of the real local backend: the first `cuts` log reads fail."""

    def __init__(self, root: Path, cuts: int) -> None:
        super().__init__(root)
        self.cuts = cuts

    def read_bytes(self, path: str, *, offset: int = 0, length: int | None = None):
        if path.endswith("run.log") and self.cuts > 0:
            self.cuts -= 1
            from versa_runner.errors import UnreachableError

            raise UnreachableError("injected: proxy dropped the connection")
        return super().read_bytes(path, offset=offset, length=length)


def test_follow_rides_out_a_dropped_connection_from_the_same_offset(tmp_path: Path) -> None:
    from versa_runner.errors import UnreachableError

    record = _record("20260101T000000Z-abcdef", tmp_path)
    run = tmp_path / record.run_dir
    _write(run / "input.ipynb", "{}")
    _write(run / "status.json", {"state": "succeeded"})
    _write(run / "exit_code", "0")
    _write(run / "run.log", "first line\nsecond line\n")
    emitted: list[str] = []
    status = logs.follow(_FlakyLog(tmp_path, cuts=2), record, emit=emitted.append,
                              offset=len("first line\n"), sleep=lambda s: None)  # fmt: skip
    assert status.state is RunState.SUCCEEDED and "".join(emitted) == "second line\n"
    ticks = iter(range(0, 10_000, 100))
    with pytest.raises(UnreachableError):  # past the patience window it gives up, loudly
        logs.follow(_FlakyLog(tmp_path, cuts=10**6), record, emit=emitted.append,
                         sleep=lambda s: None, clock=lambda: float(next(ticks)), patience_s=600)  # fmt: skip
