"""The seam between the run lifecycle and a target: transport primitives only.

A backend moves bytes and runs short Python programs on its target; it knows nothing of runs,
status files, heartbeats or journals (those live once, above it, in `versa_runner.runs`).
Adding a target is one module implementing `Backend` plus one line in `backends.REGISTRY`.

Paths passed to a backend are POSIX paths *relative to the target root* (`Backend.root`): on
Kaggle the root is `/kaggle/working`, the directory the Jupyter contents API serves. The job's
working directory is the root, so its `artifacts/` and `reports/` are `<root>/artifacts` etc.

Every backend translates its third-party errors (HTTP, websocket, paramiko, OSError) into
`versa_runner.errors` types in one place at its boundary; nothing above names them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from versa_runner.errors import TargetError
from versa_runner.target import bundle, reply
from versa_runner.target.reply import SENTINEL

ProgressFn = Callable[[int], None]
"""Called with the number of bytes just transferred (for progress bars)."""


@dataclass(frozen=True)
class RemoteStat:
    """Size and modification time of a file on the target."""

    size_bytes: int
    mtime: float


@runtime_checkable
class Backend(Protocol):
    """Transport primitives every target implements."""

    name: str
    """Registry name: "local", "jupyter" or "ssh"."""

    def describe(self) -> str:
        """A human description with every secret redacted (safe to print and journal)."""
        ...

    def root(self) -> str:
        """Absolute POSIX path of the target root on the target machine."""
        ...

    def put_bytes(self, path: str, data: bytes, *, mode: int | None = None) -> None:
        """Write `data` at `path` (parents created), atomically on the target, verified by sha256."""
        ...

    def put_file(self, local_path: Path, path: str, *, progress: ProgressFn | None = None) -> None:
        """Upload a local file to `path`, chunked, atomically on the target, verified by sha256."""
        ...

    def read_bytes(self, path: str, *, offset: int = 0, length: int | None = None) -> bytes | None:
        """Read a file (or the byte range from `offset`); None when the file does not exist."""
        ...

    def download(
        self, path: str, dest: Path, *, offset: int = 0, progress: ProgressFn | None = None
    ) -> None:
        """Append the bytes of `path` from `offset` to `dest` (Range resume); caller verifies."""
        ...

    def stat(self, path: str) -> RemoteStat | None:
        """Size and mtime of `path`, or None when it does not exist."""
        ...

    def run_python(self, code: str, *, timeout_s: float) -> str:
        """Run a short Python snippet on the target and return its stdout.

        The code travels over the backend's channel (stdin, kernel execute, SSH exec), never in a
        process's argv. It must never contain a secret.
        """
        ...

    def close(self) -> None:
        """Release connections; using the backend afterwards raises RuntimeError."""
        ...

    def __enter__(self) -> Backend:
        """Use as a context manager; `close()` on exit."""
        ...

    def __exit__(self, *exc_info: object) -> None:
        """Close the backend."""
        ...


def call_target(backend: Backend, call: str, args: dict[str, Any], *, timeout_s: float) -> Any:
    """Run one op of `versa_runner.target` (e.g. `"ops.kill"`) on the target; its reply.

    The op's source travels with the call (`target.bundle.program`); a reply that never comes
    is a TargetError naming the op and the output's tail.
    """
    stdout = backend.run_python(bundle.program(call, args), timeout_s=timeout_s)
    try:
        return reply.parse(stdout)
    except reply.MissingReply as exc:
        raise TargetError(
            f"{call}: the target sent no reply line (stdout tail: {exc.tail!r})"
        ) from exc


__all__ = ["SENTINEL", "Backend", "ProgressFn", "RemoteStat", "call_target"]
