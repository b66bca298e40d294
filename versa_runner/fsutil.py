"""Atomic file writes and checksums: the one way files that others read are written.

Invariant (after huggingface_hub's download code): a reader sees either the old complete file or
the new complete file, never a partial one. A unique temporary in the same directory is written,
flushed, fsynced and `os.replace`d into place; the temporary is removed in `finally` if anything
fails. Locks would only be an optimization; the rename is the guarantee.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import Any

from versa_runner.errors import TransferError

CHUNK_BYTES = 1 << 20  # 1 MiB reads for hashing and copying


def atomic_write_bytes(
    path: str | os.PathLike[str], data: bytes, *, mode: int | None = None
) -> None:
    """Write `data` to `path` atomically (temp file in the same dir, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if mode is None else mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if mode is None:
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_copy(
    source: str | os.PathLike[str], path: str | os.PathLike[str], *,
    expected_sha256: str | None = None,
) -> str:  # fmt: skip
    """Copy `source` to `path` atomically; returns the copy's sha256.

    With `expected_sha256`, a copy whose bytes hash differently is discarded before the rename
    (TransferError), so `path` never holds a corrupt file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    digest = hashlib.sha256()
    try:
        with open(source, "rb") as src, open(tmp, "xb") as out:
            while chunk := src.read(CHUNK_BYTES):
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        if expected_sha256 is not None and digest.hexdigest() != expected_sha256:
            raise TransferError(f"copy of {source} to {path} did not verify (sha256 mismatch)")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return digest.hexdigest()


def atomic_write_text(path: str | os.PathLike[str], text: str, *, mode: int | None = None) -> None:
    """Write UTF-8 text atomically."""
    atomic_write_bytes(path, text.encode("utf-8"), mode=mode)


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write JSON (indented, sorted keys, trailing newline) atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current
