"""Following a run survives what the job survives (issue 14, "Following a run").

Real processes throughout: the CLI in a subprocess, jupyter_server (token and base-path
flavours) or sshd on loopback, the uploaded launcher, papermill. Each test breaks something
between the follower and its job while the job runs (the launcher kernel deleted, the server
stopped and restarted on the same port, the connection stalled) and checks that the follower
ends promptly with the job's own exit code.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import requests
from faultproxy import free_port
from runner_support import TEST_NOTEBOOKS, cli, runner_env, wait_for
from test_jupyter_e2e import connect_args, journal_run_id, kill_remote_run, remote_run_dir

if TYPE_CHECKING:
    from jupyter_fixtures import JupyterServer
    from ssh_fixtures import SshServer

pytest_plugins = ["jupyter_fixtures", "ssh_fixtures"]
pytestmark = pytest.mark.slow

PROMPT_S = 60.0
"""A follower must be done this long after its job ended (it used to hang 11+ minutes)."""


def _start_follower(args: list[str], cwd: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    argv = [sys.executable, "-m", "versa_runner.cli", *args]
    with open(log, "wb") as sink:
        return subprocess.Popen(argv, cwd=cwd, env=env, stdout=sink, stderr=subprocess.STDOUT)


def _finish(runner: subprocess.Popen, *, within_s: float) -> int:
    try:
        return runner.wait(timeout=within_s)
    except subprocess.TimeoutExpired:
        runner.send_signal(signal.SIGKILL)
        runner.wait(timeout=10)
        raise AssertionError(f"the follower was still waiting {within_s:.0f} s later") from None


def _delete_kernels(server: JupyterServer) -> list[str]:
    """Delete every kernel of the server (the launcher kernel; papermill's is not the server's)."""
    session = requests.Session()
    headers = {"Authorization": f"token {server.token}"} if server.token else {}
    if not server.token:  # a no-token server wants its XSRF cookie echoed on DELETE
        session.get(server.url + "/", timeout=10)
        headers = {"X-XSRFToken": session.cookies.get("_xsrf", ""), "Referer": server.url + "/"}
    kernels = [k["id"] for k in session.get(f"{server.url}/api/kernels", headers=headers,
                                            timeout=10).json()]  # fmt: skip
    for kernel_id in kernels:
        session.delete(f"{server.url}/api/kernels/{kernel_id}", headers=headers,
                       timeout=30).raise_for_status()  # fmt: skip
    return kernels


@pytest.mark.parametrize("notebook, exit_code", [("sleep.ipynb", 0), ("sysexit1.ipynb", 1)])
def test_no_detach_with_launcher_kernel_deleted_ends_with_the_jobs_exit_code(
    any_server: JupyterServer, tmp_path: Path, notebook: str, exit_code: int
) -> None:
    server = any_server
    out = tmp_path / "out"
    out.mkdir()
    env = runner_env(tmp_path)
    # sysexit1 ends at once: a job that is already over when the kernel goes must work too
    params = ["-p", "seconds", "4"] if notebook == "sleep.ipynb" else []
    args = ["submit", "--no-detach", "--notebook", str(TEST_NOTEBOOKS / notebook), *params,
            *connect_args(server, tmp_path)]  # fmt: skip
    log = tmp_path / "follower.out"
    runner = _start_follower(args, out, env, log)
    try:
        wait_for(lambda: any((out / ".versa_runner" / "runs").glob("*.json")), 120,
                 "the run to be journaled")  # fmt: skip
        run_id = journal_run_id(out)
        wait_for(lambda: (remote_run_dir(server, run_id) / "status.json").exists(), 60,
                 "the launcher to start")  # fmt: skip
        assert _delete_kernels(server), "expected the follower's launcher kernel"
        exit_file = remote_run_dir(server, run_id) / "exit_code"
        wait_for(exit_file.exists, 120, "the job to end")
        ended = time.monotonic()
        returncode = _finish(runner, within_s=PROMPT_S)
        took = time.monotonic() - ended
    finally:
        if runner.poll() is None:
            runner.kill()
        kill_remote_run(server, journal_run_id(out))
    text = log.read_text()
    assert int(exit_file.read_text()) == exit_code
    assert returncode == exit_code, text
    assert took < PROMPT_S
    # the outputs came home through a new launcher kernel, which was deleted on exit
    assert (out / "versa_runs" / run_id / "output.ipynb").exists(), text
    assert not _delete_kernels(server), "a launcher kernel was left running"
    assert not [s for s in server.secrets if s in text]


@pytest.mark.parametrize("flavour", ["token", "basepath"])
def test_no_detach_with_the_server_stopped_and_restarted_reports_the_jobs_exit_code(
    tmp_path: Path, flavour: str
) -> None:
    from jupyter_fixtures import start_jupyter_server  # (a plugin module: imported late)

    # the same port and credential after the restart: a token, or Kaggle's base path
    token = secrets.token_hex(16) if flavour == "token" else None
    base = "/" if flavour == "token" else f"/k/7/cred{secrets.token_hex(8)}/proxy/"
    port = free_port()
    server = start_jupyter_server(tmp_path / "server", token=token, base_path=base, port=port)
    out = tmp_path / "out"
    out.mkdir()
    env = runner_env(tmp_path)
    args = ["submit", "--no-detach", "--notebook", str(TEST_NOTEBOOKS / "sleep.ipynb"),
            "-p", "seconds", "12", *connect_args(server, tmp_path)]  # fmt: skip
    log = tmp_path / "follower.out"
    runner = _start_follower(args, out, env, log)
    run_id = ""
    try:
        wait_for(lambda: b"SLEEP_STARTED" in log.read_bytes(), 120, "the job to start")
        run_id = journal_run_id(out)
        server.stop()  # the launcher kernel dies with it; the job does not
        time.sleep(3)
        assert (remote_run_dir(server, run_id) / "exit_code").exists() is False
        server = start_jupyter_server(tmp_path / "server", token=token, base_path=base, port=port)
        exit_file = remote_run_dir(server, run_id) / "exit_code"
        wait_for(exit_file.exists, 120, "the job to end")
        returncode = _finish(runner, within_s=PROMPT_S + 30)  # its retries back off up to 8 s
    finally:
        if runner.poll() is None:
            runner.kill()
        if run_id:
            kill_remote_run(server, run_id)
        server.stop()
    text = log.read_text()
    assert exit_file.read_text().strip() == "0"
    assert returncode == 0, text
    assert "SLEEP_DONE" in text and "state=succeeded exit_code=0" in text, text
    assert (out / "versa_runs" / run_id / "output.ipynb").exists(), text
    assert not [secret for secret in (token, base) if secret and secret != "/" and secret in text]


def _sshd_session_pids(sshd: SshServer) -> list[int]:
    """The per-connection sshd processes and their sshd children (the privilege-separated
    session process does the I/O); never the user's own processes below them."""
    parents: dict[int, int] = {}
    names: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            names[int(entry.name)] = stat[stat.index("(") + 1 : stat.rindex(")")]
            parents[int(entry.name)] = int(stat[stat.rindex(")") + 2 :].split()[1])
    found = set(sshd.connection_pids())
    grew = True
    while grew:
        more = {p for p, pp in parents.items() if pp in found and names[p].startswith("sshd")}
        grew = bool(more - found)
        found |= more
    return sorted(found)


