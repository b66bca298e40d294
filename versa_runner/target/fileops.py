"""File operations the host runs on a target: manifests, code extraction, root discovery and
the small steps of a verified upload (standard library only; see `ops` for how they are called).
"""

from __future__ import annotations

import base64
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
MTIME_SLACK_S = 0.1  # file times come from a coarse kernel clock, a few ms behind time.time()


def manifest(args: dict[str, Any]) -> dict[str, Any]:
    """Relative path, size, mtime and sha256 of the files a sync may bring back.

    `dirs` are walked (symlinks not followed, transfer temporaries skipped) and `files` added;
    with `run_dir`, only what that run wrote is kept from `dirs` (see `written_by`); then
    `include` / `exclude` globs (fnmatch on the root-relative path, `*` crosses `/`) and, unless
    `with_checkpoints`, the checkpoint shards are dropped, all before anything is hashed.

    Hashing is the slow part (a pruned checkpoint under artifacts/ is many GB), so a cache on
    the target keeps each file's sha256 with its size, mtime, inode and ctime and rehashes
    unless all four match (ctime moves on every write or `utime`, so a same-size rewrite with
    its mtime put back is hashed again). Symlinks are not followed; one that leads out of the
    root, and a name that is not UTF-8, is listed under `refused` with its reason. Transfer
    temporaries are skipped.
    """
    root = args["root"]
    cache_path = os.path.join(root, layout.MANIFEST_CACHE)
    try:
        with open(cache_path, encoding="utf-8") as fh:
            cache = json.load(fh)
    except (OSError, ValueError):
        cache = {}
    entries: list[dict[str, Any]] = []
    refused: list[dict[str, str]] = []
    found = walk(root, args["dirs"], refused)
    if args.get("run_dir"):
        found = written_by(root, args["run_dir"], found)
    extra = [f for f in args["files"] if f not in found]
    wanted = [rel for rel in found + extra if _selected(rel, args)]
    for rel in wanted:
        if _refuse_link(root, rel, refused) or _refuse_name(rel, refused):
            continue
        entry = _entry(root, rel, cache)
        if entry is not None:
            entries.append(entry)
    try:
        os.makedirs(os.path.dirname(cache_path), exist_ok=True)
        files.atomic_write_text(cache_path, json.dumps(cache))
    except OSError:
        pass  # the cache only saves time
    return {"entries": entries, "refused": refused}


def _selected(rel: str, args: dict[str, Any]) -> bool:
    name = rel.rsplit("/", 1)[-1]
    resumable = any(fnmatch.fnmatch(rel, pattern) for pattern in layout.RESUME_STATE_GLOBS)
    if (
        not args.get("with_checkpoints")
        and not resumable
        and any(fnmatch.fnmatch(name, pattern) for pattern in layout.CHECKPOINT_GLOBS)
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


def walk(root: str, dirs: list[str], refused: list[dict[str, str]] | None = None) -> list[str]:
    """Root-relative paths of the regular files under `dirs` (no symlinked dirs, no temps);
    symlinks leading out of the root are added to `refused` when given."""
    refused = [] if refused is None else refused
    found = []
    for top in dirs:
        if _refuse_link(root, top, refused):
            continue
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, top)):  # no dir symlinks
            dirnames.sort()
            for name in dirnames:  # listed, never entered: only report those leaving the root
                _refuse_link(root, _rel(root, dirpath, name), refused)
            for name in sorted(filenames):
                if name.endswith(PART_SUFFIX) or (name.startswith(".") and name.endswith(".tmp")):
                    continue
                found.append(_rel(root, dirpath, name))
    return found


def _rel(root: str, dirpath: str, name: str) -> str:
    return os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/")


def _refuse_link(root: str, rel: str, refused: list[dict[str, str]]) -> bool:
    """True (and a refusal) when `rel` is a symlink resolving outside the root."""
    full = os.path.join(root, rel)
    if not os.path.islink(full):
        return False
    real_root = os.path.realpath(root)
    points_to = os.path.realpath(full)
    if os.path.commonpath([real_root, points_to]) != real_root:
        refused.append({"path": rel, "reason": f"a symlink to {points_to}, outside the target "
                        "root: not followed"})  # fmt: skip
        return True
    return False


def _refuse_name(rel: str, refused: list[dict[str, str]]) -> bool:
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        shown = rel.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        refused.append({"path": shown, "reason": "the name is not valid UTF-8"})
        return True
    return False


def _entry(root: str, rel: str, cache: dict[str, Any]) -> dict[str, Any] | None:
    full = os.path.join(root, rel)
    if os.path.islink(full) or not os.path.isfile(full):
        return None
    info = os.stat(full)
    key = [info.st_size, info.st_mtime_ns, info.st_ino, info.st_ctime_ns]
    known = cache.get(rel)
    if isinstance(known, dict) and known.get("key") == key and known.get("sha256"):
        sha = known["sha256"]
    else:
        sha = files.sha256_of(full)
    cache[rel] = {"key": key, "sha256": sha}
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


def read_chunk(args: dict[str, Any]) -> dict[str, Any]:
    """Base64 of at most `length` bytes of `root/path` from `offset` (for names the file APIs
    refuse, such as hidden ones on jupyter_server); `missing` when there is no such file."""
    path = os.path.join(args["root"], args["path"])
    try:
        with open(path, "rb") as fh:
            fh.seek(args["offset"])
            data = fh.read(args["length"])
    except FileNotFoundError:
        return {"missing": True, "data": ""}
    return {"missing": False, "data": base64.b64encode(data).decode("ascii")}


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
