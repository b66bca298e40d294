"""`versa-run --ssh` end to end against a real sshd on loopback (ssh_fixtures).

Real processes all the way: the CLI in a subprocess, sshd, the SFTP server, the uploaded
launcher, papermill and ipykernel on the "remote" side (this machine, under a per-test
`--remote-root`). Each test has its own HOME (so its own ~/.ssh/known_hosts), output directory
and remote root, and kills only process groups its own run recorded.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from faultproxy import free_port
from runner_support import TARGET_PYTHON, TEST_NOTEBOOKS, cli, runner_env, wait_for

if TYPE_CHECKING:
    from ssh_fixtures import SshServer

pytest_plugins = ["ssh_fixtures"]
pytestmark = pytest.mark.slow

PYTHON = TARGET_PYTHON
SECRET_NAME = "VERSA_TEST_SECRET"


def ssh_args(server: SshServer, remote_root: Path, *, key: Path | None = None) -> list[str]:
    return ["--ssh", server.spec, "--ssh-key", str(key or server.client_key),
            "--ssh-python", PYTHON, "--remote-root", str(remote_root)]  # fmt: skip


def ssh_env(server: SshServer, tmp_path: Path, **extra: str) -> dict[str, str]:
    """runner_env plus a HOME whose known_hosts trusts the test sshd."""
    home = server.home_with_known_host(tmp_path / "home")
    return runner_env(tmp_path, HOME=str(home), **extra)


def journal(out: Path) -> dict:
    records = sorted((out / ".versa_runner" / "runs").glob("*.json"))
    assert len(records) == 1, records
    return json.loads(records[0].read_text())


def kill_remote_run(remote_root: Path, run_id: str) -> None:
    """Test cleanup: SIGKILL the process groups this run's launcher recorded."""
    status_file = remote_root / "versa_runs" / run_id / "status.json"
    if status_file.exists():
        status = json.loads(status_file.read_text())
        for key in ("pgid", "papermill_pid"):
            if status.get(key):
                try:
                    os.killpg(int(status[key]), signal.SIGKILL)
                except OSError:
                    pass


def test_no_detach_with_secret_and_encrypted_key_leaks_nothing(
    sshd: SshServer, tmp_path: Path
) -> None:
    out, remote = tmp_path / "out", tmp_path / "remote"
    out.mkdir()
    secret_value = "sv-" + os.urandom(12).hex()
    env = ssh_env(sshd, tmp_path, VERSA_SSH_PASSPHRASE=sshd.passphrase,
                  **{SECRET_NAME: secret_value})  # fmt: skip
    argv = [sys.executable, "-m", "versa_runner.cli", "submit", "--no-detach", "--notebook",
            str(TEST_NOTEBOOKS / "secret.ipynb"), "--secret", SECRET_NAME,
            *ssh_args(sshd, remote, key=sshd.encrypted_key)]  # fmt: skip
    runner = subprocess.Popen(argv, cwd=out, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)  # fmt: skip
    argv_seen = ""  # every process's argv (sshd's session shells included), sampled all along
    while runner.poll() is None:
        argv_seen += subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
        time.sleep(0.3)
    stdout, stderr = (b.decode() for b in runner.communicate(timeout=30))
    assert runner.returncode == 0, stdout + stderr
    record = journal(out)
    run_id = record["run_id"]
    try:
        assert "SECRET_PRESENT length" in stdout  # followed the log; the job saw the secret
        assert record["backend"] == "ssh" and record["root"] == str(remote)
        assert record["target"] == f"ssh:{sshd.user}@127.0.0.1:{sshd.port}"
        assert record["secret_names"] == [SECRET_NAME]
        local_nb = out / "versa_runs" / run_id / "output.ipynb"
        assert (
            local_nb.read_bytes() == (remote / "versa_runs" / run_id / "output.ipynb").read_bytes()
        )
        launch = json.loads((remote / "versa_runs" / run_id / "launch.json").read_text())
        code_dir = Path(launch["pythonpath"][0])
        assert (code_dir / "versa_kernels" / "__init__.py").exists()
        assert code_dir.is_relative_to(remote / "versa_code")
        # host, user and port come from the journal; the key and interpreter from the flags
        again = cli(["sync", run_id, "--ssh-key", str(sshd.encrypted_key), "--ssh-python", PYTHON],
                    out, env)  # fmt: skip
        assert "0 file(s) transferred" in again.stdout, again.stdout + again.stderr
    finally:
        kill_remote_run(remote, run_id)
    assert not (remote / "versa_runs" / run_id / "secrets.env").exists()  # launcher deleted it
    scanned = {"argv": argv_seen, "cli output": stdout + stderr + again.stdout + again.stderr}
    for root in (out, remote / "versa_runs" / run_id, tmp_path / "home"):
        for path in root.rglob("*"):
            if path.is_file():
                scanned[str(path)] = path.read_text(errors="replace")
    assert any(name.endswith(f"{run_id}.json") for name in scanned)  # the journal was scanned
    leaks = [(where, s[:5]) for where, text in scanned.items()
             for s in (secret_value, sshd.passphrase) if s in text]  # fmt: skip
    assert not leaks


