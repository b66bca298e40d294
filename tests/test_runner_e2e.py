"""The run protocol end to end on the local target: real `versa-run` processes, real launcher,
real papermill and ipykernel. Each test owns a temporary output directory and kills only the
process groups its own run recorded."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from runner_support import (
    TEST_NOTEBOOKS,
    cli,
    kill_run_processes,
    only_run_id,
    pid_alive,
    pids_in_group,
    read_status,
    run_dir,
    runner_env,
    wait_for,
)

from versa_runner.backends.local import LocalBackend
from versa_runner.runs import lifecycle

pytestmark = pytest.mark.slow


def test_detached_ok_notebook_then_status_logs_wait_sync(tmp_path: Path) -> None:
    env = runner_env(tmp_path)
    submitted = cli(
        [
            "submit",
            "--notebook",
            str(TEST_NOTEBOOKS / "ok.ipynb"),
            "-p",
            "greeting",
            "hey",
            "-p",
            "repeat",
            "2",
        ],
        tmp_path,
        env,
    )
    assert submitted.returncode == 0, submitted.stderr
    run_id = only_run_id(tmp_path)
    for command in ("logs", "wait", "sync", "kill"):
        assert f"versa-run {command} {run_id}" in submitted.stdout  # the exact follow-up commands
    waited = cli(["wait", run_id[:12], "--timeout", "90"], tmp_path, env)
    assert waited.returncode == 0, waited.stdout + waited.stderr
    assert "succeeded" in waited.stdout
    assert (tmp_path / "reports" / "ok.md").read_text() == f"heyhey x2 run={run_id}\n".replace(
        "heyhey", "hey"
    )
    assert json.loads((tmp_path / "artifacts/ok/result.json").read_text())["cwd"] == str(tmp_path)
    status = cli(["status", "--json"], tmp_path, env)  # RUN omitted: the newest run
    info = json.loads(status.stdout)
    assert info["state"] == "succeeded" and info["exit_code"] == 0 and info["run_id"] == run_id
    assert info["progress"]["cells_done"] == info["progress"]["cells_total"] == 4  # 3 + injected
    logs = cli(["logs", "last"], tmp_path, env)
    assert "OK_NOTEBOOK_DONE heyhey café ✓" in logs.stdout
    tail = cli(["logs", run_id, "--tail", "1"], tmp_path, env)
    assert tail.stdout.count("\n") == 1 and "state=succeeded exit_code=0" in tail.stdout
    rd = run_dir(tmp_path, run_id)
    for name in (
        "input.ipynb",
        "params.yaml",
        "launcher.pyz",
        "output.ipynb",
        "run.log",
        "status.json",
        "heartbeat",
        "exit_code",
    ):
        assert (rd / name).exists(), name
    assert (rd / "exit_code").read_text().strip() == "0"
    for _ in range(2):  # the job cwd is the output dir: nothing to transfer, ever
        synced = cli(["sync", run_id, "--json"], tmp_path, env)
        assert json.loads(synced.stdout)["transferred"] == []
    notebook = tmp_path / "reports" / "notebooks" / f"{run_id}_ok.ipynb"
    assert "OK_NOTEBOOK_DONE" in notebook.read_text()
    # launching the same run dir again reports the first launch instead of starting another
    again = lifecycle.launch(LocalBackend(tmp_path), f"versa_runs/{run_id}")
    assert again["already_launched"] is True
    assert "starting papermill" not in (rd / "run.log").read_text().split("state=succeeded")[1]
    listed = cli(["list"], tmp_path, env)
    assert run_id in listed.stdout and "succeeded" in listed.stdout


def test_raising_cell_fails_no_detach_with_evidence(tmp_path: Path) -> None:
    env = runner_env(tmp_path)
    result = cli(
        ["submit", "--notebook", str(TEST_NOTEBOOKS / "raises.ipynb"), "--no-detach"], tmp_path, env
    )
    assert result.returncode == 1
    assert "deliberate failure from raises.ipynb" in result.stdout  # streamed while following
    assert result.stderr.startswith("error: run ") and "Traceback" not in result.stderr
    run_id = only_run_id(tmp_path)
    assert read_status(tmp_path, run_id)["state"] == "failed"
    output = json.loads((run_dir(tmp_path, run_id) / "output.ipynb").read_text())
    errors = [
        o for c in output["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"
    ]
    assert (
        errors
        and errors[0]["ename"] == "ValueError"
        and "deliberate failure" in errors[0]["evalue"]
    )
    logs = cli(["logs", run_id], tmp_path, env)
    assert "ValueError: deliberate failure from raises.ipynb" in logs.stdout
    status = cli(["status", run_id], tmp_path, env)
    assert "failed" in status.stdout and "exit_code=1" in status.stdout
    assert "cell 3/5 completed; cell 4 failed" in status.stdout
    followed = cli(["logs", run_id, "--follow"], tmp_path, env)  # exits with the outcome, as wait
    assert followed.returncode == 1 and "deliberate failure" in followed.stdout


def test_exit_codes_of_sys_exit_and_a_dead_kernel(tmp_path: Path) -> None:
    """papermill's semantics, recorded faithfully: sys.exit(1) fails (1), sys.exit(0) ends the
    notebook early and succeeds, a dying kernel fails with 138. Submitted together to save time."""
    env = runner_env(tmp_path)
    expected = {
        "sysexit1": ("failed", 1),
        "sysexit0": ("succeeded", 0),
        "deadkernel": ("failed", 138),
    }
    for name in expected:
        (tmp_path / name).mkdir()
        submitted = cli(
            ["submit", "--notebook", str(TEST_NOTEBOOKS / f"{name}.ipynb")], tmp_path / name, env
        )
        assert submitted.returncode == 0, submitted.stderr
    for name, (state, code) in expected.items():
        out_dir = tmp_path / name
        run_id = only_run_id(out_dir)
        waited = cli(["wait", run_id, "--timeout", "120"], out_dir, env, timeout_s=150)
        assert waited.returncode == code, (name, waited.stdout, waited.stderr)
        assert read_status(out_dir, run_id)["state"] == state
        assert (run_dir(out_dir, run_id) / "exit_code").read_text().strip() == str(code)
    assert (
        "AFTER_EXIT_0"
        not in (
            run_dir(tmp_path / "sysexit0", only_run_id(tmp_path / "sysexit0")) / "run.log"
        ).read_text()
    )
    assert "DeadKernelError" in cli(["logs", "--tail", "40"], tmp_path / "deadkernel", env).stdout


def _start_sleeper(tmp_path: Path, env: dict[str, str], seconds: int) -> tuple[str, list[int]]:
    """Submit sleep.ipynb detached; return its run id and (kernel pid, child pid) once running."""
    submitted = cli(
        [
            "submit",
            "--notebook",
            str(TEST_NOTEBOOKS / "sleep.ipynb"),
            "-p",
            "seconds",
            str(seconds),
        ],
        tmp_path,
        env,
    )
    assert submitted.returncode == 0, submitted.stderr
    run_id = only_run_id(tmp_path)
    pid_file = tmp_path / "artifacts" / "sleep_pids.txt"
    wait_for(pid_file.exists, 60, "the sleep notebook to start")
    return run_id, [int(p) for p in pid_file.read_text().split()]


def test_kill_ends_the_whole_process_group(tmp_path: Path) -> None:
    env = runner_env(tmp_path)
    run_id, (kernel_pid, child_pid) = _start_sleeper(tmp_path, env, 300)
    try:
        status = read_status(tmp_path, run_id)
        pgid, papermill_pid = status["pgid"], status["papermill_pid"]
        assert pids_in_group(pgid) and pid_alive(kernel_pid) and pid_alive(child_pid)
        running = cli(["status", run_id], tmp_path, env)
        assert (
            "running" in running.stdout and "cell 3/5 completed; cell 4 running" in running.stdout
        )
        killed = cli(["kill", run_id, "--grace", "10", "--yes"], tmp_path, env)
        assert killed.returncode == 0, killed.stderr
        assert "killed" in killed.stdout
        assert "running" not in killed.stdout and "cell 4 interrupted" in killed.stdout
        wait_for(lambda: not pids_in_group(pgid), 10, "the launcher group to be empty")
        for pid in (papermill_pid, kernel_pid, child_pid):
            wait_for(lambda pid=pid: not pid_alive(pid), 10, f"pid {pid} to end")
        assert pids_in_group(os.getpgid(0))  # sanity: the helper sees live groups (ours)
        final = read_status(tmp_path, run_id)
        assert final["state"] == "killed" and final["exit_code"] == 128 + signal.SIGTERM
        waited = cli(["wait", run_id], tmp_path, env)
        assert waited.returncode == 128 + signal.SIGTERM and "killed" in waited.stdout
    finally:
        kill_run_processes(tmp_path, run_id)


def test_detached_job_survives_its_submitter_being_killed(tmp_path: Path) -> None:
    env = runner_env(tmp_path)
    notebook = str(TEST_NOTEBOOKS / "sleep.ipynb")
    submitter = subprocess.Popen(
        [sys.executable, "-m", "versa_runner.cli", "submit", "--notebook", notebook, "-p", "seconds", "4", "--no-detach"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    run_id = ""
    try:
        wait_for(
            lambda: (tmp_path / "artifacts" / "sleep_pids.txt").exists(), 60, "the job to start"
        )
        run_id = only_run_id(tmp_path)
        submitter.send_signal(signal.SIGKILL)  # the launching versa-run process dies mid-follow
        submitter.wait(timeout=10)
        assert read_status(tmp_path, run_id)["state"] == "running"
        wait_for((run_dir(tmp_path, run_id) / "exit_code").exists, 60, "the job to end")
        # the launcher itself keeps the executed notebook: no versa-run process was alive
        kept = tmp_path / "reports" / "notebooks" / f"{run_id}_sleep.ipynb"
        assert "SLEEP_DONE" in kept.read_text()
        waited = cli(["wait", run_id, "--timeout", "60"], tmp_path, env)
        assert waited.returncode == 0, waited.stdout + waited.stderr
        assert "SLEEP_DONE" in (run_dir(tmp_path, run_id) / "run.log").read_text()
    finally:
        if submitter.poll() is None:
            submitter.kill()
        if run_id:
            kill_run_processes(tmp_path, run_id)


def test_ctrl_c_stops_following_then_stale_when_the_launcher_dies(tmp_path: Path) -> None:
    env = runner_env(tmp_path, VERSA_RUNNER_HEARTBEAT_S="0.5")
    notebook = str(TEST_NOTEBOOKS / "sleep.ipynb")
    follower = subprocess.Popen(
        [sys.executable, "-m", "versa_runner.cli", "submit", "--notebook", notebook, "--no-detach"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    run_id = ""
    try:
        pid_file = tmp_path / "artifacts" / "sleep_pids.txt"
        wait_for(pid_file.exists, 60, "the sleep notebook to start")
        run_id = only_run_id(tmp_path)
        pids = [int(p) for p in pid_file.read_text().split()]
        follower.send_signal(signal.SIGINT)  # Ctrl-C while following
        _, err = follower.communicate(timeout=20)
        assert follower.returncode == 130
        assert "keeps running" in err and f"versa-run kill {run_id}" in err
        assert "Traceback" not in err
        status = read_status(tmp_path, run_id)
        assert status["state"] == "running" and all(pid_alive(pid) for pid in pids)
        assert status["heartbeat_interval_s"] == 0.5
        os.kill(status["pid"], signal.SIGKILL)  # a launcher OOM-killed: no exit_code, no heartbeat
        time.sleep(2.5)
        result = cli(["status", run_id, "--json"], tmp_path, env)
        assert json.loads(result.stdout)["state"] == "stale"
        waited = cli(["wait", run_id], tmp_path, env)
        assert waited.returncode == 4 and "stale" in waited.stderr
        # papermill, the kernel and its child outlived the launcher; kill still finds them
        survivors = [status["papermill_pid"], *pids]
        assert all(pid_alive(pid) for pid in survivors)
        killed = cli(["kill", run_id, "--grace", "5", "--yes"], tmp_path, env)
        assert killed.returncode == 0 and "killed" in killed.stdout, killed.stderr
        for pid in survivors:
            wait_for(lambda pid=pid: not pid_alive(pid), 10, f"pid {pid} to end")
    finally:
        if follower.poll() is None:
            follower.kill()
        if run_id:
            kill_run_processes(tmp_path, run_id)


def test_secret_reaches_the_job_and_nothing_else(tmp_path: Path) -> None:
    secret = "s3cr3t-VALUE-4c1d2e"
    env = runner_env(tmp_path, VERSA_TEST_SECRET=secret, OTHER_API_KEY="not-requested-1234")
    submitted = cli(
        [
            "submit",
            "--notebook",
            str(TEST_NOTEBOOKS / "secret.ipynb"),
            "--secret",
            "VERSA_TEST_SECRET",
            "--json",
        ],
        tmp_path,
        env,
    )
    assert submitted.returncode == 0, submitted.stderr
    assert json.loads(submitted.stdout)["secret_names"] == ["VERSA_TEST_SECRET"]
    run_id = only_run_id(tmp_path)
    rd = run_dir(tmp_path, run_id)
    seen_ps: list[str] = []
    while not (rd / "exit_code").exists():
        seen_ps.append(
            subprocess.run(["ps", "-eww", "-o", "args="], capture_output=True, text=True).stdout
        )
        time.sleep(0.3)
    waited = cli(["wait", run_id], tmp_path, env)
    assert waited.returncode == 0, (rd / "run.log").read_text()  # the secret did reach the job
    assert "SECRET_PRESENT length 19" in (rd / "run.log").read_text()
    # only requested secrets reach the job, and only through secrets.env (the local target
    # scrubs secret-looking variables from the inherited environment)
    assert "OTHER_API_KEY absent" in (rd / "run.log").read_text()
    assert not (rd / "secrets.env").exists()  # deleted by the launcher after reading
    assert len(seen_ps) >= 2 and not any(secret in text for text in seen_ps)
    journal = tmp_path / ".versa_runner" / "runs" / f"{run_id}.json"
    for path in (
        rd / "run.log",
        rd / "params.yaml",
        rd / "status.json",
        rd / "launch.json",
        rd / "output.ipynb",
        journal,
    ):
        assert secret not in path.read_text(), path.name
    assert secret not in submitted.stdout + submitted.stderr + waited.stdout + waited.stderr


VALIDATE_REPORT = "reports/validate_gpt_oss_expert_math_toy.md"


def test_validate_task_detached_and_no_detach(tmp_path: Path) -> None:
    """The real task through the CLI both ways, overlapped to halve the wall time."""
    detached_dir, attached_dir = tmp_path / "detached", tmp_path / "attached"
    detached_dir.mkdir()
    attached_dir.mkdir()
    env = runner_env(tmp_path)
    args = ["--task", "validate_expert_math_toy", "--trials", "1", "--device", "cpu"]
    submitted = cli(args, detached_dir, env)
    assert submitted.returncode == 0, submitted.stderr
    detached_id = only_run_id(detached_dir)
    # --output-dir, not the cwd, decides where artifacts/, reports/ and the journal go
    attached = cli(
        [*args, "--no-detach", "--output-dir", str(attached_dir)], tmp_path, env, timeout_s=300
    )
    assert attached.returncode == 0, attached.stdout[-3000:] + attached.stderr
    assert "succeeded" in attached.stdout
    waited = cli(["wait", detached_id, "--timeout", "240"], detached_dir, env, timeout_s=300)
    assert waited.returncode == 0, (run_dir(detached_dir, detached_id) / "run.log").read_text()[
        -3000:
    ]
    assert not (tmp_path / "reports").exists() and not (tmp_path / ".versa_runner").exists()
    for out_dir in (detached_dir, attached_dir):
        run_id = only_run_id(out_dir)
        assert "max_abs" in (out_dir / VALIDATE_REPORT).read_text().lower().replace(" ", "_")
        executed = out_dir / "reports" / "notebooks" / f"{run_id}_validate_expert_math_toy.ipynb"
        assert executed.exists()
        params = (run_dir(out_dir, run_id) / "params.yaml").read_text()
        assert "trials: 1" in params and "device: cpu" in params and f"run_id: {run_id}" in params


def test_sync_watch_keeps_pulling_until_the_run_ends(tmp_path: Path) -> None:
    env = runner_env(tmp_path)
    run_id, _ = _start_sleeper(tmp_path, env, 4)
    dest = tmp_path / "pulled"
    try:
        watched = cli(["sync", run_id, "--dest", str(dest), "--watch", "0.02"], tmp_path, env,
                      timeout_s=120)  # fmt: skip
        assert watched.returncode == 0, watched.stderr
        assert "next sync in 1.2 s" in watched.stderr  # it synced while the job still ran
        assert (dest / "artifacts" / "sleep_pids.txt").is_file()
        executed = next((dest / "reports" / "notebooks").glob(f"{run_id}_*.ipynb"))
        assert "SLEEP_DONE" in executed.read_text()  # the final sync came after the end
        bad = cli(["sync", run_id, "--watch", "0"], tmp_path, env)
        assert bad.returncode == 2 and "--watch" in bad.stderr
    finally:
        kill_run_processes(tmp_path, run_id)
