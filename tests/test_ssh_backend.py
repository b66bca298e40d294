"""SshBackend's transport primitives against a real sshd on loopback (ssh_fixtures).

Each assertion looks at the real file system behind the SFTP server (the "remote" is this
machine), so it checks what landed on the host, not what the backend believes it wrote.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

import paramiko
import pytest
from runner_support import TARGET_PYTHON

from versa_runner.backends import get_backend_class
from versa_runner.backends.base import Backend
from versa_runner.backends.ssh.backend import SshBackend
from versa_runner.backends.ssh.target import SshTarget, load_key, parse_ssh_spec
from versa_runner.errors import (
    AuthError,
    TargetError,
    UnreachableError,
    UnsafePathError,
    UsageError,
)

if TYPE_CHECKING:
    from ssh_fixtures import SshServer

pytest_plugins = ["ssh_fixtures"]
PYTHON = TARGET_PYTHON


def backend_for(server: SshServer, home: Path, root: Path, **target: object) -> SshBackend:
    server.home_with_known_host(home)
    fields: dict = {"host": "127.0.0.1", "user": server.user, "port": server.port,
                    "key_file": server.client_key, "known_hosts": home / ".ssh" / "known_hosts"}  # fmt: skip
    fields.update(target)
    return SshBackend(SshTarget(**fields), remote_root=str(root), python=PYTHON)


def test_parse_ssh_spec() -> None:
    assert parse_ssh_spec("alice@gpu.example:2222") == ("alice", "gpu.example", 2222)
    assert parse_ssh_spec("ssh:bob@10.0.0.5:22") == ("bob", "10.0.0.5", 22)
    assert parse_ssh_spec("bob@h", port=2200) == ("bob", "h", 2200)
    assert parse_ssh_spec("h")[1:] == ("h", 22)
    for bad, port in (("bob@h:x", None), ("bob@", None), ("bob@h:22", 23), ("bob@h", 70000)):
        with pytest.raises(UsageError):
            parse_ssh_spec(bad, port=port)


def test_primitives_on_a_real_host(sshd: SshServer, tmp_path: Path) -> None:
    root = tmp_path / "remote_root"
    with backend_for(sshd, tmp_path / "home", root) as backend:
        assert isinstance(backend, Backend) and get_backend_class("ssh") is SshBackend
        assert backend.describe() == f"ssh:{sshd.user}@127.0.0.1:{sshd.port}"
        assert backend.root() == str(root)
        backend.put_bytes("a/b/secret.env", b"K=v\n", mode=0o600)
        on_host = root / "a" / "b" / "secret.env"
        assert on_host.read_bytes() == b"K=v\n"
        assert stat.S_IMODE(on_host.stat().st_mode) == 0o600
        backend.put_bytes("a/b/secret.env", b"K=w\n")  # overwrite goes through rename too
        assert on_host.read_bytes() == b"K=w\n"
        big = os.urandom(3 << 20) + "café".encode()
        local = tmp_path / "big.bin"
        local.write_bytes(big)
        seen: list[int] = []
        backend.put_file(local, "up/big.bin", progress=seen.append)
        assert sum(seen) == len(big)
        assert (root / "up" / "big.bin").read_bytes() == big
        assert not list(root.rglob("*.part")), "an upload temporary was left behind"
        assert backend.read_bytes("up/big.bin", offset=10, length=5) == big[10:15]
        assert backend.read_bytes("up/big.bin", offset=len(big) - 3) == big[-3:]
        assert backend.read_bytes("nope.txt") is None and backend.stat("nope.txt") is None
        info = backend.stat("up/big.bin")
        assert info is not None and info.size_bytes == len(big)
        assert abs(info.mtime - (root / "up" / "big.bin").stat().st_mtime) < 1.5
        dest = tmp_path / "down.bin"
        dest.write_bytes(big[:1000] + b"garbage past the offset")
        backend.download("up/big.bin", dest, offset=1000)  # resume: keep 1000 bytes, append rest
        assert hashlib.sha256(dest.read_bytes()).digest() == hashlib.sha256(big).digest()
        out = backend.run_python("import os; print(os.getcwd())", timeout_s=30)
        assert out.strip() == str(root)
        with pytest.raises(TargetError, match="exit 3"):
            backend.run_python("import sys; sys.exit(3)", timeout_s=30)
        with pytest.raises(TargetError, match="within 1 s"):
            backend.run_python("import time; time.sleep(30)", timeout_s=1)
        for escape in ("../outside", "/etc/passwd"):
            with pytest.raises(UnsafePathError):
                backend.read_bytes(escape)
    with pytest.raises(RuntimeError, match="after close"):
        backend.stat("up/big.bin")


def test_dropped_connection_is_reopened_for_reads(sshd: SshServer, tmp_path: Path) -> None:
    root = tmp_path / "remote_root"
    with backend_for(sshd, tmp_path / "home", root) as backend:
        backend.put_bytes("f.txt", b"still here")
        before = set(sshd.connection_pids())
        assert before
        for pid in before:  # cut every live SSH connection on the server side
            os.kill(pid, 9)
        assert backend.read_bytes("f.txt") == b"still here"
        assert set(sshd.connection_pids()) - before, "expected a fresh connection"


def test_auth_host_key_and_unreachable_are_named(sshd: SshServer, tmp_path: Path) -> None:
    root = tmp_path / "remote_root"
    with backend_for(sshd, tmp_path / "h1", root, key_file=sshd.stranger_key) as backend:
        with pytest.raises(AuthError, match="authentication failed"):
            backend.stat("anything")
    fresh = tmp_path / "h2" / ".ssh" / "known_hosts"
    target = SshTarget("127.0.0.1", sshd.user, sshd.port, key_file=sshd.client_key,
                       known_hosts=fresh)  # fmt: skip
    with SshBackend(target, remote_root=str(root), python=PYTHON) as backend:
        with pytest.raises(TargetError, match="not in") as refused:
            backend.run_python("print(1)", timeout_s=10)
        assert "--ssh-accept-new" in refused.value.hint and "SHA256:" in str(refused.value)
    assert not fresh.exists(), "an unknown host key was written without --ssh-accept-new"
    closed_port = SshTarget("127.0.0.1", sshd.user, _closed_port(), key_file=sshd.client_key)
    with SshBackend(closed_port) as backend, pytest.raises(UnreachableError):
        backend.stat("x")


def _closed_port() -> int:
    from faultproxy import free_port

    return free_port()


def test_key_loading_names_the_passphrase_problem(sshd: SshServer) -> None:
    plain, encrypted = sshd.client_key, sshd.encrypted_key
    assert load_key(SshTarget("h", "u", key_file=plain, passphrase="meant-for-another-key"))
    assert load_key(SshTarget("h", "u", key_file=encrypted, passphrase=sshd.passphrase))
    with pytest.raises(paramiko.AuthenticationException, match="VERSA_SSH_PASSPHRASE is not set"):
        load_key(SshTarget("h", "u", key_file=encrypted))
    with pytest.raises(paramiko.AuthenticationException, match="wrong passphrase") as wrong:
        load_key(SshTarget("h", "u", key_file=encrypted, passphrase="nope-" + sshd.passphrase))
    assert sshd.passphrase not in str(wrong.value)


def test_remote_root_under_the_login_directory(sshd: SshServer, tmp_path: Path) -> None:
    home = Path(os.path.expanduser("~" + sshd.user)).resolve()  # sshd's HOME for the user
    for given, expected in (
        ("~/versa_work", home / "versa_work"),
        ("~", home),
        ("w/x", home / "w/x"),
    ):
        with backend_for(sshd, tmp_path / "home", Path(given)) as backend:
            assert backend.root() == str(expected)
    with backend_for(sshd, tmp_path / "home", Path("~other/x")) as backend:
        with pytest.raises(UsageError, match="--remote-root"):
            backend.root()
