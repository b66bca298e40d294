"""File operations the host runs on a target: manifests, code extraction, root discovery and
the small steps of a verified upload (standard library only; see `ops` for how they are called).
"""

from __future__ import annotations

import datetime as _dt
import fnmatch
import json
import os
import shutil
import tarfile
import uuid
from typing import Any

from . import files, layout

PART_SUFFIX = ".part"
KAGGLE_ROOT = "/kaggle/working"
MTIME_SLACK_S = 2.0  # coarse filesystem timestamps (FAT, some overlays) round down


def manifest(args: dict[str, Any]) -> dict[str, Any]:
    """Relative path, size, mtime and sha256 of the files a sync may bring back.

    `dirs` are walked (symlinks not followed, transfer temporaries skipped) and `files` added;
    with `run_dir`, only what that run wrote is kept from `dirs` (see `written_by`); then
    `include` / `exclude` globs (fnmatch on the root-relative path, `*` crosses `/`) and, unless
    `with_checkpoints`, the checkpoint shards are dropped, all before anything is hashed.

    Hashing is the slow part (a pruned checkpoint under artifacts/ is many GB), so a cache on
    the target (path -> size, mtime, sha256) rehashes only files whose size or mtime changed.
    """
    root = args["root"]
    cache_path = os.path.join(root, layout.MANIFEST_CACHE)
    try:
        with open(cache_path, encoding="utf-8") as fh:
            cache = json.load(fh)
    except (OSError, ValueError):
        cache = {}
    found = walk(root, args["dirs"])
    if args.get("run_dir"):
        found = written_by(root, args["run_dir"], found)
    wanted = [rel for rel in found + list(args["files"]) if _selected(rel, args)]
    entries: list[dict[str, Any]] = []
    for rel in wanted:
        entry = _entry(root, rel, cache)
        if entry is not None:
            cache[rel] = entry
            entries.append(entry)
    try:
        os.makedirs(os.path.dirname(cache_path), exist_ok=True)
        files.atomic_write_text(cache_path, json.dumps(cache))
    except OSError:
        pass  # the cache only saves time
    return {"entries": entries}


def _selected(rel: str, args: dict[str, Any]) -> bool:
    name = rel.rsplit("/", 1)[-1]
    if not args.get("with_checkpoints") and any(
        fnmatch.fnmatch(name, pattern) for pattern in layout.CHECKPOINT_GLOBS
    ):
        return False
    include, exclude = args.get("include") or [], args.get("exclude") or []
    if include and not any(fnmatch.fnmatch(rel, pattern) for pattern in include):
        return False
    return not any(fnmatch.fnmatch(rel, pattern) for pattern in exclude)


def written_by(root: str, run_dir: str, candidates: list[str]) -> list[str]:
    """Which of `candidates` the run in `run_dir` wrote.

    A finished run recorded them (`written.json`, by the launcher); for a running one, what was
    modified since it started (status.json `started_at`). A run that never started wrote
    nothing. Files another run rewrites later are no longer this run's.
    """
    try:
        with open(os.path.join(root, run_dir, layout.WRITTEN_FILE), encoding="utf-8") as fh:
            written = set(json.load(fh)["paths"])
        return [rel for rel in candidates if rel in written]
    except (OSError, ValueError, KeyError):
        pass
    try:
        with open(os.path.join(root, run_dir, layout.STATUS_FILE), encoding="utf-8") as fh:
            started = epoch(json.load(fh)["started_at"])
    except (OSError, ValueError, KeyError):
        return []
    return modified_since(root, candidates, started)


def modified_since(root: str, candidates: list[str], since: float) -> list[str]:
    """The candidates whose mtime is at or after `since` (less the filesystem's mtime slack)."""
    kept = []
    for rel in candidates:
        try:
            if os.stat(os.path.join(root, rel)).st_mtime >= since - MTIME_SLACK_S:
                kept.append(rel)
        except OSError:
            continue
    return kept


def epoch(stamp: str) -> float:
    """Unix time of an ISO-8601 stamp (naive stamps are UTC)."""
    parsed = _dt.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=_dt.timezone.utc)
    return parsed.timestamp()


