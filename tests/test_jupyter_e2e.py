"""`versa-run` end to end against real jupyter_server instances on loopback.

Real processes all the way: the CLI in a subprocess, jupyter_server, its launcher kernel, the
uploaded launcher, papermill and ipykernel on the "remote" side. The servers are shared by the
session (jupyter_fixtures); each test uses its own output directory and kills only process
groups its own run recorded.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import requests
from faultproxy import FaultProxy, free_port
from runner_support import TEST_NOTEBOOKS, cli, runner_env, wait_for

if TYPE_CHECKING:
    from jupyter_fixtures import JupyterServer

pytest_plugins = ["jupyter_fixtures"]
pytestmark = pytest.mark.slow

SECRET_NAME = "VERSA_TEST_SECRET"


def connect_args(server: JupyterServer, tmp_path: Path, *, token: str | None = None) -> list[str]:
    """`--url-file` (+ `--token-file`): the URL and token never go on the command line."""
    url_file = tmp_path / "jupyter_url"
    url_file.write_text(server.url + "\n")
    args = ["--url-file", str(url_file)]
    token = token if token is not None else server.token
    if token:
        token_file = tmp_path / "jupyter_token"
        token_file.write_text(token + "\n")
        args += ["--token-file", str(token_file)]
    return args


def journal_run_id(out: Path) -> str:
    runs = sorted((out / ".versa_runner" / "runs").glob("*.json"))
    assert len(runs) == 1, runs
    return runs[0].stem


def remote_run_dir(server: JupyterServer, run_id: str) -> Path:
    return server.root_dir / "versa_runs" / run_id


def server_kernels(server: JupyterServer) -> list[str]:
    headers = {"Authorization": f"token {server.token}"} if server.token else {}
    resp = requests.get(f"{server.url}/api/kernels", headers=headers, timeout=10)
    resp.raise_for_status()
    return [k["id"] for k in resp.json()]


def kill_remote_run(server: JupyterServer, run_id: str) -> None:
    """Test cleanup: SIGKILL the process groups this run's launcher recorded."""
    status_file = remote_run_dir(server, run_id) / "status.json"
    if not status_file.exists():
        return
    status = json.loads(status_file.read_text())
    for key in ("pgid", "papermill_pid"):
        if status.get(key):
            try:
                os.killpg(int(status[key]), signal.SIGKILL)
            except OSError:
                pass


