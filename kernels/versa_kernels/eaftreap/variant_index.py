"""The artifacts folder of a pruning task: one folder per variant, one index naming them all.

Layout (``art`` = e.g. ``artifacts/20b_pruned_models_eaftreap_budgeted``)::

    art/manifest.json             the index (kind build_index), see below
    art/profile_state.pt          resumable profile (shared: it does not depend on keep_frac)
    art/weights_sha256_cache.json digests of base weight files (fingerprint.py)
    art/<variant>/                one folder per variant, never written by another variant:
        manifest.json             the variant's manifest (kind build_variant)
        reap-recipe.yaml          how to rebuild it;  reap-scores.yaml  its scores
        scores.parquet, profile_meta.json, keep_counts_by_layer.json,
        core_experts_by_layer.json, keep_experts_by_layer.json
        checkpoint/               the pruned checkpoint unless ``out_dir`` is given
    art/scores.parquet, art/keep_*.json, ... copies of the *primary* build's files (below)

The index's ``variants`` maps every variant ever built here to its checkpoint directory (the
shape eaftreap_spec §9.3's ``model_path_from_manifest: {field: variants.<name>}`` reads), and
``variant_records`` adds where each one's artifacts are and how it was made.

Back-compatible top level (the README's and the playbook's
``json.load(open(".../manifest.json"))["out_dir"]``): ``out_dir`` and the other fields of the
old single-build manifest describe the **primary** build: the latest build that profiled the
model. A re-cut (``from_scores``, or a build that found a finished profile state and ran no
forward) is added to ``variants`` but never moves ``out_dir``, unless the index has no primary
yet. So re-cutting 0.50 after the 0.75 build no longer turns ``out_dir`` into the 0.50 variant.

Two builds may finish at once: the index is read, merged and replaced under an exclusive
``flock`` on ``art/.manifest.lock``, and every file is written atomically; the lock makes
concurrent updates merge, the rename keeps readers from ever seeing half a file.
"""

from __future__ import annotations

import fcntl
import json
import logging
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from versa_kernels.fsio import atomic_write_json

log = logging.getLogger(__name__)

INDEX_SCHEMA_VERSION = 2  # 1: the single-build manifest.json (every field of it is kept)
MANIFEST_JSON = "manifest.json"
LOCK_FILE = ".manifest.lock"
CHECKPOINT_SUBDIR = "checkpoint"

__all__ = [
    "CHECKPOINT_SUBDIR",
    "INDEX_SCHEMA_VERSION",
    "register_build",
    "variant_dir",
]


def variant_dir(art: Path, name: str) -> Path:
    """The variant's own artifacts folder."""
    return art / name


@contextmanager
def _locked(art: Path) -> Iterator[None]:
    art.mkdir(parents=True, exist_ok=True)
    with open(art / LOCK_FILE, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)  # released when the file closes
        yield


def _read_index(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        log.warning("manifest %s is unreadable (%s); starting a new index", path, exc)
        return {}
    if not isinstance(data, dict):
        return {}
    if data.get("schema_version") == 1:
        data = _upgrade_v1(data)
    return data


def _upgrade_v1(old: dict[str, Any]) -> dict[str, Any]:
    """A schema 1 manifest described one build; its variants become index entries."""
    log.info("manifest.json schema 1: filling variants/variant_records from its own build")
    variants = old.get("variants") or {}
    records = {  # our schema 1: name -> variant doc; the predecessor's: name -> out_dir
        name: {
            "out_dir": v.get("out_dir") if isinstance(v, dict) else str(v),
            "artifacts_dir": None,
            "primary": True,
        }
        for name, v in variants.items()
    }
    return {
        **old,
        "variants": {n: r["out_dir"] for n, r in records.items()},
        "variant_records": records,
        "primary_variant": old.get("variant_name"),
    }


def _copy_primary_files(art: Path, files: Mapping[str, Path | Any]) -> None:
    """Top-level copies of the primary build's side files (atomic per file)."""
    for name, src in files.items():
        if isinstance(src, Path):
            tmp = art / f".{name}.primary.tmp"
            shutil.copyfile(src, tmp)
            tmp.replace(art / name)
        else:
            atomic_write_json(art / name, src)


def register_build(
    art: Path,
    *,
    records: Mapping[str, dict[str, Any]],
    primary: bool,
    build_manifest: Mapping[str, Any],
    primary_files: Mapping[str, Path | Any],
) -> dict[str, Any]:
    """Add this build's variants to the index; returns the index as written.

    ``records``: per variant ``{"out_dir", "artifacts_dir", ...}``. ``build_manifest``: the
    single-build fields that become the top level when this build is (or must become) primary.
    ``primary_files``: top-level name -> variant file to copy, or a JSON-ready object.
    """
    path = art / MANIFEST_JSON
    with _locked(art):
        index = _read_index(path)
        has_primary = bool(index.get("primary_variant"))
        becomes_primary = primary or not has_primary
        all_records = dict(index.get("variant_records") or {})
        for name, rec in records.items():
            all_records[name] = {**rec, "primary": becomes_primary}
        if becomes_primary:
            for name, rec in all_records.items():  # one primary build at a time
                rec["primary"] = name in records
            _copy_primary_files(art, primary_files)
            index = {k: v for k, v in index.items() if k in ("variants", "variant_records")}
            index.update(build_manifest)
            index["primary_variant"] = build_manifest["variant_name"]
        index["schema_version"] = INDEX_SCHEMA_VERSION
        index["kind"] = "build_index"
        index["variant_records"] = all_records
        index["variants"] = {name: rec["out_dir"] for name, rec in sorted(all_records.items())}
        atomic_write_json(path, index)
    return index