def walk(root: str, dirs: list[str]) -> list[str]:
    """Root-relative paths of the regular files under `dirs` (no symlinked dirs, no temps)."""
    found = []
    for top in dirs:
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, top)):  # no dir symlinks
            dirnames.sort()
            for name in sorted(filenames):
                if name.endswith(PART_SUFFIX) or (name.startswith(".") and name.endswith(".tmp")):
                    continue
                found.append(
                    os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/")
                )
    return found


def _entry(root: str, rel: str, cache: dict[str, Any]) -> dict[str, Any] | None:
    full = os.path.join(root, rel)
    if os.path.islink(full) or not os.path.isfile(full):
        return None
    info = os.stat(full)
    known = cache.get(rel)
    if known and known["size_bytes"] == info.st_size and known["mtime"] == info.st_mtime:
        sha = known["sha256"]
    else:
        sha = files.sha256_of(full)
    return {"path": rel, "size_bytes": info.st_size, "mtime": info.st_mtime, "sha256": sha}


def extract_code(args: dict[str, Any]) -> dict[str, Any]:
    """Unpack an uploaded code archive into `code_dir`, all or nothing.

    Checks every member before writing anything, extracts into a fresh sibling, writes the
    state file last, then renames into place; an older complete copy of the same hash is moved
    aside and removed only after the new one is in place. The archive is deleted either way.
    """
    root = args["root"]
    archive = os.path.join(root, args["archive"])
    final = os.path.join(root, args["code_dir"])
    reply = {"error": ""}
    if files.sha256_of(archive) != args["sha256"]:
        reply["error"] = "archive sha256 mismatch"
    else:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            for member in members:
                parts = member.name.split("/")
                if (
                    member.name.startswith("/")
                    or ".." in parts
                    or not (member.isfile() or member.isdir())
                ):
                    reply["error"] = f"unsafe member {member.name!r}"
                    break
            if not reply["error"]:
                _swap_in(tar, members, final, {"sha256": args["sha256"], "files": args["files"]})
    os.unlink(archive)
    return reply


def _swap_in(tar: tarfile.TarFile, members: list[tarfile.TarInfo], final: str,
             state: dict[str, Any]) -> None:  # fmt: skip
    staging = f"{final}.new-{uuid.uuid4().hex[:8]}"
    os.makedirs(staging)
    if hasattr(tarfile, "data_filter"):
        tar.extractall(staging, members=members, filter="data")
    else:
        tar.extractall(staging, members=members)  # noqa: S202 (members checked above)
    files.atomic_write_text(os.path.join(staging, layout.CODE_STATE_FILE), json.dumps(state))
    old = None
    if os.path.exists(final):
        old = f"{final}.old-{uuid.uuid4().hex[:8]}"
        os.rename(final, old)
    os.rename(staging, final)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def find_root(args: dict[str, Any]) -> str | None:
    """The directory holding the probe file the contents API just wrote (the probe is removed).

    Looks in the cwd and its parents, then Kaggle's root: a reused notebook kernel may have
    changed directory.
    """
    probe = args["probe"]
    parts = os.getcwd().split(os.sep)
    candidates = [os.sep.join(parts[:i]) or os.sep for i in range(len(parts), 0, -1)]
    for candidate in [*candidates, KAGGLE_ROOT]:
        if os.path.isfile(os.path.join(candidate, probe)):
            os.unlink(os.path.join(candidate, probe))
            return candidate
    return None


def sha256(args: dict[str, Any]) -> str:
    """Hex sha256 of `root/path` (an absolute `path` is used as is)."""
    return files.sha256_of(os.path.join(args["root"], args["path"]))


def create_private(args: dict[str, Any]) -> bool:
    """Create (or truncate) `root/path` with `mode` before any byte arrives (secrets)."""
    path = os.path.join(args["root"], args["path"])
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, args["mode"]))
    os.chmod(path, args["mode"])
    return True


def replace(args: dict[str, Any]) -> bool:
    """`os.replace(root/source, root/dest)` (overwrites, unlike a contents-API rename)."""
    os.replace(os.path.join(args["root"], args["source"]), os.path.join(args["root"], args["dest"]))
    return True


def remove(args: dict[str, Any]) -> bool:
    """Delete `root/path` if it exists (a kernel unlink never goes to the server's trash)."""
    path = os.path.join(args["root"], args["path"])
    if os.path.exists(path):
        os.unlink(path)
    return True