def test_no_detach_on_token_server_with_a_secret_never_leaks_it(
    token_server: JupyterServer, tmp_path: Path
) -> None:
    server = token_server
    out = tmp_path / "out"
    out.mkdir()
    secret_value = "sv-" + os.urandom(12).hex()
    env = runner_env(tmp_path, **{SECRET_NAME: secret_value})
    connect = connect_args(server, tmp_path)
    argv = [sys.executable, "-m", "versa_runner.cli", "submit", "--no-detach", "--notebook",
            str(TEST_NOTEBOOKS / "secret.ipynb"), "--secret", SECRET_NAME, *connect]  # fmt: skip
    runner = subprocess.Popen(
        argv, cwd=out, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    argv_seen = ""  # every process's argv, sampled while the whole run goes on
    while runner.poll() is None:
        argv_seen += subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
        time.sleep(0.5)
    stdout, stderr = (b.decode() for b in runner.communicate(timeout=30))
    assert runner.returncode == 0, stdout + stderr
    run_id = journal_run_id(out)
    try:
        assert "SECRET_PRESENT length" in stdout  # the log was followed; the job saw the secret
        assert (out / "versa_runs" / run_id / "output.ipynb").exists()  # synced back
        assert (remote_run_dir(server, run_id) / "exit_code").read_text().strip() == "0"
        record = json.loads((out / ".versa_runner" / "runs" / f"{run_id}.json").read_text())
        assert record["backend"] == "jupyter" and record["root"] == str(server.root_dir)
        assert record["secret_names"] == [SECRET_NAME]
        launch = json.loads((remote_run_dir(server, run_id) / "launch.json").read_text())
        code_dir = Path(launch["pythonpath"][0])
        assert code_dir.parent.parent == server.root_dir / "versa_code"
        assert (code_dir / "versa_kernels" / "__init__.py").exists()
        assert server_kernels(server) == [], "the launcher kernel was left running"
        again = cli(["sync", run_id, *connect], out, env)
        assert "0 file(s) transferred" in again.stdout, again.stdout + again.stderr
    finally:
        kill_remote_run(server, run_id)
    assert not (remote_run_dir(server, run_id) / "secrets.env").exists()  # launcher deleted it
    scanned = {"argv": argv_seen, "cli output": stdout + stderr + again.stdout + again.stderr}
    for root in (out, remote_run_dir(server, run_id)):
        for path in root.rglob("*"):
            if path.is_file():
                scanned[str(path)] = path.read_text(errors="replace")
    names = "\n".join(scanned)
    for expected in ("status.json", "run.log", "output.ipynb", "params.yaml", f"{run_id}.json"):
        assert expected in names
    secrets = (secret_value, *server.secrets)
    leaks = [(where, s[:6]) for where, text in scanned.items() for s in secrets if s in text]
    assert not leaks


def test_task_detached_on_basepath_server_then_wait_and_sync(
    basepath_server: JupyterServer, tmp_path: Path
) -> None:
    server = basepath_server
    out = tmp_path / "out"
    out.mkdir()
    env = runner_env(tmp_path)
    connect = connect_args(server, tmp_path)
    args = ["submit", "--task", "validate_expert_math_toy", "--trials", "2", *connect]
    submitted = cli(args, out, env, timeout_s=180)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    run_id = journal_run_id(out)
    assert f"versa-run wait {run_id}" in submitted.stdout
    # Detached: the CLI deleted its launcher kernel while the job runs on without it.
    assert server_kernels(server) == []
    try:
        waited = cli(["wait", run_id, "--timeout", "240", *connect], out, env, timeout_s=300)
        assert waited.returncode == 0, waited.stdout + waited.stderr
        synced = cli(["sync", run_id, *connect], out, env)
        assert synced.returncode == 0, synced.stdout + synced.stderr
    finally:
        kill_remote_run(server, run_id)
    report = out / "reports" / "validate_gpt_oss_expert_math_toy.md"
    assert report.read_bytes() == (server.root_dir / report.relative_to(out)).read_bytes()
    assert (out / "versa_runs" / run_id / "output.ipynb").exists()
    printed = submitted.stdout + submitted.stderr + waited.stdout + synced.stdout
    assert not [s for s in server.secrets if s in printed]


def test_runner_killed_then_logs_follow_and_sync_finish_the_run(
    basepath_server: JupyterServer, tmp_path: Path
) -> None:
    server = basepath_server
    out = tmp_path / "out"
    out.mkdir()
    env = runner_env(tmp_path)
    connect = connect_args(server, tmp_path)
    argv = [sys.executable, "-m", "versa_runner.cli", "submit", "--no-detach", "--notebook",
            str(TEST_NOTEBOOKS / "sleep.ipynb"), "-p", "seconds", "6", *connect]  # fmt: skip
    log_path = tmp_path / "runner.out"
    with open(log_path, "wb") as sink:
        runner = subprocess.Popen(argv, cwd=out, env=env, stdout=sink, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: b"SLEEP_STARTED" in log_path.read_bytes(), 90, "the job to start")
        finally:
            runner.send_signal(signal.SIGKILL)  # the laptop goes away mid-run
            runner.wait(timeout=10)
    run_id = journal_run_id(out)
    try:
        # The killed CLI never deleted its launcher kernel: delete it now, mid-run.
        kernels = server_kernels(server)
        assert kernels, "expected the killed runner's launcher kernel to still exist"
        base_session = requests.Session()
        base_session.get(server.url + "/", timeout=10)  # XSRF cookie of a no-token server
        headers = {
            "X-XSRFToken": base_session.cookies.get("_xsrf", ""),
            "Referer": server.url + "/",
        }
        for kernel_id in kernels:  # restart it, then delete it: the job must not notice either
            base_session.post(f"{server.url}/api/kernels/{kernel_id}/restart", headers=headers,
                              timeout=60).raise_for_status()  # fmt: skip
            base_session.delete(f"{server.url}/api/kernels/{kernel_id}", headers=headers,
                                timeout=30).raise_for_status()  # fmt: skip
        assert server_kernels(server) == []
        port = int(server.url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
        # Re-attach through a *new* URL for the same server (as when Kaggle hands out a fresh
        # proxy URL): runs are keyed by run id, never by URL.
        with FaultProxy(port, cut_after_bytes=1, max_cuts=0) as new_front:
            new_dir = tmp_path / "new_url"
            new_dir.mkdir()
            (new_dir / "url").write_text(new_front.url_for(server.url) + "\n")
            follow_args = ["logs", run_id, "--follow", "--url-file", str(new_dir / "url")]
            followed = cli(follow_args, out, env, timeout_s=120)
        assert followed.returncode == 0, followed.stdout + followed.stderr
        assert "SLEEP_DONE" in followed.stdout and "state=succeeded exit_code=0" in followed.stdout
        # Sync through a proxy that cuts the first connections moving more than 3 kB (REST
        # downloads and the manifest snippet's websocket alike): retries, Range resume and the
        # websocket reconnect must still bring every file home intact.
        with FaultProxy(port, cut_after_bytes=3000, max_cuts=2, direction="down") as proxy:
            cut_dir = tmp_path / "via_proxy"
            cut_dir.mkdir()
            proxied = ["--url-file", str(cut_dir / "url")]
            (cut_dir / "url").write_text(proxy.url_for(server.url) + "\n")
            synced = cli(["sync", run_id, *proxied], out, env)
            assert synced.returncode == 0, synced.stdout + synced.stderr
            assert proxy.cuts >= 1
    finally:
        kill_remote_run(server, run_id)
    for name in ("output.ipynb", "run.log"):
        local, remote = out / "versa_runs" / run_id / name, remote_run_dir(server, run_id) / name
        assert local.read_bytes() == remote.read_bytes(), name
    assert not list(out.rglob("*.part")), "a partial download was left behind"
    assert (remote_run_dir(server, run_id) / "exit_code").read_text().strip() == "0"
    executed = json.loads((out / "versa_runs" / run_id / "output.ipynb").read_text())
    states = [c["metadata"]["papermill"]["status"] for c in executed["cells"]]
    assert set(states) == {"completed"}, states


def test_failures_are_named_failing_cell_auth_lost_unreachable(
    token_server: JupyterServer, tmp_path: Path
) -> None:
    server = token_server
    out = tmp_path / "out"
    out.mkdir()
    env = runner_env(tmp_path)
    connect = connect_args(server, tmp_path)
    args = ["submit", "--no-detach", "--notebook", str(TEST_NOTEBOOKS / "raises.ipynb")]
    failed = cli([*args, *connect], out, env, timeout_s=180)
    run_id = journal_run_id(out)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "deliberate failure from raises.ipynb" in failed.stdout + failed.stderr
    assert "ValueError" in (out / "versa_runs" / run_id / "run.log").read_text()
    assert (remote_run_dir(server, run_id) / "exit_code").read_text().strip() not in ("", "0")

    elsewhere = tmp_path / "expired"
    elsewhere.mkdir()
    expired = cli(["status", run_id, *connect_args(server, elsewhere, token="expired")], out, env)
    assert expired.returncode == 3
    assert "expired" in expired.stdout + expired.stderr
    assert "Traceback" not in expired.stderr

    dead_url = tmp_path / "dead_url"
    dead_cred = "deadcred" + os.urandom(6).hex()
    dead_url.write_text(f"http://127.0.0.1:{free_port()}/k/9/{dead_cred}/proxy\n")
    gone_args = ["status", run_id, "--json", "--debug", "--url-file", str(dead_url)]
    gone = cli(gone_args, out, env, timeout_s=120)
    assert json.loads(gone.stdout)["state"] == "unreachable", gone.stdout + gone.stderr
    assert dead_cred not in gone.stdout + gone.stderr  # not even in --debug logs

    shutil.rmtree(remote_run_dir(server, run_id))  # the session restarted: /kaggle/working wiped
    # the URL and token from the environment alone, no flags at all
    url_env = {**env, "REMOTE_JUPYTER_URL": server.url, "REMOTE_JUPYTER_TOKEN": str(server.token)}
    lost = cli(["status", run_id, "--json"], out, url_env)
    assert json.loads(lost.stdout)["state"] == "lost", lost.stdout + lost.stderr


def test_code_tree_is_not_uploaded_twice(token_server: JupyterServer, tmp_path: Path) -> None:
    from versa_runner.backends.jupyter.backend import JupyterBackend
    from versa_runner.runs.codesync import stage_code

    project = Path(__file__).resolve().parent.parent
    with JupyterBackend(token_server.url, token=token_server.token) as backend:
        first = stage_code(backend, project, tmp_path)
        state = Path(first) / "versa_sync.json"
        stamp = state.stat().st_mtime_ns
        time.sleep(0.05)
        assert stage_code(backend, project, tmp_path) == first
    assert state.stat().st_mtime_ns == stamp
    incoming = token_server.root_dir / "versa_code" / "incoming"
    assert not [p for p in incoming.iterdir() if not p.name.startswith(".")]


def test_doctor_lists_each_check_and_fails_clearly_on_auth(
    basepath_server: JupyterServer, token_server: JupyterServer, tmp_path: Path
) -> None:
    env = runner_env(tmp_path)
    good = cli(["doctor", "--debug", *connect_args(basepath_server, tmp_path)], tmp_path, env)
    assert good.returncode == 0, good.stdout + good.stderr
    assert '"GET /…/api/status HTTP/1.1" 200' in good.stderr  # debug logs, path scrubbed
    for check in ("reachable: ok", "auth: ok", "kernel: ok", "python: ok", "papermill: ok",
                  "gpus: ok", "disk: ok"):  # fmt: skip
        assert check in good.stdout, good.stdout
    elsewhere = tmp_path / "bad"
    elsewhere.mkdir()
    bad = cli(["doctor", *connect_args(token_server, elsewhere, token="expired")], tmp_path, env)
    assert bad.returncode == 3 and "auth: FAILED" in bad.stdout, bad.stdout + bad.stderr
    assert "expired" in bad.stdout
    printed = good.stdout + good.stderr + bad.stdout + bad.stderr
    assert not [s for s in (*basepath_server.secrets, *token_server.secrets) if s in printed]
