"""What to run after a run or a verdict: each step of the playbook names the next one.

- a build (`build_pruned_*`) that succeeded: `eaft_single` on each pruned checkpoint it wrote
  (paths from the build's `manifest.json`), so its statistics can be compared with the base's;
- an `eaft_single` run that succeeded: `summarize` of the base's JSON against the JSON it wrote;
- a FAIL verdict of `summarize`: the playbook's next deterministic levers (seed 000 §5), with
  the flags that pull them.

Paths come from the run's `written.json` on the target (what it wrote) and are relative to the
target root, which is where `sync` puts them under the output directory.
"""

from __future__ import annotations

import json
import shlex
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


def after_success(backend: Backend, record: RunRecord) -> list[str]:
    """The commands that follow a succeeded run of `record.task` (empty when none does)."""
    written = written_paths(backend, record)
    if record.task.startswith(BUILD_PREFIX):
        return _after_build(backend, record, written)
    if record.task == EAFT_TASK:
        jsons = [p for p in written if p.startswith(f"{EAFT_DIR}/") and p.endswith(".json")]
        return [summarize_command(BASE_PLACEHOLDER, path, record.run_id) for path in jsons]
    return []


def summarize_command(left: str, right: str, run_id: str) -> str:
    """`versa-run summarize` comparing `left` (base) with `right` (candidate)."""
    out_md = f"reports/eaft_pair_{run_id}.md"
    return (f"versa-run summarize --left-json {shlex.quote(left)} --right-json "
            f"{shlex.quote(right)} --out-md {out_md}")  # fmt: skip


def _after_build(backend: Backend, record: RunRecord, written: list[str]) -> list[str]:
    manifests = [p for p in written if p.rsplit("/", 1)[-1] == BUILD_MANIFEST]
    commands: list[str] = []
    for path in manifests:
        raw = backend.read_bytes(path)
        try:
            manifest: dict[str, Any] = json.loads(raw or b"{}")
        except ValueError:
            continue
        variants = manifest.get("variants") or {manifest.get("variant_name", "pruned"): manifest}
        for name, variant in variants.items():
            # the variant index maps a name to its out_dir; older manifests held a record
            out_dir = variant.get("out_dir") if isinstance(variant, dict) else variant
            if out_dir:
                commands.append(
                    f"versa-run --task {EAFT_TASK} --model-id {shlex.quote(str(name))} "
                    f"--model-path {shlex.quote(str(out_dir))}"
                )
    return commands


__all__ = ["FAIL_LEVERS", "after_success", "summarize_command", "written_paths"]
