"""Parity of a pruned model against its base, on the host CPU (no torch): `summarize` (pair
summary of two `eaft_single` runs, and the `versa-run summarize` command), `report` (markdown
and plots) and `gates` (the versioned gate, `near_lossless_gates.json`).

Nothing is imported here; `from versa_runner.parity.summarize import compare_runs` and so on.
"""

from __future__ import annotations
