"""Sync's transfer and verification layer against real servers (issue 14, "Sync").

A real jupyter_server on loopback (jupyter_fixtures) and a real sshd (ssh_fixtures) serve the
"remote" files; the fault proxy (faultproxy) cuts connections where a fault must be caused; a
2 MiB tmpfs mounted by the test (root only; skipped elsewhere) is a disk that really fills up.
Each test looks at the bytes that landed, never at what the client believes it wrote.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from faultproxy import FaultProxy
from runner_support import TARGET_PYTHON, cli, runner_env

from versa_runner.backends.base import Backend
from versa_runner.backends.jupyter.backend import JupyterBackend, RetryPolicy
from versa_runner.backends.ssh.backend import SshBackend
from versa_runner.backends.ssh.target import SshTarget
from versa_runner.errors import DiskFullError, UnsafePathError
from versa_runner.runs import entries, journal, sync, transfer
from versa_runner.runs.journal import RunRecord
from versa_runner.target import layout

if TYPE_CHECKING:
    from jupyter_fixtures import JupyterServer
    from ssh_fixtures import SshServer

pytest_plugins = ["jupyter_fixtures", "ssh_fixtures"]

FAST_RETRY = RetryPolicy(attempts=4, base_delay_s=0.02, max_delay_s=0.1, request_timeout_s=10)
FAST_FETCH = transfer.FetchPolicy(attempts=4, base_delay_s=0.02, max_delay_s=0.1)
CUT_BYTES = 64 * 1024


def _port(url: str) -> int:
    return int(url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _record(root: Path, run_id: str, backend: str = "jupyter") -> RunRecord:
    return RunRecord(run_id=run_id, task="t", notebook="t.ipynb", backend=backend,
                     target="test", root=str(root), run_dir=f"versa_runs/{run_id}",
                     job_cwd=str(root), params_hash="0",
                     created_at=dt.datetime.now(dt.timezone.utc).isoformat())  # fmt: skip


_CREATED: list[Path] = []


@pytest.fixture(autouse=True)
def _remove_remote_runs() -> Iterator[None]:
    """The servers are shared by the whole session: leave no hostile name for other modules."""
    yield
    while _CREATED:
        path = _CREATED.pop()
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _remote_run(root: Path, run_id: str, files: dict[str, bytes]) -> RunRecord:
    """A finished run's outputs on the "remote" root: `files` plus the run's log."""
    _CREATED.extend([root / "artifacts" / run_id, root / "versa_runs" / run_id])
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / "versa_runs" / run_id).mkdir(parents=True, exist_ok=True)
    (root / "versa_runs" / run_id / "run.log").write_text("done\n")
    # What the launcher records at the end of a run: sync brings back what this run wrote.
    written = {"paths": sorted(files)}
    (root / "versa_runs" / run_id / layout.WRITTEN_FILE).write_text(json.dumps(written))
    return _record(root, run_id)


def _jupyter(server: JupyterServer, url: str | None = None) -> JupyterBackend:
    return JupyterBackend(url or server.url, token=server.token, retry=FAST_RETRY,
                          root=str(server.root_dir))  # fmt: skip


@pytest.fixture
def fast_fetch(monkeypatch: pytest.MonkeyPatch) -> None:
    """The sync's own per-file retry loop with short sleeps (the budget is unchanged in kind)."""
    monkeypatch.setattr(transfer, "FetchPolicy", lambda: FAST_FETCH)


# -- 1. progress on every attempt ---------------------------------------------------------------


def test_jupyter_sync_finishes_when_every_connection_is_cut_after_64_kib(
    token_server: JupyterServer, tmp_path: Path, fast_fetch: None
) -> None:
    run_id = "20260101T000001Z-cut064"
    data = os.urandom(3 * 1024 * 1024 + 11)
    record = _remote_run(token_server.root_dir, run_id, {f"artifacts/{run_id}/big.bin": data})
    dest = tmp_path / "dest"
    with FaultProxy(_port(token_server.url), cut_after_bytes=CUT_BYTES, max_cuts=100_000,
                    direction="down") as proxy:  # fmt: skip
        with _jupyter(token_server, proxy.url_for(token_server.url)) as backend:
            result = sync.sync_run(
                backend,
                record,
                dest,
                selection=sync.Selection(
                    only=(
                        "artifacts",
                        "run.log",
                    )
                ),
            )
        # every connection was cut: far more cuts than the retry budget allows in a row
        assert proxy.cuts >= len(data) // CUT_BYTES > 4 * FAST_RETRY.attempts
    local = dest / "artifacts" / run_id / "big.bin"
    assert _sha(local) == hashlib.sha256(data).hexdigest()
    assert f"artifacts/{run_id}/big.bin" in result.transferred
    assert not [r for r in result.refused if run_id in r.path]
    assert not list(dest.rglob("*.part"))


