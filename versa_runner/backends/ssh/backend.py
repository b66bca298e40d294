"""The SSH target: any host reachable with OpenSSH, driven through paramiko.

Transport only (see `backends.base`); where the host is and whether to trust its key is
`backends.ssh.target`. Files move over SFTP: uploads go to `<name>.<hex>.part`, are checked by
sha256 (small files read back over SFTP, larger ones hashed by `fileops.sha256` on the host: OpenSSH
has no SFTP `check-file` extension, orchestration_anchors §5.2), then renamed with
`posix-rename@openssh.com`; downloads seek to the resume offset and prefetch from there.
`run_python` execs `<python> -` in the target root with the program written to the channel's
stdin, so no program ever shows in a remote `ps`. The job outlives this connection because the
launch op starts the launcher in its own process session (lifecycle), not because of
anything here. A connection that drops is re-opened by the next call (read-only calls retry
once), so a follower polling status rides over it. No call waits without a deadline
(`backends.ssh.waits`): a host that stops answering is an UnreachableError.
"""

from __future__ import annotations

import errno
import hashlib
import io
import logging
import posixpath
import secrets
import shlex
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, BinaryIO, TypeVar

import paramiko

from versa_runner.backends.base import ProgressFn, RemoteStat, call_target
from versa_runner.backends.ssh import waits
from versa_runner.backends.ssh.target import (
    AUTH_HINT,
    UNKNOWN_HOST_HINT,
    SshTarget,
    UnknownHostKey,
    open_client,
    parse_ssh_spec,
)
from versa_runner.errors import (
    AuthError,
    DiskFullError,
    TargetError,
    TransferError,
    UnreachableError,
    UnsafePathError,
    UsageError,
    VersaRunError,
)
from versa_runner.fsutil import CHUNK_BYTES

SFTP_READ_BYTES = 32 * 1024  # paramiko's largest SFTP read packet

if TYPE_CHECKING:
    from versa_runner.backends import TargetOptions

log = logging.getLogger(__name__)
_T = TypeVar("_T")

DEFAULT_REMOTE_ROOT = "~/versa_work"
DEFAULT_PYTHON = "python3"
PASSPHRASE_ENV = "VERSA_SSH_PASSPHRASE"
HASH_TIMEOUT_S = 600.0
READ_BACK_MAX_BYTES = 1 << 20  # uploads up to this size are verified by reading them back
STDERR_TAIL_LINES = 3


