"""What to run after a run or a verdict: each step of the playbook names the next one.

- a build (`build_pruned_*`) that succeeded: `eaft_single` on each pruned checkpoint it wrote
  (paths from the build's `manifest.json`), so its statistics can be compared with the base's;
- an `eaft_single` run that succeeded: `summarize` of the base's JSON (the newest other
  eaft_single JSON already here, else a placeholder) against the JSON it wrote;
- a FAIL verdict of `summarize`: the playbook's next deterministic levers (seed 000 §5), with
  the flags that pull them.

Paths come from the run's `written.json` on the target (what it wrote) and are relative to the
target root, which is where `sync` puts them under the output directory.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

from versa_runner.backends.base import Backend
from versa_runner.runs.journal import RunRecord
from versa_runner.target.layout import WRITTEN_FILE

BUILD_PREFIX = "build_pruned_"
BUILD_MANIFEST = "manifest.json"
EAFT_TASK = "eaft_single"
EAFT_DIR = "artifacts/eaft_models"
BASE_PLACEHOLDER = "BASE_EAFT.json"  # the base model's eaft_single JSON: the user knows which

# Seed 000 §5: when a build FAILS near-lossless-v1 at keep_frac 0.75 (top_k unchanged), the next
# deterministic levers (no finetune), in the playbook's order, each with the flag that pulls it.
FAIL_LEVERS = (
    "profile more: raise --num-rows, or add packs/domains with --calib-pack-files",
    "raise --min-keep-per-layer for the most sensitive layers (the budget keeps the total)",
    "grow the safety core: --core-pos-top-m 6 to 8, then rebuild and re-run eaft_single",
)


def written_paths(backend: Backend, record: RunRecord) -> list[str]:
    """Root-relative paths the run recorded as written (empty while it runs or if unrecorded)."""
    raw = backend.read_bytes(f"{record.run_dir}/{WRITTEN_FILE}")
    if not raw:
        return []
    try:
        return [str(path) for path in json.loads(raw).get("paths", [])]
    except (ValueError, AttributeError):
        return []


def after_success(
    backend: Backend, record: RunRecord, *, local_dir: Path | None = None
) -> list[str]:
    """The commands that follow a succeeded run of `record.task` (empty when none does).

    `local_dir` is where `sync` puts the run's files on this machine (the output directory):
    paths of files the next command reads here are given under it.
    """
    written = written_paths(backend, record)
    if record.task.startswith(BUILD_PREFIX):
        return _after_build(backend, record, written)
    if record.task == EAFT_TASK:
        jsons = [p for p in written if p.startswith(f"{EAFT_DIR}/") and p.endswith(".json")]
        base = _earlier_eaft_json(local_dir, exclude=jsons) or BASE_PLACEHOLDER
        here = [_local(path, local_dir) for path in jsons]
        return [summarize_command(base, path, record.run_id) for path in here]
    return []


def _earlier_eaft_json(local_dir: Path | None, *, exclude: list[str]) -> str | None:
    """The newest eaft_single JSON of another run already here: the playbook collects the
    base model first, so it is the base to compare the candidate with."""
    if local_dir is None:
        return None
    skip = {local_dir / path for path in exclude}
    found = [p for p in local_dir.glob(f"{EAFT_DIR}/*/*.json") if p not in skip and p.is_file()]
    if not found:
        return None
    newest = max(found, key=lambda p: p.stat().st_mtime)
    return _local(str(newest.relative_to(local_dir)), local_dir)


def summarize_command(left: str, right: str, run_id: str) -> str:
    """`versa-run summarize` comparing `left` (base) with `right` (candidate)."""
    out_md = f"reports/eaft_pair_{run_id}.md"
    return (f"versa-run summarize --left-json {shlex.quote(left)} --right-json "
            f"{shlex.quote(right)} --out-md {out_md}")  # fmt: skip


def _local(relative: str, local_dir: Path | None) -> str:
    """`relative` under `local_dir`, written relative to the cwd when it lies below it."""
    if local_dir is None:
        return relative
    path = local_dir / relative
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _after_build(backend: Backend, record: RunRecord, written: list[str]) -> list[str]:
    manifests = [p for p in written if p.rsplit("/", 1)[-1] == BUILD_MANIFEST]
    commands: list[str] = []
    for path in manifests:
        raw = backend.read_bytes(path)
        try:
            manifest: dict[str, Any] = json.loads(raw or b"{}")
        except ValueError:
            continue
        # The index maps each variant to its checkpoint dir; an older manifest held whole docs.
        variants = manifest.get("variants") or {manifest.get("variant_name", "pruned"): manifest}
        for name, variant in variants.items():
            out_dir = variant.get("out_dir") if isinstance(variant, dict) else variant
            if out_dir:
                command = (f"versa-run --task {EAFT_TASK} --model-id {shlex.quote(str(name))} "
                           f"--model-path {shlex.quote(str(out_dir))}")  # fmt: skip
                if command not in commands:  # the index and the variant's own manifest agree
                    commands.append(command)
    return commands


__all__ = ["FAIL_LEVERS", "after_success", "summarize_command", "written_paths"]