def test_ssh_no_detach_with_the_host_hung_mid_run_reports_the_jobs_exit_code(
    sshd: SshServer, tmp_path: Path
) -> None:
    from test_ssh_e2e import kill_remote_run as kill_ssh_run
    from test_ssh_e2e import ssh_args, ssh_env

    out, remote = tmp_path / "out", tmp_path / "remote"
    out.mkdir()
    # SFTP requests unanswered for 3 s fail; the follower reconnects and goes on
    env = ssh_env(sshd, tmp_path, VERSA_RUNNER_IO_TIMEOUT_S="3")
    args = ["submit", "--no-detach", "--notebook", str(TEST_NOTEBOOKS / "sleep.ipynb"),
            "-p", "seconds", "10", *ssh_args(sshd, remote)]  # fmt: skip
    log = tmp_path / "follower.out"
    runner = _start_follower(args, out, env, log)
    hung: list[int] = []
    run_id = ""
    try:
        wait_for(lambda: b"SLEEP_STARTED" in log.read_bytes(), 120, "the job to start")
        run_id = journal_run_id(out)
        hung = _sshd_session_pids(sshd)
        for pid in hung:  # the follower's connection stops answering, without being closed
            os.kill(pid, signal.SIGSTOP)
        wait_for(lambda: bool(set(sshd.connection_pids()) - set(hung)), 60,
                 "the follower to give up on the hung connection and open a new one")  # fmt: skip
        exit_file = remote / "versa_runs" / run_id / "exit_code"
        wait_for(exit_file.exists, 120, "the job to end")
        returncode = _finish(runner, within_s=PROMPT_S)
    finally:
        for pid in hung:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        if runner.poll() is None:
            runner.kill()
        if run_id:
            kill_ssh_run(remote, run_id)
    text = log.read_text()
    assert exit_file.read_text().strip() == "0"
    assert returncode == 0, text
    assert "SLEEP_DONE" in text and "state=succeeded exit_code=0" in text, text
    assert (out / "versa_runs" / run_id / "output.ipynb").exists(), text


