"""Code tree sync for remote targets: one reproducible, content-addressed archive per code state.

The job on a remote target imports `versa_kernels` from an uploaded copy of `kernels/` and runs
notebooks from `notebooks/`. Both travel as one tar.gz built the same way every time (sorted
members, zero mtimes and owners, normalized modes, gzip header without a timestamp), so its
sha256 names the code state. On the target it is unpacked into `<root>/versa_code/<hash>/`:

- an unchanged tree is not uploaded again: `versa_code/<hash>/versa_sync.json` exists only in a
  complete extraction, and its recorded sha256 must match (versa_spec §8.7);
- extraction (`target.fileops.extract_code`) refuses absolute names, `..`, links and devices, unpacks into a fresh sibling
  directory and renames it into place, so a reader never sees a half-written tree;
- outputs never live under `versa_code/` (the lesson of versa_spec §4.1: a re-sync deleted
  pruned checkpoints written inside the synced dir), and old trees are left alone.

The state file is `versa_sync.json`, not `.versa_sync.json`: jupyter_server refuses hidden names
over its contents and files APIs.
"""

from __future__ import annotations

import fnmatch
import gzip
import io
import json
import os
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from versa_runner.backends.base import Backend, ProgressFn, call_target
from versa_runner.errors import TransferError, UsageError
from versa_runner.fsutil import atomic_write_bytes, sha256_file
from versa_runner.target.layout import CODE_STATE_FILE as STATE_FILE

CODE_DIR = "versa_code"
INCOMING_DIR = f"{CODE_DIR}/incoming"
DEFAULT_TREES = ("kernels", "notebooks", "versa_runner")  # the playbook driver runs on the target
MAX_ARCHIVE_BYTES = 200 << 20  # versa_spec §8.7: refuse a compressed tree over 200 MiB
HASH_NAME_CHARS = 16
EXTRACT_TIMEOUT_S = 600.0

# Basenames (any depth) and path globs never shipped: VCS data, caches, environments, outputs,
# notebook checkpoints, secrets files, and our own transfer temporaries.
EXCLUDED_NAMES = (
    ".git", ".hg", ".svn", "__pycache__", ".ipynb_checkpoints", ".mypy_cache", ".pytest_cache",
    ".ruff_cache", ".venv", "venv", "build", "dist", "*.egg-info", "*.pyc", "*.pyo", ".env",
    ".env.*", "*.part", ".versa_runner", "artifacts", "reports", "logs", "checkpoints",
    ".DS_Store",
)  # fmt: skip
FILE_MODE = 0o644
DIR_MODE = 0o755
EXEC_MODE = 0o755


@dataclass(frozen=True)
class CodeArchive:
    """A built archive: where it is, what it hashes to, how much it holds."""

    path: Path
    sha256: str
    files: int
    size_bytes: int

    @property
    def name(self) -> str:
        """Directory name on the target: the first 16 hex of the sha256."""
        return self.sha256[:HASH_NAME_CHARS]


def is_excluded(relative: PurePosixPath) -> bool:
    """True when any component of `relative` matches an excluded basename pattern."""
    return any(fnmatch.fnmatch(part, pat) for part in relative.parts for pat in EXCLUDED_NAMES)


def collect_files(project_root: Path, trees: Sequence[str] = DEFAULT_TREES) -> list[PurePosixPath]:
    """Sorted relative paths of the regular files to ship (symlinks are never followed)."""
    found: list[PurePosixPath] = []
    for tree in trees:
        base = project_root / tree
        if not base.is_dir():
            raise UsageError(f"code tree {tree!r} not found under {project_root}")
        for dirpath, dirnames, filenames in os.walk(base):
            rel_dir = PurePosixPath(Path(dirpath).relative_to(project_root).as_posix())
            dirnames[:] = sorted(d for d in dirnames if not is_excluded(rel_dir / d))
            for name in filenames:
                rel = rel_dir / name
                full = Path(dirpath) / name
                if not is_excluded(rel) and full.is_file() and not full.is_symlink():
                    found.append(rel)
    return sorted(found)


