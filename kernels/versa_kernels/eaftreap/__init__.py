"""EAFT-REAP expert pruning for gpt-oss: profile, allocate, rewrite, report.

Modules (imported on use; importing this package loads nothing heavy):

- ``profile``: two-pass, resumable profiling through the project's forward (no hooks).
- ``scoring``: per-(layer, expert) accumulators, EAFT class weights, ranking keys.
- ``allocation``: per-layer budget by score spread, safety core, infeasibility checks.
- ``rewrite``: byte-exact expert slicing into a new checkpoint (uniform or padded per-layer).
- ``evaluate``: completion-only PPL of EAFT-REAP vs frequency vs random pruning.
- ``build``: ``build_pruned``, the whole build the ``build_pruned`` notebook runs.
- ``checks``: every parameter and output-folder check made before any work.
- ``calibration``: the build's calibration rows (sampled, sha256-checked, tokenized), baselines.
- ``recut``: cut variants from scores (a profile's, or a ``reap-scores.yaml`` with no forward).
- ``reap_scores``, ``recipe``: the two YAMLs every pruned checkpoint ships; build from a recipe.
- ``fingerprint``: sha256 of base weights (cached), files and code: resume key, reproducibility.
- ``variant_index``: one artifacts folder per variant and the index manifest naming them all.
- ``outputs``, ``manifest``, ``report``: the files a build leaves behind.
"""

from __future__ import annotations

__all__ = [
    "allocation",
    "build",
    "calibration",
    "checks",
    "evaluate",
    "fingerprint",
    "manifest",
    "outputs",
    "profile",
    "reap_scores",
    "recipe",
    "recut",
    "report",
    "rewrite",
    "scoring",
    "variant_index",
]