def test_no_detach_gives_up_with_exit_3_only_after_the_patience_then_wait_reports_the_job(
    tmp_path: Path,
) -> None:
    from jupyter_fixtures import start_jupyter_server  # (a plugin module: imported late)

    token = secrets.token_hex(16)
    port = free_port()
    server = start_jupyter_server(tmp_path / "server", token=token, port=port)
    out = tmp_path / "out"
    out.mkdir()
    env = runner_env(tmp_path, VERSA_RUNNER_PATIENCE_S="5")
    connect = connect_args(server, tmp_path)
    args = ["submit", "--no-detach", "--notebook", str(TEST_NOTEBOOKS / "sleep.ipynb"),
            "-p", "seconds", "8", *connect]  # fmt: skip
    log = tmp_path / "follower.out"
    runner = _start_follower(args, out, env, log)
    run_id = ""
    try:
        wait_for(lambda: b"SLEEP_STARTED" in log.read_bytes(), 120, "the job to start")
        run_id = journal_run_id(out)
        stopped = time.monotonic()  # no failure can be seen before this instant
        server.stop()  # and it stays down past the follower's patience
        returncode = _finish(runner, within_s=PROMPT_S)
        gave_up_after = time.monotonic() - stopped
        exit_file = remote_run_dir(server, run_id) / "exit_code"
        wait_for(exit_file.exists, 120, "the job to end while the server is down")
        server = start_jupyter_server(tmp_path / "server", token=token, port=port)
        waited = subprocess.run(
            [sys.executable, "-m", "versa_runner.cli", "wait", run_id, *connect],
            cwd=out, env=env, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
    finally:
        if runner.poll() is None:
            runner.kill()
        if run_id:
            kill_remote_run(server, run_id)
        server.stop()
    text = log.read_text()
    assert returncode == 3, text
    assert 5 <= gave_up_after < PROMPT_S, text
    assert "error:" in text and "Traceback" not in text, text
    assert waited.returncode == 0, waited.stdout + waited.stderr
    assert "succeeded" in waited.stdout, waited.stdout


class _FilesBroken(BaseHTTPRequestHandler):
    """A reverse proxy that answers 502 to every `/files/` request and forwards the rest."""

    upstream = ""
    files_refused = 0
    HOP = {"host", "content-length", "connection", "transfer-encoding", "content-encoding",
           "keep-alive"}  # fmt: skip

    def _forward(self) -> None:
        if "/files/" in self.path:
            type(self).files_refused += 1
            self.send_response(502)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        headers = {k: v for k, v in self.headers.items() if k.lower() not in self.HOP}
        resp = requests.request(self.command, self.upstream + self.path, headers=headers,
                                data=body, allow_redirects=False, timeout=30)  # fmt: skip
        self.send_response(resp.status_code)
        for name, value in resp.headers.items():
            if name.lower() not in self.HOP:
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(resp.content)))
        self.end_headers()
        self.wfile.write(resp.content)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

    def log_message(self, *args: object) -> None:
        pass


def test_follower_reads_status_files_over_the_contents_api_when_files_fails(
    token_server: JupyterServer, tmp_path: Path
) -> None:
    server = token_server
    out = tmp_path / "out"
    out.mkdir()
    env = runner_env(tmp_path)
    args = ["submit", "--notebook", str(TEST_NOTEBOOKS / "sleep.ipynb"), "-p", "seconds", "4",
            *connect_args(server, tmp_path)]  # fmt: skip
    submitted = cli(args, out, env, timeout_s=180)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    run_id = journal_run_id(out)
    _FilesBroken.upstream, _FilesBroken.files_refused = server.url, 0
    proxy = ThreadingHTTPServer(("127.0.0.1", 0), _FilesBroken)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "url").write_text(f"http://127.0.0.1:{proxy.server_address[1]}\n")
    (broken / "token").write_text(f"{server.token}\n")
    via_proxy = ["--url-file", str(broken / "url"), "--token-file", str(broken / "token")]
    try:
        followed = cli(["logs", run_id, "--follow", *via_proxy], out, env, timeout_s=180)
        status = cli(["status", run_id, "--json", *via_proxy], out, env)
    finally:
        proxy.shutdown()
        proxy.server_close()
        kill_remote_run(server, run_id)
    assert followed.returncode == 0, followed.stdout + followed.stderr
    assert "SLEEP_DONE" in followed.stdout, followed.stdout
    assert status.returncode == 0 and '"state": "succeeded"' in status.stdout, status.stdout
    assert _FilesBroken.files_refused > 0  # /files/ was tried, failed, and the follower went on