class SshBackend:
    """Transport to an SSH host: SFTP for files, exec channels for snippets."""

    name = "ssh"

    def __init__(
        self,
        target: SshTarget,
        *,
        root: str | None = None,
        remote_root: str = DEFAULT_REMOTE_ROOT,
        python: str = DEFAULT_PYTHON,
        io_timeout_s: float = waits.IO_TIMEOUT_S,
    ) -> None:
        self.target = target
        self.python = python
        self.io_timeout_s = io_timeout_s
        self._remote_root = remote_root
        self._root = root  # known from the journal for follow-up commands
        self._client: paramiko.SSHClient | None = None
        self._sftp_client: paramiko.SFTPClient | None = None
        self._made_dirs: set[str] = set()
        self._closed = False

    # -- Backend protocol ---------------------------------------------------------------------

    def describe(self) -> str:
        """`ssh:user@host:port`; never a key path or passphrase."""
        return self.target.described

    def root(self) -> str:
        """The absolute root on the host; `~` is the login directory SFTP starts in."""
        if self._root is None:
            raw = self._remote_root
            if raw.startswith("~") and raw != "~" and not raw.startswith("~/"):
                raise UsageError(f"--remote-root: ~user paths are not supported, got {raw!r}",
                                 hint="Give an absolute path or one under ~/.")  # fmt: skip
            if not raw.startswith("/"):  # `~`, `~/x` or relative: under the login directory
                with self._boundary("resolve the home directory"):
                    home = self._sftp().normalize(".")
                raw = posixpath.join(home, raw.removeprefix("~").lstrip("/"))
            self._root = posixpath.normpath(raw)
        return self._root

    def put_bytes(self, path: str, data: bytes, *, mode: int | None = None) -> None:
        """Write `data` to `path` via a `.part` temporary, verified by sha256, then renamed."""
        self._upload(io.BytesIO(data), path, hashlib.sha256(data).hexdigest(), mode, None)

    def put_file(self, local_path: Path, path: str, *, progress: ProgressFn | None = None) -> None:
        """Upload a local file the same way as `put_bytes`, reporting progress per chunk."""
        digest = hashlib.sha256()
        with open(local_path, "rb") as fh:
            while block := fh.read(CHUNK_BYTES):
                digest.update(block)
            fh.seek(0)
            self._upload(fh, path, digest.hexdigest(), None, progress)

    def read_bytes(self, path: str, *, offset: int = 0, length: int | None = None) -> bytes | None:
        """Bytes of `path` from `offset` (an SFTP seek); None when the file does not exist."""
        full = self._resolve(path)

        def read() -> bytes | None:
            try:
                with self._sftp().open(full, "rb") as fh:
                    fh.seek(offset)
                    return fh.read() if length is None else fh.read(length)
            except FileNotFoundError:
                return None

        return self._idempotent(f"read {path}", read)

    def download(
        self, path: str, dest: Path, *, offset: int = 0, progress: ProgressFn | None = None
    ) -> None:
        """Append `path` from `offset` to `dest` (resume = seek, then prefetch the rest)."""
        full = self._resolve(path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with self._boundary(f"download {path}"), open(dest, "ab") as out:
            out.truncate(offset)
            with self._sftp().open(full, "rb") as src:
                size = src.stat().st_size or 0
                src.seek(offset)
                src.prefetch(size)
                # One SFTP packet per read: a dropped connection loses no byte that arrived
                # (a 1 MiB read waits for the whole MiB and drops it on a cut).
                while chunk := src.read(SFTP_READ_BYTES):
                    out.write(chunk)
                    if progress is not None:
                        progress(len(chunk))

    def stat(self, path: str) -> RemoteStat | None:
        """Size and mtime over SFTP; None when `path` does not exist."""
        full = self._resolve(path)

        def stat() -> RemoteStat | None:
            try:
                info = self._sftp().stat(full)
            except FileNotFoundError:
                return None
            return RemoteStat(size_bytes=int(info.st_size or 0), mtime=float(info.st_mtime or 0))

        return self._idempotent(f"stat {path}", stat)

    def run_python(self, code: str, *, timeout_s: float) -> str:
        """Run `code` with `<python> -` in the root (code on stdin) and return its stdout."""
        root = shlex.quote(self.root())
        enter_root = f"{{ cd -- {root} 2>/dev/null || {{ mkdir -p -- {root} && cd -- {root}; }}; }}"
        command = f"{enter_root} && exec {shlex.quote(self.python)} -"
        with self._boundary("run a snippet"):
            transport = self._connection().get_transport()
            with waits.watchdog(self._client, timeout_s + self.io_timeout_s, self.describe()):
                channel = transport.open_session(timeout=self.io_timeout_s)  # type: ignore[union-attr]
                channel.settimeout(self.io_timeout_s)
                try:
                    channel.exec_command(command)
                    channel.sendall(code.encode())
                    channel.shutdown_write()
                    stdout, stderr = waits.collect_output(channel, timeout_s)
                    exit_status = channel.recv_exit_status()
                finally:
                    channel.close()
        if exit_status != 0:
            tail = "\n".join(
                stderr.decode(errors="replace").strip().splitlines()[-STDERR_TAIL_LINES:]
            )
            hint = f"Is {self.python!r} a Python 3 on the host? Pass --ssh-python PATH otherwise."
            raise TargetError(f"snippet failed on {self.describe()} (exit {exit_status}): {tail}",
                              hint=hint)  # fmt: skip
        return stdout.decode(errors="replace")

    def close(self) -> None:
        """Close SFTP and the SSH connection; a running job is not affected."""
        self._drop_connection()
        self._closed = True

    def __enter__(self) -> SshBackend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- internals ------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("SshBackend used after close()")

    def _resolve(self, path: str) -> str:
        """Absolute remote path of a root-relative POSIX path; refuses paths leaving the root."""
        self._check_open()
        relative = PurePosixPath(path)
        if relative.is_absolute() or ".." in relative.parts:
            raise UnsafePathError(f"path {path!r} is not relative to the target root")
        return posixpath.join(self.root(), *relative.parts)

    def _idempotent(self, what: str, operation: Callable[[], _T]) -> _T:
        """Run a read-only operation; a connection that dropped under it is re-opened once."""
        try:
            with self._boundary(what):
                return operation()
        except UnreachableError as first:
            log.debug("retrying %s after %s", what, first)
            with self._boundary(what):
                return operation()

    def _connection(self) -> paramiko.SSHClient:
        """The open SSH connection, (re)connecting when there is none or it dropped."""
        self._check_open()
        transport = self._client.get_transport() if self._client is not None else None
        if transport is not None and transport.is_active():
            return self._client  # type: ignore[return-value]
        self._drop_connection()
        client = open_client(self.target)
        self._client = client
        return client

    def _sftp(self) -> paramiko.SFTPClient:
        client = self._connection()
        if self._sftp_client is None:
            with waits.watchdog(client, self.io_timeout_s, self.describe()):
                self._sftp_client = client.open_sftp()
            # Every SFTP request reads its answer from this channel: bound each wait.
            self._sftp_client.get_channel().settimeout(self.io_timeout_s)  # type: ignore[union-attr]
        return self._sftp_client

    def _drop_connection(self) -> None:
        for holder in (self._sftp_client, self._client):
            if holder is not None:
                try:
                    holder.close()
                except (OSError, EOFError, paramiko.SSHException):
                    pass  # already gone; closing is best effort
        self._sftp_client, self._client = None, None
        self._made_dirs.clear()

    def _mkdirs(self, directory: str) -> None:
        """`mkdir -p` over SFTP, remembering what exists for this connection."""
        sftp = self._sftp()
        missing: list[str] = []
        current = directory
        while current not in self._made_dirs and current not in ("/", ""):
            try:
                sftp.stat(current)
                break
            except FileNotFoundError:
                missing.append(current)
                current = posixpath.dirname(current)
        for name in reversed(missing):
            try:
                sftp.mkdir(name)
            except OSError:  # raced by another writer; it must exist now
                sftp.stat(name)
        self._made_dirs.add(directory)

    def _upload(
        self, source: BinaryIO, path: str, sha256: str, mode: int | None,
        progress: ProgressFn | None,
    ) -> None:  # fmt: skip
        """Write to `<name>.<hex>.part`, verify its sha256 on the host, rename onto `path`."""
        final = self._resolve(path)
        tmp = f"{final}.{secrets.token_hex(4)}.part"
        with self._boundary(f"upload {path}"):
            self._mkdirs(posixpath.dirname(final))
            sftp = self._sftp()
            try:
                with sftp.open(tmp, "wb") as out:
                    if mode is not None:  # private before the first byte arrives
                        sftp.chmod(tmp, mode)
                    out.set_pipelined(True)
                    while block := source.read(CHUNK_BYTES):
                        out.write(block)
                        if progress is not None:
                            progress(len(block))
                if self._written_sha256(tmp, out_size=source.tell()) != sha256:
                    raise TransferError(f"upload of {path} did not verify (sha256 mismatch)")
                sftp.posix_rename(tmp, final)
            except BaseException:
                self._discard(tmp)
                raise

    def _discard(self, full_path: str) -> None:
        try:
            if self._sftp_client is not None:
                self._sftp_client.remove(full_path)
        except (OSError, EOFError, paramiko.SSHException) as exc:
            log.debug("could not remove temporary %s: %s", full_path, exc)

    def _written_sha256(self, full_path: str, *, out_size: int) -> str:
        """sha256 of what landed on the host. Small files are read back over SFTP and hashed
        here: same check, without starting an interpreter on the host (~0.4 s per snippet,
        measured on the loopback sshd); larger ones are hashed by a snippet on the host."""
        if out_size <= READ_BACK_MAX_BYTES:
            with self._sftp().open(full_path, "rb") as fh:
                return hashlib.sha256(fh.read()).hexdigest()
        return self._remote_sha256(full_path)

    def _remote_sha256(self, full_path: str) -> str:
        return str(call_target(self, "fileops.sha256", {"root": "/", "path": full_path},
                               timeout_s=HASH_TIMEOUT_S))  # fmt: skip

    @contextmanager
    def _boundary(self, what: str) -> Iterator[None]:
        """The one place paramiko, socket and SFTP errors become versa-run errors."""
        where = f"{what} on {self.describe()}"
        try:
            yield
        except VersaRunError:
            raise
        except UnknownHostKey as exc:
            raise TargetError(str(exc), hint=UNKNOWN_HOST_HINT) from exc
        except paramiko.BadHostKeyException as exc:
            self._drop_connection()
            raise TargetError(
                f"host key of {self.target.host} does not match {self.target.known_hosts}",
                hint="The host was reinstalled or someone is in the middle: check before "
                "removing the old line from known_hosts.",
            ) from exc
        except paramiko.AuthenticationException as exc:
            self._drop_connection()
            detail = str(exc) if str(exc) != "Authentication failed." else "no key was accepted"
            raise AuthError(f"{self.describe()}: authentication failed: {detail}",
                            hint=AUTH_HINT) from exc  # fmt: skip
        except (paramiko.SSHException, EOFError, ConnectionError, TimeoutError,
                socket.gaierror, paramiko.ssh_exception.NoValidConnectionsError) as exc:  # fmt: skip
            self._drop_connection()
            raise UnreachableError(f"cannot {where}: {exc or type(exc).__name__}") from exc
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):  # the local disk, not the connection
                raise DiskFullError(f"no space left on the local disk during {where}") from exc
            transport = self._client.get_transport() if self._client is not None else None
            if transport is None or not transport.is_active():  # "Socket is closed" and kin
                self._drop_connection()
                raise UnreachableError(f"connection lost during {where}") from exc
            raise TransferError(f"cannot {where}: {exc.strerror or exc}") from exc