def test_ssh_sync_finishes_when_every_connection_is_cut(
    sshd: SshServer, tmp_path: Path, fast_fetch: None
) -> None:
    root = tmp_path / "remote_root"
    run_id = "20260101T000002Z-sshcut"
    data = os.urandom(1024 * 1024 + 5)
    record = _remote_run(root, run_id, {"artifacts/ssh/big.bin": data})
    home = sshd.home_with_known_host(tmp_path / "home")
    # cut every connection after 256 KiB from the server (the SSH handshake takes a few KiB)
    with FaultProxy(sshd.port, cut_after_bytes=256 * 1024, max_cuts=100_000) as proxy:
        known = home / ".ssh" / "known_hosts"
        known.write_text(sshd.host_key_line.replace(f"]:{sshd.port} ", f"]:{proxy.port} ") + "\n")
        target = SshTarget(host="127.0.0.1", user=sshd.user, port=proxy.port,
                           key_file=sshd.client_key, known_hosts=known)  # fmt: skip
        with SshBackend(target, remote_root=str(root), python=TARGET_PYTHON) as backend:
            result = sync.sync_run(
                backend, record, tmp_path / "dest", selection=sync.Selection(only=("artifacts",))
            )
        assert proxy.cuts >= 4
    assert _sha(tmp_path / "dest/artifacts/ssh/big.bin") == hashlib.sha256(data).hexdigest()
    assert result.transferred == ["artifacts/ssh/big.bin"]


# -- 2. disk space --------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 2 MiB tmpfs (needs root and mount rights; skipped without them)."""
    mount = tmp_path / "small_disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                          capture_output=True, check=False)  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_too_little_space_is_refused_first_with_one_line_exit_3(
    token_server: JupyterServer, tmp_path: Path, small_disk: Path
) -> None:
    run_id = "20260101T000003Z-nospace"
    record = _remote_run(token_server.root_dir, run_id, {})
    (token_server.root_dir / record.run_dir / "run.log").write_bytes(os.urandom(3 << 20))
    out = tmp_path / "out"
    journal.save_record(out, record)
    url_file = tmp_path / "url"
    url_file.write_text(token_server.url)
    token_file = tmp_path / "token"
    token_file.write_text(token_server.token or "")
    env = runner_env(tmp_path)
    argv = ["--output-dir", str(out), "sync", run_id, "--dest", str(small_disk), "--only",
            "run.log", "--url-file", str(url_file), "--token-file", str(token_file)]  # fmt: skip
    done = cli(argv, tmp_path, env)
    assert done.returncode == 3, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    message = [line for line in done.stderr.splitlines() if "not enough space" in line]
    assert len(message) == 1 and str(small_disk) in message[0], done.stderr
    assert str(3 * 1024 * 1024) in message[0]  # the bytes needed
    assert not list(small_disk.rglob("run.log*"))  # refused before writing a byte


