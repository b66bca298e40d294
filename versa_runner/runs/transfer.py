"""One verified download: `<file>.part`, resumed at its size, sha256-checked, renamed into place.

Whatever a backend does inside `download`, this loop guarantees progress: after a dropped
connection it asks again from the bytes the `.part` already holds, and its failure budget
resets whenever that `.part` grew, so a link that cuts every 64 KiB still finishes (it only
gives up after `attempts` tries in a row that brought no byte). Local disk space is checked
against the sizes to fetch before anything is written; a full disk mid-file keeps the `.part`.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from versa_runner.backends.base import Backend
from versa_runner.errors import DiskFullError, TransferError, UnreachableError
from versa_runner.fsutil import sha256_file
from versa_runner.runs.entries import PART_SUFFIX, ManifestEntry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FetchPolicy:
    """Retries of one file: `attempts` in a row without a new byte, with jittered backoff."""

    attempts: int = 6
    base_delay_s: float = 0.5
    max_delay_s: float = 8.0

    def delay_s(self, failures: int) -> float:
        """Sleep before the next try after `failures` fruitless ones in a row."""
        return random.uniform(0, min(self.max_delay_s, self.base_delay_s * 2 ** max(failures, 0)))


def part_path(target: Path) -> Path:
    """The `.part` beside `target` that collects its bytes until they are verified."""
    return target.with_name(target.name + PART_SUFFIX)


def part_size(target: Path) -> int:
    """Bytes already in `target`'s `.part` (0 when there is none)."""
    try:
        return part_path(target).stat().st_size
    except FileNotFoundError:
        return 0


def free_bytes(folder: Path) -> int:
    """Free bytes on the filesystem that holds `folder` (its nearest existing ancestor)."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def check_room(dest_root: Path, needed: int) -> None:
    """DiskFullError naming `dest_root` when fewer than `needed` bytes are free there."""
    free = free_bytes(dest_root)
    if needed > free:
        raise DiskFullError(
            f"not enough space in {dest_root}: this sync needs {needed} bytes, {free} are free"
        )


def fetch(
    backend: Backend, entry: ManifestEntry, target: Path, *, policy: FetchPolicy | None = None
) -> int:
    """Bring `entry` to `target`, verified; returns the bytes transferred.

    A `.part` that verifies wrong is discarded and the file fetched once more from byte 0 (the
    part may hold bytes of an older version); a second mismatch is a TransferError.
    """
    policy = policy or FetchPolicy()
    try:
        return _fetch(backend, entry, target, policy)
    except OSError as exc:  # local writes: a full disk stops the sync, anything else this file
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _disk_full(entry, target) from None
        raise TransferError(
            f"{entry.path}: cannot write {exc.filename or target}: {exc.strerror or exc}"
        ) from None
    except DiskFullError:
        raise _disk_full(entry, target) from None


def _disk_full(entry: ManifestEntry, target: Path) -> DiskFullError:
    remaining = entry.size_bytes - part_size(target)
    return DiskFullError(
        f"disk full in {target.parent} while writing {entry.path}: {remaining} more bytes "
        f"needed (the {PART_SUFFIX} is kept; the next sync resumes it)"
    )


def _fetch(backend: Backend, entry: ManifestEntry, target: Path, policy: FetchPolicy) -> int:
    target.parent.mkdir(parents=True, exist_ok=True)
    moved = 0
    for attempt in (1, 2):
        moved += _fill_part(backend, entry, target, policy)
        part = part_path(target)
        if part.stat().st_size > entry.size_bytes:  # an append-only log grew since the manifest
            os.truncate(part, entry.size_bytes)
        if sha256_file(part) == entry.sha256:
            os.replace(part, target)
            return moved
        part.unlink()
        if attempt == 1:
            log.info("%s: sha256 mismatch; fetching it again from byte 0", entry.path)
    raise TransferError(
        f"{entry.path}: sha256 differs from the target's twice (it changed on the target while "
        "syncing?); nothing was written under its name"
    )


def _fill_part(backend: Backend, entry: ManifestEntry, target: Path, policy: FetchPolicy) -> int:
    """Download into the `.part` until it holds `entry.size_bytes`; returns the bytes added."""
    part = part_path(target)
    if part_size(target) > entry.size_bytes:  # a stale part from an older, longer version
        part.unlink()
    start = part_size(target)
    failures = 0
    while True:
        offset = part_size(target)
        if part.exists() and offset >= entry.size_bytes:
            return offset - start
        try:
            backend.download(entry.path, part, offset=offset)
            if not part.exists():  # an empty file: nothing was written, so create it
                part.touch()
            if part_size(target) < entry.size_bytes:
                raise UnreachableError(f"{entry.path}: the download ended early")
        except UnreachableError as exc:
            failures = 0 if part_size(target) > offset else failures + 1
            if failures >= policy.attempts:
                raise UnreachableError(  # the link, not this file: the whole sync stops
                    f"{entry.path}: download kept failing at byte {part_size(target)} "
                    f"({policy.attempts} tries in a row brought no byte): {exc.message}",
                    hint="Completed files and the .part are kept; re-run `versa-run sync RUN`.",
                ) from exc
            log.info("%s: cut at byte %d; resuming", entry.path, part_size(target))
            time.sleep(policy.delay_s(failures))


__all__ = ["FetchPolicy", "check_room", "fetch", "free_bytes", "part_path", "part_size"]
