"""EAFT single-model collector: fixed blocks, per-token p / top-20 entropy, streaming stats.

`collect(**params)` is the entry point of notebooks/eaft_single.ipynb; see `collector` for the
flow, `blocks` for how blocks are packed, `stats` for what is accumulated.
"""

from __future__ import annotations

from versa_kernels.eaft.blocks import UNION_PACK, Blocks, TokenCache, pack_blocks, union_rows
from versa_kernels.eaft.collector import (
    collect,
    collect_blocks,
    json_name,
    read_pack_texts,
    run_blocks,
)
from versa_kernels.eaft.stats import HistogramSpec, SignalStats

__all__ = [
    "UNION_PACK",
    "Blocks",
    "HistogramSpec",
    "SignalStats",
    "TokenCache",
    "collect",
    "collect_blocks",
    "json_name",
    "pack_blocks",
    "read_pack_texts",
    "run_blocks",
    "union_rows",
]