def build_archive(
    project_root: Path, out_dir: Path, *, trees: Sequence[str] = DEFAULT_TREES
) -> CodeArchive:
    """Build the reproducible tar.gz of `trees`; the same files always give the same bytes."""
    files = collect_files(project_root, trees)
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for directory in sorted({p for f in files for p in f.parents if str(p) != "."}):
            tar.addfile(_tar_info(str(directory), tarfile.DIRTYPE, DIR_MODE, 0))
        for rel in files:
            full = project_root / rel
            mode = EXEC_MODE if os.access(full, os.X_OK) else FILE_MODE
            data = full.read_bytes()
            tar.addfile(_tar_info(str(rel), tarfile.REGTYPE, mode, len(data)), io.BytesIO(data))
    packed = io.BytesIO()
    # mtime=0 and no file name in the gzip header keep the archive byte-identical across builds.
    with gzip.GzipFile(filename="", mode="wb", fileobj=packed, mtime=0) as gz:
        gz.write(raw.getvalue())
    data = packed.getvalue()
    if len(data) > MAX_ARCHIVE_BYTES:
        raise UsageError(
            f"code archive is {len(data) / 2**20:.0f} MiB compressed (limit "
            f"{MAX_ARCHIVE_BYTES >> 20} MiB); large files under {', '.join(trees)}?",
            hint="Move data and checkpoints out of kernels/ and notebooks/.",
        )
    path = out_dir / "versa_code.tar.gz"
    atomic_write_bytes(path, data)
    return CodeArchive(path=path, sha256=sha256_file(path), files=len(files), size_bytes=len(data))


def stage_code(
    backend: Backend,
    project_root: Path,
    work_dir: Path,
    *,
    trees: Sequence[str] = DEFAULT_TREES,
    progress: ProgressFn | None = None,
    archive: CodeArchive | None = None,
) -> str:
    """Make the code tree present on the target; returns its absolute directory there.

    Skips the upload when the target already holds this exact archive's tree. `archive`: ship
    this one (a resumed run's own code) instead of building one from `project_root`.
    """
    archive = archive or build_archive(project_root, work_dir, trees=trees)
    code_dir = f"{CODE_DIR}/{archive.name}"
    absolute = str(PurePosixPath(backend.root()) / code_dir)
    if _synced_sha256(backend, code_dir) == archive.sha256:
        return absolute
    incoming = f"{INCOMING_DIR}/{archive.name}.tar.gz"
    backend.put_file(archive.path, incoming, progress=progress)
    args = {
        "root": backend.root(),
        "archive": incoming,
        "code_dir": code_dir,
        "sha256": archive.sha256,
        "files": archive.files,
    }
    reply = call_target(backend, "fileops.extract_code", args, timeout_s=EXTRACT_TIMEOUT_S)
    if reply.get("error"):
        raise TransferError(f"code archive refused on the target: {reply['error']}")
    return absolute


def code_pythonpath(code_dir: str) -> list[str]:
    """Entries the job's PYTHONPATH needs so `import versa_kernels` (and `versa_runner`, whose
    playbook driver runs on the target) find the synced copy."""
    return [f"{code_dir}/kernels", code_dir]


def _synced_sha256(backend: Backend, code_dir: str) -> str | None:
    raw = backend.read_bytes(f"{code_dir}/{STATE_FILE}")
    if not raw:
        return None
    try:
        return str(json.loads(raw).get("sha256") or "") or None
    except ValueError:
        return None


def _tar_info(name: str, kind: bytes, mode: int, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.size = kind, mode, size
    info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
    return info


__all__ = [
    "CODE_DIR",
    "CodeArchive",
    "EXCLUDED_NAMES",
    "build_archive",
    "code_pythonpath",
    "collect_files",
    "is_excluded",
    "stage_code",
]
