"""Names a sync may write: each manifest entry is checked alone, kept or refused with a reason.

The manifest comes from the target, so nothing in it is trusted: an entry must be a well-formed
record (path, size, mtime, 64-hex sha256) whose path is relative, free of `..`, `.`, empty parts,
backslashes and NUL, valid UTF-8, short enough that `<name>.part` fits the local filesystem's
name limit, and not routed through a local symlink out of the destination. One bad entry never
stops the others: it becomes a `Refusal`, one line naming the path and why.

Names that merely start with dots (`..hidden`, `.config`) are ordinary names and are kept.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from versa_runner.errors import UnsafePathError

PART_SUFFIX = ".part"
DEFAULT_NAME_MAX = 255  # bytes per path component on ext4, xfs, tmpfs, APFS
PATH_MAX = 4096
SHOWN_NAME_CHARS = 120
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class ManifestEntry:
    """One file on the target, relative to its root."""

    path: str
    size_bytes: int
    mtime: float
    sha256: str


@dataclass(frozen=True)
class Refusal:
    """A name that was not synced, and why (one line)."""

    path: str
    reason: str

    def line(self) -> str:
        """`refused <path>: <reason>` with the path escaped and shortened."""
        return f"refused {shown(self.path)}: {self.reason}"


def shown(path: object) -> str:
    """A remote-supplied name made printable on one line: escapes, at most 120 characters."""
    text = path if isinstance(path, str) else repr(path)
    text = text.encode("unicode_escape", errors="backslashreplace").decode("ascii")
    return text if len(text) <= SHOWN_NAME_CHARS else text[: SHOWN_NAME_CHARS - 1] + "…"


def parse_entry(raw: Any) -> ManifestEntry:
    """A manifest record as an entry; ValueError (the reason) when it is malformed."""
    if not isinstance(raw, dict):
        raise ValueError(f"malformed manifest entry: expected an object, got {type(raw).__name__}")
    path, size, mtime, sha = (raw.get(k) for k in ("path", "size_bytes", "mtime", "sha256"))
    if not isinstance(path, str):
        raise ValueError("malformed manifest entry: no path string")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ValueError(f"malformed manifest entry: size_bytes {size!r} is not a byte count")
    if not isinstance(mtime, int | float) or isinstance(mtime, bool):
        raise ValueError(f"malformed manifest entry: mtime {mtime!r} is not a number")
    if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
        raise ValueError("malformed manifest entry: sha256 is not 64 lowercase hex digits")
    return ManifestEntry(path=path, size_bytes=size, mtime=float(mtime), sha256=sha)


def name_max(dest_root: Path) -> int:
    """Longest file name (bytes) the filesystem under `dest_root` accepts."""
    probe = dest_root
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return int(os.pathconf(probe, "PC_NAME_MAX"))
    except (OSError, ValueError):
        return DEFAULT_NAME_MAX


def check_name(relative: str, *, limit: int = DEFAULT_NAME_MAX) -> None:
    """Refuse (UnsafePathError, the reason) a name that cannot be written safely under a root."""
    if "\x00" in relative:
        raise UnsafePathError("the name contains a NUL byte")
    try:
        encoded = relative.encode("utf-8")
    except UnicodeEncodeError:
        raise UnsafePathError("the name is not valid UTF-8") from None
    pure = PurePosixPath(relative)
    if not relative or pure.is_absolute() or relative.startswith(("\\", "/")):
        raise UnsafePathError("an absolute path")
    if ":" in pure.parts[0] or "\\" in relative:
        raise UnsafePathError("a drive letter or backslash in the path")
    if any(part in ("..", ".", "") for part in relative.split("/")):
        raise UnsafePathError("the path contains '..', '.' or an empty part")
    longest = max(len(part.encode("utf-8")) for part in relative.split("/"))
    if longest + len(PART_SUFFIX) > limit:
        raise UnsafePathError(
            f"a name part is {longest} bytes; this filesystem allows {limit - len(PART_SUFFIX)} "
            f"(its limit {limit} less the {PART_SUFFIX} suffix)"
        )
    if len(encoded) > PATH_MAX // 2:
        raise UnsafePathError(f"the path is {len(encoded)} bytes long (limit {PATH_MAX // 2})")


def safe_destination(dest_root: Path, relative: str, *, limit: int = DEFAULT_NAME_MAX) -> Path:
    """Where a remote-supplied relative path lands under `dest_root`; refuses escapes.

    Raises UnsafePathError (see `check_name`), or when an existing part of the path is a
    symlink resolving outside `dest_root`.
    """
    check_name(relative, limit=limit)
    root = dest_root.resolve()
    candidate = root.joinpath(*PurePosixPath(relative).parts)
    if candidate.is_symlink() or not candidate.parent.resolve().is_relative_to(root):
        raise UnsafePathError(f"a local symlink leads outside {root}")
    return candidate


def accept(
    raw_entries: list[Any], dest_root: Path
) -> tuple[list[tuple[ManifestEntry, Path]], list[Refusal]]:
    """Split a manifest into (entry, local path) pairs to sync and refusals, one per bad entry."""
    limit = name_max(dest_root)
    kept: list[tuple[ManifestEntry, Path]] = []
    refused: list[Refusal] = []
    seen: set[str] = set()
    for index, raw in enumerate(raw_entries):
        name = raw.get("path") if isinstance(raw, dict) else None
        label = name if isinstance(name, str) else f"<manifest entry #{index}>"
        try:
            entry = parse_entry(raw)
            if entry.path in seen:
                raise ValueError("listed twice in the manifest")
            kept.append((entry, safe_destination(dest_root, entry.path, limit=limit)))
            seen.add(entry.path)
        except (ValueError, UnsafePathError) as exc:
            refused.append(Refusal(label, str(exc)))
    return kept, refused


__all__ = [
    "ManifestEntry",
    "PART_SUFFIX",
    "Refusal",
    "accept",
    "check_name",
    "name_max",
    "parse_entry",
    "safe_destination",
    "shown",
]
