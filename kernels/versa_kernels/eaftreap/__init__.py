"""EAFT-REAP expert pruning for gpt-oss: profile, allocate, rewrite, report.

Modules (imported on use; importing this package loads nothing heavy):

- ``profile``: two-pass, resumable profiling through the project's forward (no hooks).
- ``scoring``: per-(layer, expert) accumulators, EAFT class weights, ranking keys.
- ``allocation``: per-layer budget by score spread, safety core, infeasibility checks.
- ``rewrite``: byte-exact expert slicing into a new checkpoint (uniform or padded per-layer).
- ``evaluate``: completion-only PPL of EAFT-REAP vs frequency vs random pruning.
- ``build``: ``build_pruned``, the whole build the ``build_pruned`` notebook runs.
- ``outputs``, ``manifest``, ``report``: the files a build leaves behind.
"""

from __future__ import annotations

__all__ = [
    "allocation",
    "build",
    "evaluate",
    "manifest",
    "outputs",
    "profile",
    "report",
    "rewrite",
    "scoring",
]
