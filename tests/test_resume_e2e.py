"""A lost GPU session resumes elsewhere (issue 14), end to end on real jupyter_servers.

`build_pruned` on the tiny fixture model runs as a detached job on server A while `sync --watch`
mirrors its outputs. The job saves its state every second; as soon as a state appears (the one
profiling pass part-way), the job is frozen, the watcher brings the state home, and then the job and server A are killed: the
session is gone. `versa-run resume RUN` against a fresh server B with a fresh root re-submits the
same task, parameters and code, uploads the state, and the job continues from it. Its kept
experts and scores must equal those of an uninterrupted build of the same inputs.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from jupyter_fixtures import start_jupyter_server
from runner_support import cli, runner_env, wait_for

from versa_runner.target import proc

TASK = "build_pruned_20b_eaftreap_budgeted"
SUBDIR = "20b_pruned_models_eaftreap_budgeted"
ROWS = 256  # a few seconds of profiling, so a save lands mid-pass
FLAGS = ["--calib-pack-sample-strategy", "per_file", "--batch-size", "1", "--keep-frac", "0.75",
         "--min-keep-per-layer", "16", "--max-keep-per-layer", "32", "--core-pos-top-m", "4",
         "--core-count-top-m", "0", "--num-rows", str(ROWS), "--max-seq-length", "256",
         "--seed", "7", "--save-every-s", "1"]  # fmt: skip
COMPARED = ("keep_experts_by_layer.json", "keep_counts_by_layer.json",
            "core_experts_by_layer.json")  # fmt: skip


def _connect(server, where: Path) -> list[str]:  # noqa: ANN001
    where.mkdir(parents=True, exist_ok=True)
    (where / "url").write_text(server.url + "\n")
    (where / "token").write_text(server.token + "\n")
    return ["--url-file", str(where / "url"), "--token-file", str(where / "token")]


def _signal_job(root: Path, run_id: str, sig: int) -> None:
    """Signal every process of the run: the launcher and all its descendants (recorded pid)."""
    status = json.loads((root / "versa_runs" / run_id / "status.json").read_text())
    pids = [int(status["pid"]), *proc.descendants(int(status["pid"]))]
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _profile_state(root: Path) -> Path:
    return root / "artifacts" / SUBDIR / "profile_state.pt"


def _state_progress(path: Path) -> tuple[int, int]:
    """(pass, batches done in it) of a saved profile state."""
    import torch

    state = torch.load(path, weights_only=True)
    return int(state["pass"]), int(state["done"])


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_killed_mid_profile_resumes_on_a_fresh_server_and_matches(tmp_path: Path) -> None:
    from versa_kernels.eaftreap.build import build_pruned
    from versa_kernels.fixtures import make_calib_packs, make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(tmp_path / "base", layers=2, experts=32, top_k=4)
    packs = make_calib_packs(tmp_path / "packs", rows=ROWS)
    inputs = ["--model-path", str(ckpt), "--calib-pack-files", ",".join(map(str, packs))]
    out = tmp_path / "out"
    out.mkdir()
    env = runner_env(tmp_path, HF_HUB_OFFLINE="1")

    server_a = start_jupyter_server(tmp_path / "server_a", token=secrets.token_hex(16))
    watcher = None
    try:
        connect_a = _connect(server_a, tmp_path / "a")
        argv = ["submit", "--task", TASK, *FLAGS, *inputs, "--env", "HF_HUB_OFFLINE=1", *connect_a]
        submitted = cli(argv, out, env, timeout_s=180)
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        run_id = next((out / ".versa_runner" / "runs").glob("*.json")).stem
        watch = [sys.executable, "-m", "versa_runner.cli", "sync", run_id, "--watch", "0.01",
                 *connect_a]  # fmt: skip
        watcher = subprocess.Popen(watch, cwd=out, env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)  # fmt: skip
        remote_state = _profile_state(server_a.root_dir)
        wait_for(remote_state.exists, 240, "the profile state on server A (a save mid-pass)")
        _signal_job(server_a.root_dir, run_id, signal.SIGSTOP)  # the session freezes mid-profile
        pass_no, done = _state_progress(remote_state)
        assert pass_no == 1 and 0 < done < ROWS, (
            f"not stopped mid-pass: pass {pass_no}, {done} done"
        )
        local_state = _profile_state(out)
        wait_for(lambda: local_state.exists() and _sha(local_state) == _sha(remote_state), 60,
                 "sync --watch to bring the profile state home")  # fmt: skip
        _signal_job(server_a.root_dir, run_id, signal.SIGKILL)  # ... and is gone, server and all
    finally:
        if watcher is not None:
            watcher.kill()
            watcher.wait(timeout=10)
        server_a.stop()
    assert not (out / "artifacts" / SUBDIR / "keep_experts_by_layer.json").exists()
    # Watching the dead session fails in one line that says how the run goes on.
    lost = cli(["sync", run_id, "--watch", "0.01", *connect_a], out, env, timeout_s=120)
    assert lost.returncode == 3 and "Traceback" not in lost.stderr, lost.stderr
    assert f"versa-run resume {run_id}" in lost.stderr

    server_b = start_jupyter_server(tmp_path / "server_b", token=secrets.token_hex(16))
    try:
        assert not any(server_b.root_dir.iterdir())  # a fresh root: nothing of run A is there
        connect_b = _connect(server_b, tmp_path / "b")
        resumed = cli(["resume", run_id, "--no-detach", *connect_b], out, env, timeout_s=300)
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
        assert f"continues {run_id}" in resumed.stdout + resumed.stderr
        new_ids = {p.stem for p in (out / ".versa_runner" / "runs").glob("*.json")} - {run_id}
        assert len(new_ids) == 1
        new_id = new_ids.pop()
        assert (server_b.root_dir / "versa_runs" / new_id / "params.yaml").exists()
    finally:
        server_b.stop()
    art = out / "artifacts" / SUBDIR
    meta = json.loads((art / "profile_meta.json").read_text())
    assert meta["resumed_from_batch"] == done  # the batches done on A came from its state

    # The uninterrupted build of the same inputs, in this process.
    ref = tmp_path / "reference"
    submission = out / ".versa_runner" / "submissions" / f"{run_id}.json"
    params = json.loads(submission.read_text())["params"]  # exactly what both jobs were given
    accepted = inspect.signature(build_pruned).parameters
    build_pruned(**{k: v for k, v in params.items() if k in accepted},
                 artifacts_dir=str(ref / "artifacts"), reports_dir=str(ref / "reports"))  # fmt: skip
    ref_meta = json.loads((ref / "artifacts" / "profile_meta.json").read_text())
    assert ref_meta["resumed_from_batch"] == 0
    for name in COMPARED:
        assert json.loads((art / name).read_text()) == json.loads(
            (ref / "artifacts" / name).read_text()
        ), name
    import pyarrow.parquet as pq

    resumed_scores = pq.read_table(art / "scores.parquet").to_pylist()
    reference_scores = pq.read_table(ref / "artifacts" / "scores.parquet").to_pylist()
    assert resumed_scores == reference_scores
    for key in ("p_lo", "h_lo", "scored_tokens", "region_counts"):
        assert meta[key] == ref_meta[key], key


def test_resume_refuses_in_one_line_without_submission_or_state(tmp_path: Path) -> None:
    from versa_runner.runs import journal, resume
    from versa_runner.runs.journal import RunRecord

    out = tmp_path / "out"
    run_id = "20260101T000000Z-noresm"
    journal.save_record(out, RunRecord(run_id=run_id, task=TASK, notebook="build_pruned.ipynb",
                                       backend="local", target="local", root=str(out),
                                       run_dir=f"versa_runs/{run_id}", job_cwd=str(out),
                                       params_hash="0", created_at="2026-01-01T00:00:00+00:00"))  # fmt: skip
    env = runner_env(tmp_path)
    done = cli(["--output-dir", str(out), "resume", run_id], tmp_path, env)
    assert done.returncode == 2 and "no submission was kept" in done.stderr.splitlines()[0]
    code = resume.keep_code(out, resume_project_root())
    resume.remember_submission(out, resume.Submission(
        run_id=run_id, task=TASK, notebook="notebooks/build_pruned.ipynb", params={},
        code_sha256=code.sha256))  # fmt: skip
    done = cli(["--output-dir", str(out), "resume", run_id], tmp_path, env)
    assert done.returncode == 2 and "no resumable state" in done.stderr.splitlines()[0]
    assert "Traceback" not in done.stderr


def resume_project_root() -> Path:
    from versa_runner.runs.prepare import PROJECT_ROOT

    return PROJECT_ROOT