def test_ssh_calls_on_a_hung_host_end_within_their_deadline(
    sshd: SshServer, tmp_path: Path
) -> None:
    """Each primitive on a connection whose peer stopped answering (its sshd processes
    SIGSTOPped): an SFTP read or stat gives up after the I/O timeout and is retried on a fresh
    connection; an exec snippet ends as UnreachableError. paramiko alone waits forever."""
    from test_ssh_backend import backend_for

    from versa_runner.errors import UnreachableError

    backend = backend_for(sshd, tmp_path / "home", tmp_path / "root")
    backend.io_timeout_s = 2.0
    calls = {
        "read": (lambda: backend.read_bytes("probe.txt"), b"hello"),
        "stat": (lambda: backend.stat("probe.txt").size_bytes, 5),  # type: ignore[union-attr]
        "snippet": (lambda: backend.run_python("print(1)", timeout_s=3), UnreachableError),
    }
    try:
        backend.put_bytes("probe.txt", b"hello")
        for name, (call, expected) in calls.items():
            assert backend.run_python("print(6 * 7)", timeout_s=30).strip() == "42"
            assert backend.stat("probe.txt") is not None  # SFTP and exec both open now
            hung = _sshd_session_pids(sshd)
            for pid in hung:
                os.kill(pid, signal.SIGSTOP)
            started = time.monotonic()
            try:
                result: object = call()
            except UnreachableError as exc:
                result = type(exc)
            finally:
                for pid in hung:
                    os.kill(pid, signal.SIGKILL)
            took = time.monotonic() - started
            assert result == expected, name
            assert 1.5 <= took < 15, f"{name}: {took:.1f} s (the hang must cost the timeout, once)"
    finally:
        backend.close()


def test_run_file_reader_stays_on_the_contents_api_for_a_while(
    token_server: JupyterServer, tmp_path: Path
) -> None:
    """After /files/ failed, reads go straight to the contents API (no retries per poll) until
    FILES_FALLBACK_S has passed; then /files/ is tried again. Absent files stay None."""
    from versa_runner.backends.jupyter.http import JupyterHttp, RetryPolicy
    from versa_runner.backends.jupyter.reads import FILES_FALLBACK_S, RunFileReader
    from versa_runner.backends.jupyter.url import JupyterTarget

    (token_server.root_dir / "reader_probe.txt").write_bytes(b"0123456789")
    _FilesBroken.upstream, _FilesBroken.files_refused = token_server.url, 0
    proxy = ThreadingHTTPServer(("127.0.0.1", 0), _FilesBroken)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    now = [1000.0]
    target = JupyterTarget(f"http://127.0.0.1:{proxy.server_address[1]}", token=token_server.token)
    http = JupyterHttp(target, retry=RetryPolicy(attempts=2, base_delay_s=0.01))
    reader = RunFileReader(http, clock=lambda: now[0])
    try:
        assert reader.read("reader_probe.txt", 2, 3) == b"234"
        tried = _FilesBroken.files_refused
        assert tried == 2  # both attempts of the one /files/ read, then the contents API
        assert reader.read("reader_probe.txt", 8, None) == b"89"
        assert reader.read("no_such_file.txt", 0, None) is None
        assert _FilesBroken.files_refused == tried  # not tried again inside the window
        now[0] += FILES_FALLBACK_S
        assert reader.read("reader_probe.txt", 0, 4) == b"0123"
        assert _FilesBroken.files_refused == tried + 2  # the window passed: /files/ first again
    finally:
        http.close()
        proxy.shutdown()
        proxy.server_close()
        (token_server.root_dir / "reader_probe.txt").unlink()


def test_pinned_kernel_deleted_mid_run_keeps_the_exit_code_and_names_the_retry(
    token_server: JupyterServer, tmp_path: Path
) -> None:
    """A --kernel-id kernel is never replaced silently: once it is gone the sync after the run
    cannot run, which is a warning naming the retry command; the exit status is the job's."""
    server = token_server
    headers = {"Authorization": f"token {server.token}"}
    kernel = requests.post(f"{server.url}/api/kernels", json={"name": "python3", "path": ""},
                           headers=headers, timeout=60).json()["id"]  # fmt: skip
    out = tmp_path / "out"
    out.mkdir()
    args = ["submit", "--no-detach", "--notebook", str(TEST_NOTEBOOKS / "sleep.ipynb"),
            "-p", "seconds", "4", "--kernel-id", kernel, *connect_args(server, tmp_path)]  # fmt: skip
    log = tmp_path / "follower.out"
    runner = _start_follower(args, out, runner_env(tmp_path), log)
    run_id = ""
    try:
        wait_for(lambda: b"SLEEP_STARTED" in log.read_bytes(), 120, "the job to start")
        run_id = journal_run_id(out)
        requests.delete(f"{server.url}/api/kernels/{kernel}", headers=headers,
                        timeout=30).raise_for_status()  # fmt: skip
        returncode = _finish(runner, within_s=120)
    finally:
        if runner.poll() is None:
            runner.kill()
        if run_id:
            kill_remote_run(server, run_id)
    text = log.read_text()
    assert returncode == 0, text
    assert "outputs were not synced" in text and f"versa-run sync {run_id}" in text, text
    assert "(--kernel-id) is gone" in text, text
