"""What a build depends on, as hashes: the base weights, a file, the code (issue 14 "Resume").

- ``weights_fingerprint``: size and sha256 of every file of a checkpoint that changes the model
  (``*.safetensors``, ``config.json``, the index). It is the profile's resume key: the earlier key
  covered the path, the config and the index only, so a router bias changed in place resumed a
  stale profile. Hashing 13 GB of gpt-oss-20b takes seconds to minutes, so digests are cached
  by absolute path and reused only while size, mtime (ns) and inode all still match.
- ``file_sha256``: streaming sha256 of one file (a ``reap-scores.yaml`` a re-cut names).
- ``code_version``: package version, ``git describe`` when the code is a git checkout, and a
  sha256 over the ``versa_kernels`` sources (the code sync to a target carries no ``.git``).

The cache is a JSON file (default: next to the profile state it protects) written atomically;
two builds racing on it can at worst lose each other's entries, never corrupt a digest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from versa_kernels.fsio import atomic_write_json

log = logging.getLogger(__name__)

HASH_CHUNK_BYTES = 8 * 1024 * 1024  # bounded memory whatever the shard size
CACHE_SCHEMA_VERSION = 1
WEIGHT_FILE_NAMES = ("config.json", "model.safetensors.index.json")
GIT_TIMEOUT_S = 5.0
PACKAGE_NAME = "versa-runner"

__all__ = [
    "WeightsFingerprint",
    "code_version",
    "file_sha256",
    "weights_fingerprint",
]


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 hex digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class WeightsFingerprint:
    """Per-file sizes and digests of a checkpoint, and one digest over all of them."""

    files: list[dict[str, Any]]
    """``{"name", "size", "sha256"}`` per file, sorted by name."""
    digest: str
    hashed_bytes: int = field(default=0, compare=False)
    """Bytes actually read this call (0 when every digest came from the cache)."""

    def record(self) -> dict[str, Any]:
        """JSON-ready form for manifests and recipes."""
        return {"digest": self.digest, "files": [dict(f) for f in self.files]}


def _stat_key(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _read_cache(path: Path | None) -> dict[str, Any]:
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # a damaged cache costs a re-hash, nothing more
        log.warning("ignoring unreadable sha256 cache %s (%s)", path, exc)
        return {}
    if not isinstance(data, dict) or data.get("schema_version") != CACHE_SCHEMA_VERSION:
        return {}
    entries = data.get("entries")
    return entries if isinstance(entries, dict) else {}


def weights_fingerprint(
    model_dir: str | os.PathLike[str], *, cache_path: str | os.PathLike[str] | None = None
) -> WeightsFingerprint:
    """Sizes and sha256 of the checkpoint's weight files, re-hashing only what changed."""
    root = Path(model_dir)
    names = sorted(
        {p.name for p in root.glob("*.safetensors") if p.is_file()}
        | {n for n in WEIGHT_FILE_NAMES if (root / n).is_file()}
    )
    cache_file = Path(cache_path) if cache_path is not None else None
    cache = _read_cache(cache_file)
    files, hashed, changed = [], 0, False
    for name in names:
        path = (root / name).resolve()
        st = path.stat()
        key = _stat_key(st)
        hit = cache.get(str(path))
        if isinstance(hit, dict) and hit.get("stat") == key and isinstance(hit.get("sha256"), str):
            sha = hit["sha256"]
        else:
            sha = file_sha256(path)
            hashed += st.st_size
            cache[str(path)] = {"stat": key, "sha256": sha}
            changed = True
        files.append({"name": name, "size": st.st_size, "sha256": sha})
    if changed and cache_file is not None:
        atomic_write_json(cache_file, {"schema_version": CACHE_SCHEMA_VERSION, "entries": cache})
    total = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    if hashed:
        log.info("hashed %.1f MB of weights in %s", hashed / 1e6, root)
    return WeightsFingerprint(files, total, hashed)


def _git_describe(where: Path) -> str | None:
    try:
        proc = subprocess.run(
            ["git", "-C", str(where), "describe", "--always", "--dirty", "--tags"],
            capture_output=True, text=True, timeout=GIT_TIMEOUT_S, check=False,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    out = proc.stdout.strip()
    return out if proc.returncode == 0 and out else None


def _sources_sha256(package_dir: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(package_dir.rglob("*.py")):
        rel = path.relative_to(package_dir).as_posix().encode()
        data = path.read_bytes()
        digest.update(len(rel).to_bytes(8, "big") + rel + len(data).to_bytes(8, "big") + data)
    return digest.hexdigest()


def code_version() -> dict[str, Any]:
    """Package version, ``git describe`` (None outside a git checkout), sources sha256."""
    from importlib.metadata import PackageNotFoundError, version

    import versa_kernels

    package_dir = Path(versa_kernels.__file__).resolve().parent
    try:
        pkg = version(PACKAGE_NAME)
    except PackageNotFoundError:
        pkg = None
    return {
        "package": PACKAGE_NAME,
        "package_version": pkg,
        "git_describe": _git_describe(package_dir),
        "versa_kernels_sources_sha256": _sources_sha256(package_dir),
    }