def test_disk_filling_mid_file_keeps_the_part_and_resumes(
    token_server: JupyterServer, tmp_path: Path, small_disk: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_id = "20260101T000004Z-enospc"
    data = os.urandom(3 * 1024 * 1024)
    record = _remote_run(token_server.root_dir, run_id, {})
    rel = f"{record.run_dir}/run.log"
    (token_server.root_dir / rel).write_bytes(data)
    # The free-space check passes (it is told of 1 TB), so the real ENOSPC path is reached.
    monkeypatch.setattr(transfer, "free_bytes", lambda folder: 1 << 40)
    with _jupyter(token_server) as backend:
        with pytest.raises(DiskFullError) as caught:
            sync.sync_run(backend, record, small_disk, selection=sync.Selection(only=("run.log",)))
    message = str(caught.value)
    assert "disk full in" in message and "more bytes needed" in message and "\n" not in message
    part = small_disk / (rel + ".part")
    kept = part.stat().st_size
    assert 0 < kept < len(data) and part.read_bytes() == data[:kept]
    assert not (small_disk / rel).exists()  # nothing under the final name
    # Move the partial download to a roomy disk: the next sync resumes at that byte.
    roomy = tmp_path / "roomy"
    (roomy / rel).parent.mkdir(parents=True)
    (roomy / (rel + ".part")).write_bytes(part.read_bytes())
    monkeypatch.undo()
    with _jupyter(token_server) as backend:
        result = sync.sync_run(backend, record, roomy, selection=sync.Selection(only=("run.log",)))
    assert result.bytes_transferred == len(data) - kept
    assert (roomy / rel).read_bytes() == data


def test_ssh_disk_filling_mid_file_is_the_same_one_line_error(
    sshd: SshServer, tmp_path: Path, small_disk: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "remote_root"
    run_id = "20260101T000008Z-sshfull"
    data = os.urandom(3 * 1024 * 1024)
    record = _remote_run(root, run_id, {"artifacts/full/ckpt.bin": data})
    home = sshd.home_with_known_host(tmp_path / "home")
    target = SshTarget(host="127.0.0.1", user=sshd.user, port=sshd.port, key_file=sshd.client_key,
                       known_hosts=home / ".ssh" / "known_hosts")  # fmt: skip
    monkeypatch.setattr(transfer, "free_bytes", lambda folder: 1 << 40)  # reach the real ENOSPC
    with SshBackend(target, remote_root=str(root), python=TARGET_PYTHON) as backend:
        with pytest.raises(DiskFullError, match="more bytes needed") as caught:
            sync.sync_run(
                backend, record, small_disk, selection=sync.Selection(only=("artifacts",))
            )
    assert "\n" not in str(caught.value) and str(small_disk) in str(caught.value)
    part = small_disk / "artifacts/full/ckpt.bin.part"
    assert 0 < part.stat().st_size < len(data)
    assert part.read_bytes() == data[: part.stat().st_size]


# -- 3. content verification --------------------------------------------------------------------


def test_remote_change_with_same_size_and_mtime_is_downloaded_again(
    any_server: JupyterServer, tmp_path: Path
) -> None:
    run_id = "20260101T000005Z-samesz"
    rel = f"artifacts/{run_id}/scores.bin"
    first = os.urandom(100_000)
    record = _remote_run(any_server.root_dir, run_id, {rel: first})
    remote = any_server.root_dir / rel
    dest = tmp_path / "dest"
    with _jupyter(any_server) as backend:
        assert (
            rel
            in sync.sync_run(
                backend, record, dest, selection=sync.Selection(only=("artifacts",))
            ).transferred
        )
        stamp = remote.stat()
        second = first[:50_000] + os.urandom(50_000)
        for how in ("in place", "replaced"):  # same inode, then a new inode; size and mtime kept
            if how == "in place":
                with open(remote, "r+b") as fh:
                    fh.write(second)
            else:
                second = os.urandom(100_000)
                (remote.parent / "new").write_bytes(second)
                os.replace(remote.parent / "new", remote)
            os.utime(remote, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
            assert remote.stat().st_size == stamp.st_size
            assert remote.stat().st_mtime_ns == stamp.st_mtime_ns
            result = sync.sync_run(
                backend, record, dest, selection=sync.Selection(only=("artifacts",))
            )
            assert result.transferred == [rel], how
            assert (dest / rel).read_bytes() == second, how
        assert (
            sync.sync_run(
                backend, record, dest, selection=sync.Selection(only=("artifacts",))
            ).transferred
            == []
        )


def test_local_edit_with_same_size_is_detected_and_verify_rehashes(
    token_server: JupyterServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_id = "20260101T000006Z-localed"
    rel = f"reports/{run_id}.md"
    data = b"kept experts: 12 of 16\n" * 100
    record = _remote_run(token_server.root_dir, run_id, {rel: data})
    _CREATED.append(token_server.root_dir / rel)
    dest = tmp_path / "dest"
    local = dest / rel
    with _jupyter(token_server) as backend:
        sync.sync_run(backend, record, dest, selection=sync.Selection(only=("reports",)))
        before = local.stat()
        with open(local, "r+b") as fh:  # same size, same inode, mtime put back
            fh.write(b"kept experts: 13")
        os.utime(local, ns=(before.st_atime_ns, before.st_mtime_ns))
        result = sync.sync_run(backend, record, dest, selection=sync.Selection(only=("reports",)))
        assert result.repaired == [rel] and result.transferred == [rel]
        assert local.read_bytes() == data
        # Nothing changed: the cache answers without hashing; --verify hashes every copy.
        assert (
            sync.sync_run(
                backend, record, dest, selection=sync.Selection(only=("reports",))
            ).transferred
            == []
        )
        hashed: list[str] = []
        original = sync.sha256_file
        monkeypatch.setattr(
            sync, "sha256_file", lambda path: hashed.append(str(path)) or original(path)
        )
        assert (
            sync.sync_run(
                backend, record, dest, selection=sync.Selection(only=("reports",))
            ).transferred
            == []
        )
        assert hashed == []
        result = sync.sync_run(
            backend, record, dest, selection=sync.Selection(only=("reports",)), verify=True
        )
        assert str(local) in hashed and result.transferred == []


# -- 4. names: synced or refused alone ------------------------------------------------------------


class ForgedManifest:
    """A real JupyterBackend whose manifest reply gets extra entries appended (a hostile or
    buggy target); everything else, including every download, goes to the real server."""

    def __init__(self, backend: JupyterBackend, extra: list[Any]) -> None:
        self.backend, self.extra = backend, extra

    def __getattr__(self, name: str) -> Any:
        return getattr(self.backend, name)

    def run_python(self, code: str, *, timeout_s: float) -> str:
        out = self.backend.run_python(code, timeout_s=timeout_s)
        if "_pkg.fileops.manifest(" not in code:
            return out
        from versa_runner.target import reply

        value = reply.parse(out)
        value["entries"] += self.extra
        return f"{reply.SENTINEL}{json.dumps(value)}\n"


def test_every_name_is_synced_or_refused_alone(token_server: JupyterServer, tmp_path: Path) -> None:
    root = token_server.root_dir
    run_id = "20260101T000007Z-names"
    good = {
        f"artifacts/{run_id}/..hidden_dots": b"dots\n",
        f"artifacts/{run_id}/.config/settings.json": b"{}\n",
        f"artifacts/{run_id}/plain.json": b"[1, 2]\n",
        f"artifacts/{run_id}/" + "x" * 250: b"long but legal\n",
    }
    record = _remote_run(root, run_id, good)
    long_name = "y" * 252  # legal on the target; `<name>.part` would not fit locally
    (root / "artifacts" / run_id / long_name).write_bytes(b"too long here\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("not yours\n")
    (root / "artifacts" / run_id / "escape").symlink_to(outside)
    (root / "artifacts" / run_id / "escape_file").symlink_to(outside / "secret.txt")
    with open(os.fsencode(root / "artifacts" / run_id) + b"/latin1_\xe9t\xe9", "wb") as fh:
        fh.write(b"not UTF-8\n")  # a name no URL or local UTF-8 path can carry faithfully
    # A run still going: sync takes what changed since it started (the names above included).
    run_dir = root / "versa_runs" / run_id
    (run_dir / layout.WRITTEN_FILE).unlink()
    (run_dir / layout.STATUS_FILE).write_text(json.dumps({"started_at": "2000-01-01T00:00:00Z"}))
    sha = "0" * 64
    forged = [
        {"path": f"artifacts/{run_id}/nul\x00name", "size_bytes": 1, "mtime": 0, "sha256": sha},
        {"path": f"artifacts/{run_id}/bad_size", "size_bytes": "12", "mtime": 0, "sha256": sha},
        ["not", "an", "object"],
        {"path": "../../etc/passwd", "size_bytes": 1, "mtime": 0, "sha256": sha},
        {"path": f"artifacts/{run_id}/" + "z" * 300, "size_bytes": 1, "mtime": 0, "sha256": sha},
    ]
    dest = tmp_path / "dest"
    with _jupyter(token_server) as real:
        backend: Backend = ForgedManifest(real, forged)  # type: ignore[assignment]
        result = sync.sync_run(backend, record, dest, selection=sync.Selection(only=("artifacts",)))
    for rel, data in good.items():
        assert (dest / rel).read_bytes() == data, rel
    assert set(good) <= set(result.transferred)
    reasons = {r.path: r.reason for r in result.refused}
    assert len(result.refused) == 9, [r.line() for r in result.refused]
    assert "a symlink to" in reasons[f"artifacts/{run_id}/escape"]
    assert "outside the target root" in reasons[f"artifacts/{run_id}/escape_file"]
    assert "NUL" in reasons[f"artifacts/{run_id}/nul\x00name"]
    assert "size_bytes" in reasons[f"artifacts/{run_id}/bad_size"]
    assert any("expected an object" in r.reason for r in result.refused)
    assert ".." in reasons["../../etc/passwd"]
    assert reasons[f"artifacts/{run_id}/latin1_\\xe9t\\xe9"] == "the name is not valid UTF-8"
    assert "252 bytes" in reasons[f"artifacts/{run_id}/{long_name}"]
    assert "300 bytes" in reasons[f"artifacts/{run_id}/" + "z" * 300]
    for refusal in result.refused:  # one printable line each
        assert "\n" not in refusal.line() and "\x00" not in refusal.line()
    assert not (tmp_path / "etc").exists() and not list(dest.rglob("secret.txt"))
    # The CLI: every good file is in place, and the refusals make the exit status non-zero.
    out = tmp_path / "out"
    journal.save_record(out, record)
    url_file, token_file = tmp_path / "url", tmp_path / "token"
    url_file.write_text(token_server.url)
    token_file.write_text(token_server.token or "")
    argv = ["--output-dir", str(out), "sync", run_id, "--only", "artifacts",
            "--url-file", str(url_file), "--token-file", str(token_file)]  # fmt: skip
    done = cli(argv, tmp_path, runner_env(tmp_path))
    assert done.returncode == 3, done.stdout + done.stderr
    printed = done.stdout + done.stderr
    assert "Traceback" not in printed and "expired" not in printed
    assert printed.count("refused ") >= 4 and "4 name(s) refused" in printed
    for rel, data in good.items():
        assert (out / rel).read_bytes() == data


def test_cli_help_lists_verify() -> None:
    done = subprocess.run([sys.executable, "-m", "versa_runner.cli", "sync", "--help"],
                          capture_output=True, text=True, check=False)  # fmt: skip
    assert "--verify" in done.stdout


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ({"path": "a", "size_bytes": True, "mtime": 0, "sha256": "0" * 64}, "size_bytes"),
        ({"path": "a", "size_bytes": -1, "mtime": 0, "sha256": "0" * 64}, "size_bytes"),
        ({"path": "a", "size_bytes": 1, "mtime": "x", "sha256": "0" * 64}, "mtime"),
        ({"path": "a", "size_bytes": 1, "mtime": 0, "sha256": "0" * 63}, "sha256"),
        ({"path": "a", "size_bytes": 1, "mtime": 0, "sha256": "G" * 64}, "sha256"),
        ({"path": 5, "size_bytes": 1, "mtime": 0, "sha256": "0" * 64}, "path"),
        ("artifacts/x", "expected an object"),
    ],
)
def test_malformed_manifest_entries_are_named(raw: Any, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        entries.parse_entry(raw)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("a/\x00b", "NUL"),
        ("a/\udcffb", "UTF-8"),
        ("a/" + "é" * 126, "252 bytes"),  # 126 characters, 252 bytes: + .part is over 255
        ("/etc/passwd", "absolute"),
        ("a/../b", "'..'"),
        ("a\\b", "backslash"),
    ],
)
def test_unwritable_names_are_refused_with_their_reason(name: str, reason: str) -> None:
    with pytest.raises(UnsafePathError, match=reason):
        entries.check_name(name)


def test_names_starting_with_dots_are_ordinary(tmp_path: Path) -> None:
    for name in ("..hidden_dots", ".config/x", "a/...b", "x" * 250):
        assert entries.safe_destination(tmp_path, name) == tmp_path.resolve() / name


def test_artifacts_symlinked_out_of_the_root_is_named_not_an_auth_error(tmp_path: Path) -> None:
    from jupyter_fixtures import start_jupyter_server

    server = start_jupyter_server(tmp_path / "server", token="t" + os.urandom(8).hex())
    try:
        outside = tmp_path / "elsewhere"
        (outside / "sub").mkdir(parents=True)
        (outside / "sub" / "ckpt.bin").write_bytes(b"outside the root\n")
        (server.root_dir / "artifacts").symlink_to(outside)
        run_id = "20260101T000009Z-artlink"
        record = _remote_run(server.root_dir, run_id, {"reports/summary.md": b"# ok\n"})
        out = tmp_path / "out"
        journal.save_record(out, record)
        (tmp_path / "url").write_text(server.url)
        (tmp_path / "token").write_text(server.token or "")
        argv = ["--output-dir", str(out), "sync", run_id, "--url-file", str(tmp_path / "url"),
                "--token-file", str(tmp_path / "token")]  # fmt: skip
        done = cli(argv, tmp_path, runner_env(tmp_path))
    finally:
        server.stop()
    printed = done.stdout + done.stderr
    assert done.returncode == 3, printed
    assert (
        f"refused artifacts: a symlink to {outside.resolve()}, outside the target root" in printed
    )
    assert "expired" not in printed and "Traceback" not in printed
    assert (out / "reports" / "summary.md").read_bytes() == b"# ok\n"
    assert (out / "versa_runs" / run_id / "run.log").read_text() == "done\n"
    assert not (out / "artifacts").exists()