def from_options(options: TargetOptions, *, root: str | None = None) -> SshBackend:
    """The SSH target of `options.ssh` (from --ssh, or a journaled run's `ssh:user@host:port`)."""
    user, host, port = parse_ssh_spec(options.ssh or "", port=options.ssh_port)
    key = Path(options.ssh_key).expanduser() if options.ssh_key else None
    if key is not None and not key.is_file():
        raise UsageError(f"--ssh-key: {key} is not a file")
    passphrase = options.environ.get(PASSPHRASE_ENV) or None
    if passphrase:
        options.on_secret(passphrase)
    target = SshTarget(host=host, user=user, port=port, key_file=key, passphrase=passphrase,
                       accept_new=options.ssh_accept_new)  # fmt: skip
    io_timeout_s = waits.io_timeout_from_env(options.environ)
    return SshBackend(target, root=root, python=options.ssh_python or DEFAULT_PYTHON,
                      remote_root=options.remote_root or DEFAULT_REMOTE_ROOT,
                      io_timeout_s=io_timeout_s)  # fmt: skip


BACKEND_CLASS = SshBackend

__all__ = [
    "BACKEND_CLASS",
    "from_options",
    "DEFAULT_REMOTE_ROOT",
    "SshBackend",
    "SshTarget",
    "parse_ssh_spec",
]