def test_detached_then_wait_sync_and_resumed_download(sshd: SshServer, tmp_path: Path) -> None:
    out, remote = tmp_path / "out", tmp_path / "remote"
    out.mkdir()
    env = ssh_env(sshd, tmp_path)
    connect = ssh_args(sshd, remote)
    notebook = str(TEST_NOTEBOOKS / "ok.ipynb")
    submitted = cli(["submit", "--notebook", notebook, "-p", "greeting", "hi", *connect], out, env)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    run_id = journal(out)["run_id"]
    assert f"versa-run wait {run_id}" in submitted.stdout
    assert "--ssh-key" in submitted.stdout  # the follow-up commands carry what they need
    follow_up = ["--ssh-key", str(sshd.client_key), "--ssh-python", PYTHON]
    try:
        waited = cli(["wait", run_id, "--timeout", "120", *follow_up], out, env, timeout_s=180)
        assert waited.returncode == 0, waited.stdout + waited.stderr
        synced = cli(["sync", run_id, *follow_up], out, env)
        assert synced.returncode == 0, synced.stdout + synced.stderr
    finally:
        kill_remote_run(remote, run_id)
    assert (out / "reports" / "ok.md").read_text() == f"hi x1 run={run_id}\n"
    result = json.loads((out / "artifacts" / "ok" / "result.json").read_text())
    assert result["cwd"] == str(remote)  # the job ran in the remote root, not in the home dir
    # Resume: keep the first half of the executed notebook as a .part, drop the file, sync again.
    notebook = out / "versa_runs" / run_id / "output.ipynb"
    full = notebook.read_bytes()
    half = len(full) // 2
    notebook.with_name("output.ipynb.part").write_bytes(full[:half])
    notebook.unlink()
    resumed = cli(["sync", run_id, "--json", "--only", "output.ipynb", *follow_up], out, env)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    result = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert result["transferred"] == [f"versa_runs/{run_id}/output.ipynb"]
    assert result["bytes_transferred"] == len(full) - half  # only the missing tail moved
    assert notebook.read_bytes() == full and not notebook.with_name("output.ipynb.part").exists()


def test_connection_dropped_then_runner_killed_job_still_finishes(
    sshd: SshServer, tmp_path: Path
) -> None:
    out, remote = tmp_path / "out", tmp_path / "remote"
    out.mkdir()
    env = ssh_env(sshd, tmp_path)
    argv = [sys.executable, "-m", "versa_runner.cli", "submit", "--no-detach", "--notebook",
            str(TEST_NOTEBOOKS / "sleep.ipynb"), "-p", "seconds", "8", *ssh_args(sshd, remote)]  # fmt: skip
    log_path = tmp_path / "runner.out"
    with open(log_path, "wb") as sink:
        runner = subprocess.Popen(argv, cwd=out, env=env, stdout=sink, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: b"SLEEP_STARTED" in log_path.read_bytes(), 90, "the job to start")
            before = set(sshd.connection_pids())
            for pid in before:  # cut the runner's SSH connection on the server side
                os.kill(pid, signal.SIGKILL)
            # The follower re-opens the connection and goes on following the log.
            wait_for(lambda: bool(set(sshd.connection_pids()) - before), 30, "a reconnection")
            time.sleep(1.0)
            assert runner.poll() is None, log_path.read_text()
        finally:
            runner.send_signal(signal.SIGKILL)  # then the laptop goes away altogether
            runner.wait(timeout=10)
    run_id = journal(out)["run_id"]
    follow_up = ["--ssh-key", str(sshd.client_key), "--ssh-python", PYTHON]
    try:
        waited = cli(["wait", run_id, "--timeout", "120", *follow_up], out, env, timeout_s=180)
        assert waited.returncode == 0, waited.stdout + waited.stderr
        synced = cli(["sync", run_id, *follow_up], out, env)
        assert synced.returncode == 0, synced.stdout + synced.stderr
    finally:
        kill_remote_run(remote, run_id)
    executed = json.loads((out / "versa_runs" / run_id / "output.ipynb").read_text())
    assert {c["metadata"]["papermill"]["status"] for c in executed["cells"]} == {"completed"}
    assert "SLEEP_DONE" in (out / "versa_runs" / run_id / "run.log").read_text()
    assert (remote / "versa_runs" / run_id / "exit_code").read_text().strip() == "0"


