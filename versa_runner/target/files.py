"""Atomic writes on the target: the target-side twin of `versa_runner.fsutil`.

A unique temporary in the same directory, fsync, `os.replace`; the temporary is removed in
`finally`. Standard library only (this module runs where `versa_runner` is not installed).
"""

from __future__ import annotations

import hashlib
import os
import secrets

READ_BYTES = 1 << 20


def atomic_write_text(path: str, text: str, mode: int = 0o644) -> None:
    """Write `text` to `path` so a reader sees the old or the new file, never a part."""
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, f".{name}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def sha256_of(path: str) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(READ_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()
