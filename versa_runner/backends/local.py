"""The local target: this machine, rooted at the output directory.

It speaks the same transport primitives as every other target, so the run lifecycle above it
is the one remote runs use: files are written atomically under the root, and Python snippets
run in a fresh `sys.executable -` process with the code on stdin (never in argv, so `ps` shows
nothing a snippet carries) and an environment without secrets (`scrubbed_environment`).
The job's working directory is the root itself, which is why syncing a local run transfers
nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from versa_runner.backends.base import ProgressFn, RemoteStat
from versa_runner.errors import TargetError, TransferError, UnsafePathError
from versa_runner.fsutil import CHUNK_BYTES, atomic_copy, atomic_write_bytes, sha256_file
from versa_runner.runs.secrets import is_never_forwarded, is_secret_name

if TYPE_CHECKING:
    from versa_runner.backends import TargetOptions


class LocalBackend:
    """Backend whose target root is a directory on this machine."""

    name = "local"

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self._root = Path(root).resolve()
        self._closed = False

    def __enter__(self) -> LocalBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self) -> str:
        """`local:<root>` (nothing secret on this target)."""
        return f"local:{self._root}"

    def root(self) -> str:
        """The output directory, absolute."""
        return self._root.as_posix()

    def _resolve(self, path: str) -> Path:
        """Absolute path of a root-relative POSIX path; refuses paths that leave the root."""
        self._check_open()
        relative = PurePosixPath(path)
        if relative.is_absolute() or ".." in relative.parts:
            raise UnsafePathError(f"path {path!r} is not relative to the target root")
        return self._root.joinpath(*relative.parts)

    def put_bytes(self, path: str, data: bytes, *, mode: int | None = None) -> None:
        """Atomic write under the root."""
        with _translate_os_errors(path):
            atomic_write_bytes(self._resolve(path), data, mode=mode)

    def put_file(self, local_path: Path, path: str, *, progress: ProgressFn | None = None) -> None:
        """Copy a file under the root, sha256-verified, renamed into place."""
        target = self._resolve(path)
        with _translate_os_errors(path):
            atomic_copy(local_path, target, expected_sha256=sha256_file(local_path))
        if progress is not None:
            progress(target.stat().st_size)

    def read_bytes(self, path: str, *, offset: int = 0, length: int | None = None) -> bytes | None:
        """Bytes from `offset` (None when the file does not exist)."""
        target = self._resolve(path)
        with _translate_os_errors(path):
            try:
                with open(target, "rb") as fh:
                    fh.seek(offset)
                    return fh.read() if length is None else fh.read(length)
            except FileNotFoundError:
                return None

    def download(
        self, path: str, dest: Path, *, offset: int = 0, progress: ProgressFn | None = None
    ) -> None:
        """Append the source's bytes from `offset` to `dest` (resume semantics)."""
        source = self._resolve(path)
        with _translate_os_errors(path):
            dest.parent.mkdir(parents=True, exist_ok=True)
            with open(source, "rb") as src, open(dest, "ab") as out:
                out.truncate(offset)
                src.seek(offset)
                while chunk := src.read(CHUNK_BYTES):
                    out.write(chunk)
                    if progress is not None:
                        progress(len(chunk))

    def stat(self, path: str) -> RemoteStat | None:
        """Size and mtime, or None."""
        target = self._resolve(path)
        try:
            info = target.stat()
        except FileNotFoundError:
            return None
        return RemoteStat(size_bytes=info.st_size, mtime=info.st_mtime)

    def run_python(self, code: str, *, timeout_s: float) -> str:
        """Run a snippet in `sys.executable -` with the code on stdin; returns stdout."""
        self._check_open()
        with _translate_os_errors(self.root()):
            self._root.mkdir(parents=True, exist_ok=True)  # a fresh --output-dir is the root
        try:
            result = subprocess.run(
                [sys.executable, "-"], input=code, capture_output=True, text=True,
                cwd=self._root, timeout=timeout_s, check=False, env=scrubbed_environment(),
            )  # fmt: skip
        except subprocess.TimeoutExpired as exc:
            raise TargetError(f"local snippet did not finish within {timeout_s:.0f} s") from exc
        except OSError as exc:
            raise TargetError(f"cannot start {sys.executable}: {exc.strerror}") from exc
        if result.returncode != 0:
            tail = "\n".join(result.stderr.strip().splitlines()[-3:])
            raise TargetError(f"local snippet failed (exit {result.returncode}): {tail}")
        return result.stdout

    def close(self) -> None:
        """Mark closed; later calls raise RuntimeError."""
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("LocalBackend used after close()")


def scrubbed_environment() -> dict[str, str]:
    """This process's environment minus secrets: snippets (and the jobs they launch) get a
    secret only through `--secret NAME` and secrets.env, exactly as on a remote target."""
    return {
        name: value
        for name, value in os.environ.items()
        if not is_secret_name(name) and not is_never_forwarded(name, value)
    }


@contextmanager
def _translate_os_errors(path: str) -> Iterator[None]:
    """The one place local OSErrors become versa-run errors."""
    try:
        yield
    except OSError as exc:
        raise TransferError(f"local file operation on {path} failed: {exc.strerror}") from exc


def from_options(options: TargetOptions, *, root: str | None = None) -> LocalBackend:
    """The local target: the run's recorded root, else the output directory."""
    return LocalBackend(root or Path(options.output_dir).resolve())


BACKEND_CLASS = LocalBackend
