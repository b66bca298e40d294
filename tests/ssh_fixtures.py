"""A real OpenSSH `sshd` on loopback for the SSH backend tests (a pytest plugin).

Load with `pytest_plugins = ["ssh_fixtures"]`. One session-scoped daemon with its own host key,
key-only auth against an `authorized_keys` in a temp dir, no PAM, logging to a file. Tests log in
as the current user with a generated client key (one plain, one passphrase-protected) and keep
their `~/.ssh/known_hosts` in a per-test HOME, so the real one is never read or written.

scripts/test.sh installs openssh-server on a fresh CI machine; the fixture skips only when no
`sshd` binary can be found or it cannot start.
"""

from __future__ import annotations

import getpass
import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from faultproxy import free_port

SSHD_CANDIDATES = ("/usr/sbin/sshd", "/usr/local/sbin/sshd")
PRIVSEP_DIR = Path("/run/sshd")  # OpenSSH refuses to start without it
START_TIMEOUT_S = 20.0

SSHD_CONFIG = """\
ListenAddress 127.0.0.1
Port {port}
HostKey {host_key}
AuthorizedKeysFile {authorized_keys}
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
StrictModes no
UsePAM no
PidFile {pid_file}
Subsystem sftp internal-sftp
LogLevel VERBOSE
"""


@dataclass
class SshServer:
    """A running sshd started by the tests."""

    port: int
    user: str
    host_key_line: str
    """`[127.0.0.1]:PORT <type> <base64>` as known_hosts wants it."""
    client_key: Path
    encrypted_key: Path
    passphrase: str = field(repr=False)
    stranger_key: Path = field(default=Path())
    """A valid key that is not in authorized_keys."""
    proc: subprocess.Popen | None = None
    log_path: Path = field(default=Path())

    @property
    def spec(self) -> str:
        return f"{self.user}@127.0.0.1:{self.port}"

    def home_with_known_host(self, home: Path) -> Path:
        """Make `home/.ssh/known_hosts` trust this server; returns `home`."""
        (home / ".ssh").mkdir(parents=True, exist_ok=True, mode=0o700)
        (home / ".ssh" / "known_hosts").write_text(self.host_key_line + "\n")
        return home

    def connection_pids(self) -> list[int]:
        """The per-connection sshd processes (children of the listener)."""
        assert self.proc is not None
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    stat = Path(f"/proc/{entry}/stat").read_text()
                except OSError:
                    continue
                fields = stat[stat.rindex(")") + 2 :].split()
                if int(fields[1]) == self.proc.pid and fields[0] != "Z":
                    found.append(int(entry))
        return found


def _keygen(path: Path, passphrase: str = "") -> str:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", passphrase, "-C", "versa-test", "-f", str(path)],
        check=True, capture_output=True,
    )  # fmt: skip
    return path.with_name(path.name + ".pub").read_text().strip()


def _wait_for_banner(port: int, proc: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited: {log_path.read_text()[-1500:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                if sock.recv(64).startswith(b"SSH-"):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"sshd did not answer within {START_TIMEOUT_S} s")


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshServer]:
    """sshd on 127.0.0.1:<free port>, key auth only, for the current user."""
    binary = next((c for c in SSHD_CANDIDATES if os.access(c, os.X_OK)), None)
    if binary is None or shutil.which("ssh-keygen") is None:
        pytest.skip("OpenSSH sshd/ssh-keygen not installed (scripts/test.sh installs them as root)")
    work = tmp_path_factory.mktemp("sshd")
    host_pub = _keygen(work / "host_ed25519")
    client_pub = _keygen(work / "client_ed25519")
    passphrase = "pp-" + secrets.token_hex(10)
    encrypted_pub = _keygen(work / "encrypted_ed25519", passphrase)
    _keygen(work / "stranger_ed25519")
    (work / "authorized_keys").write_text(f"{client_pub}\n{encrypted_pub}\n")
    port = free_port()
    config = work / "sshd_config"
    config.write_text(SSHD_CONFIG.format(
        port=port, host_key=work / "host_ed25519", authorized_keys=work / "authorized_keys",
        pid_file=work / "sshd.pid",
    ))  # fmt: skip
    if os.geteuid() == 0:
        PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
    log_path = work / "sshd.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [binary, "-D", "-e", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
    try:
        _wait_for_banner(port, proc, log_path)
    except RuntimeError as exc:
        proc.kill()
        pytest.skip(f"sshd could not start here: {exc}")
    key_type, key_b64 = host_pub.split()[:2]
    server = SshServer(
        port=port, user=getpass.getuser(), host_key_line=f"[127.0.0.1]:{port} {key_type} {key_b64}",
        client_key=work / "client_ed25519", encrypted_key=work / "encrypted_ed25519",
        passphrase=passphrase, stranger_key=work / "stranger_ed25519", proc=proc,
        log_path=log_path,
    )  # fmt: skip
    yield server
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)