def test_failing_cell_exit_code_and_error_in_logs(sshd: SshServer, tmp_path: Path) -> None:
    out, remote = tmp_path / "out", tmp_path / "remote"
    out.mkdir()
    env = ssh_env(sshd, tmp_path)
    args = ["submit", "--no-detach", "--notebook", str(TEST_NOTEBOOKS / "raises.ipynb")]
    failed = cli([*args, *ssh_args(sshd, remote)], out, env, timeout_s=180)
    run_id = journal(out)["run_id"]
    kill_remote_run(remote, run_id)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "deliberate failure from raises.ipynb" in failed.stdout + failed.stderr
    assert "ValueError" in (out / "versa_runs" / run_id / "run.log").read_text()
    assert (remote / "versa_runs" / run_id / "exit_code").read_text().strip() not in ("", "0")
    logs = cli(["logs", run_id, "--tail", "40", "--ssh-key", str(sshd.client_key)], out, env)
    assert "ValueError" in logs.stdout, logs.stdout + logs.stderr


def test_host_key_auth_and_reachability_refusals(sshd: SshServer, tmp_path: Path) -> None:
    remote = tmp_path / "remote"
    fresh_home = tmp_path / "fresh_home"  # no known_hosts at all
    env = runner_env(tmp_path, HOME=str(fresh_home))
    unknown = cli(["doctor", *ssh_args(sshd, remote)], tmp_path, env)
    assert unknown.returncode == 3, unknown.stdout + unknown.stderr
    assert "not in" in unknown.stderr + unknown.stdout and "--ssh-accept-new" in unknown.stderr
    assert "Traceback" not in unknown.stderr
    known_hosts = fresh_home / ".ssh" / "known_hosts"
    assert not known_hosts.exists()
    accepted = cli(["doctor", "--ssh-accept-new", *ssh_args(sshd, remote)], tmp_path, env)
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    assert f"[127.0.0.1]:{sshd.port} ssh-ed25519" in known_hosts.read_text()
    again = cli(["doctor", *ssh_args(sshd, remote)], tmp_path, env)  # now known: no flag needed
    assert again.returncode == 0, again.stdout + again.stderr

    changed = sshd.home_with_known_host(tmp_path / "changed_home") / ".ssh" / "known_hosts"
    stranger_pub = sshd.stranger_key.with_name(sshd.stranger_key.name + ".pub").read_text()
    changed.write_text(f"[127.0.0.1]:{sshd.port} {' '.join(stranger_pub.split()[:2])}\n")
    env = runner_env(tmp_path, HOME=str(tmp_path / "changed_home"))
    spoofed = cli(["doctor", "--ssh-accept-new", *ssh_args(sshd, remote)], tmp_path, env)
    assert spoofed.returncode == 3 and "does not match" in spoofed.stderr, spoofed.stderr

    env = ssh_env(sshd, tmp_path, VERSA_SSH_PASSPHRASE="not-the-passphrase")
    bad_phrase = cli(["doctor", *ssh_args(sshd, remote, key=sshd.encrypted_key)], tmp_path, env)
    assert bad_phrase.returncode == 3 and "wrong passphrase" in bad_phrase.stderr
    assert "not-the-passphrase" not in bad_phrase.stdout + bad_phrase.stderr
    env = ssh_env(sshd, tmp_path)
    no_phrase = cli(["doctor", *ssh_args(sshd, remote, key=sshd.encrypted_key)], tmp_path, env)
    assert no_phrase.returncode == 3 and "encrypted" in no_phrase.stderr
    wrong_key = cli(["doctor", *ssh_args(sshd, remote, key=sshd.stranger_key)], tmp_path, env)
    assert wrong_key.returncode == 3 and "authentication failed" in wrong_key.stderr
    assert "--ssh-key" in wrong_key.stderr and "Traceback" not in wrong_key.stderr
    closed = [*ssh_args(sshd, remote)]
    closed[1] = f"{sshd.user}@127.0.0.1:{free_port()}"
    down = cli(["doctor", *closed], tmp_path, env)
    assert down.returncode == 3, down.stdout + down.stderr
    bad_port = cli(["doctor", "--ssh", "u@h", "--ssh-port", "0"], tmp_path, env)
    assert bad_port.returncode == 2 and "--ssh-port" in bad_port.stderr
    both = cli(["doctor", "--ssh", "u@h", "--url", "http://x"], tmp_path, env)
    assert both.returncode == 2 and "--ssh" in both.stderr
