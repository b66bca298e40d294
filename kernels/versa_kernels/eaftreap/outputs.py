"""The files a pruning build leaves for people and for machines (eaftreap_spec §5.4, §9).

In each variant's artifacts folder (``variant_index`` draws the whole layout):

- ``scores.parquet``: one row per (layer, expert) with every accumulator and REAP's per-hit means.
- ``reap-scores.yaml`` (kind ``reap_scores``, ``reap_scores.py``): ranking and every sum per
  expert, enough to re-cut any keep count without re-profiling.
- ``reap-recipe.yaml`` (kind ``reap_recipe``, ``recipe.py``): how the model was made, so the
  build can be repeated. Both YAMLs also ship inside the pruned checkpoint.
- ``keep_counts_by_layer.json``, ``core_experts_by_layer.json``, ``keep_experts_by_layer.json``.
- ``manifest.json`` with ``out_dir`` (the pruned checkpoint) and the layout written.

Plots (keep counts and score mass per layer) go to ``reports/`` as PNG and are shown inline by
the notebook. Every JSON/YAML carries ``schema_version`` and is written atomically.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from versa_kernels.fsio import atomic_write_bytes, atomic_write_json, atomic_write_text

SCORES_PARQUET = "scores.parquet"
REAP_SCORES_YAML = "reap-scores.yaml"
REAP_RECIPE_YAML = "reap-recipe.yaml"
MANIFEST_JSON = "manifest.json"
KEEP_COUNTS_JSON = "keep_counts_by_layer.json"
CORE_EXPERTS_JSON = "core_experts_by_layer.json"
KEEP_EXPERTS_JSON = "keep_experts_by_layer.json"
PROFILE_META_JSON = "profile_meta.json"

__all__ = [
    "CORE_EXPERTS_JSON",
    "KEEP_COUNTS_JSON",
    "KEEP_EXPERTS_JSON",
    "MANIFEST_JSON",
    "PROFILE_META_JSON",
    "REAP_RECIPE_YAML",
    "REAP_SCORES_YAML",
    "SCORES_PARQUET",
    "plot_allocation",
    "write_json",
    "write_scores_parquet",
    "write_yaml",
    "yaml_text",
]


def write_json(path: Path, obj: Any) -> None:
    """Atomic JSON (indent 2, sorted keys)."""
    atomic_write_json(path, obj)


def _yaml(obj: Any) -> str:
    import yaml

    return yaml.safe_dump(obj, sort_keys=False, default_flow_style=None, width=100)


def write_scores_parquet(path: Path, rows: list[dict[str, float | int]]) -> None:
    """One row per (layer, expert), zstd-compressed parquet, written atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf, compression="zstd")
    atomic_write_bytes(path, buf.getvalue())


def yaml_text(obj: Any) -> str:
    """The YAML text every build file uses (key order kept; floats round-trip exactly)."""
    return _yaml(obj)


def write_yaml(path: Path, obj: Any) -> None:
    """Atomic YAML."""
    atomic_write_text(path, _yaml(obj))


def plot_allocation(
    path: Path,
    *,
    keep_counts: Sequence[int],
    num_experts: int,
    mass_share_kept: Sequence[float],
    neff: Sequence[float],
    title: str,
) -> Any:
    """Two panels: kept experts per layer (with neff) and the share of score mass kept."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    layers = np.arange(len(keep_counts))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    ax1.bar(layers, keep_counts, color="tab:blue", label="kept experts")
    ax1.plot(layers, neff, "o-", color="tab:orange", label="neff (score spread)")
    ax1.axhline(num_experts, color="grey", linestyle="--", linewidth=1, label="experts in base")
    ax1.set_xlabel("layer")
    ax1.set_ylabel("experts")
    ax1.set_title("keep count per layer")
    ax1.legend(fontsize=8)
    ax2.bar(layers, mass_share_kept, color="tab:green")
    ax2.set_ylim(0, 1.05)
    ax2.set_xlabel("layer")
    ax2.set_ylabel("share of layer score mass kept")
    ax2.set_title("score mass kept per layer")
    for ax in (ax1, ax2):  # whole layer numbers, about a dozen ticks at most (36 layers: every 3rd)
        ax.set_xticks(layers[:: max(1, len(layers) // 12)])
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())
    return fig
