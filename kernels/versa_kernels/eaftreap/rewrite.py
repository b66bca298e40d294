"""Write a pruned gpt-oss checkpoint: byte-exact slices along the expert dimension.

Every router and expert tensor has experts on dim 0 (gptoss_reference §2.2), so pruning is an
``index_select(0, kept)`` on the stored bytes: MXFP4 blocks and scales, biases and router rows are
copied, never decoded or re-quantized. Kept experts are stored in ascending old-id order and
``expert_mapping.json`` maps old ids to new ones per layer. Everything else is copied unchanged.

Two layouts (the manifest records which):

- ``uniform``: every layer keeps the same count; ``num_local_experts`` = that count. Loads in
  vLLM, SGLang and stock transformers.
- ``per-layer``: layer l keeps n_l experts. gpt-oss runtimes need one count for every layer, so
  each layer is padded to ``P = max(n_l)`` (rounded up to ``pad_multiple_of``) with *masked dummy
  experts* after the real ones: zero weights and biases, zero router row and a router bias of
  ``DUMMY_ROUTER_BIAS``. A dummy's logit is then far below any real one, so top-k never picks it
  while a layer keeps at least top_k experts, and the padded model computes exactly the pruned
  one (gptoss_reference §1.10). ``config.json`` carries ``num_local_experts = P`` (what
  transformers/vLLM read) and ``num_local_experts_per_layer = [n_l]`` (what the project's forward
  reads: rows past n_l are padding).

Easy to get wrong: never write into the base directory; refuse a non-empty output unless
``overwrite``; keep ``num_experts_per_tok`` (top-k) unchanged; do not carry ``original/`` (the
unpruned reference weights would contradict the new config).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from versa_kernels.errors import CheckpointFormatError, ParameterError
from versa_kernels.gptoss.checkpoint import (
    DEFAULT_MAX_SHARD_BYTES,
    INDEX_FILE,
    Checkpoint,
    ShardedWriter,
    read_config_dict,
)
from versa_kernels.gptoss.config import CONFIG_FILE

log = logging.getLogger(__name__)

DUMMY_ROUTER_BIAS = -1.0e30  # finite (fits bf16) so fused softmax code never sees inf - inf
EXPERT_MAPPING_FILE = "expert_mapping.json"
NOT_COPIED_DIRS = ("original",)  # unpruned reference-format weights: stale after a prune
LAYER_MOE_MARKERS = (".mlp.router.", ".mlp.experts.")

__all__ = ["RewriteResult", "check_output_dir", "rewrite_checkpoint"]


@dataclass(frozen=True)
class RewriteResult:
    """Where the checkpoint went and what shape it has."""

    out_dir: Path
    layout: str
    keep_counts: list[int]
    stored_experts: int
    expert_mapping: dict[str, dict[str, int]]


def _layer_of(name: str) -> int | None:
    """Layer number of a router/expert tensor name, None for any other tensor."""
    if not name.startswith("model.layers.") or not any(m in name for m in LAYER_MOE_MARKERS):
        return None
    return int(name.split(".")[2])


def check_output_dir(base_dir: str | Path, out_dir: str | Path, *, overwrite: bool) -> None:
    """Refuse the base directory (or one inside it) and a non-empty directory without overwrite."""
    base, out = Path(base_dir).resolve(), Path(out_dir).resolve()
    if out == base or base in out.parents or out in base.parents:
        raise ParameterError(
            f"output directory {out} overlaps the base checkpoint {base}",
            hint="Write the pruned checkpoint to a separate directory.",
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ParameterError(
            f"output directory {out} exists and is not empty",
            hint="Pass --overwrite to replace it, or choose another output directory.",
        )


def _check_kept(
    kept: Sequence[Sequence[int]], experts_per_layer: Sequence[int], top_k: int
) -> None:
    if len(kept) != len(experts_per_layer):
        raise ParameterError(
            f"kept experts list {len(kept)} layers, the checkpoint has {len(experts_per_layer)}"
        )
    for layer, (ids, n_experts) in enumerate(zip(kept, experts_per_layer, strict=True)):
        ids = list(ids)
        if ids != sorted(set(ids)):
            raise ParameterError(f"layer {layer}: kept ids must be unique and ascending, got {ids}")
        if not ids or ids[0] < 0 or ids[-1] >= n_experts:
            raise ParameterError(f"layer {layer}: kept ids must lie in [0, {n_experts}), got {ids}")
        if len(ids) < top_k:
            raise ParameterError(
                f"layer {layer} keeps {len(ids)} experts, fewer than top_k={top_k}"
            )


def _dummy_rows(name: str, like: torch.Tensor, n: int) -> torch.Tensor:
    shape = (n, *like.shape[1:])
    if name.endswith(".mlp.router.bias"):
        return torch.full(shape, DUMMY_ROUTER_BIAS, dtype=like.dtype)
    return torch.zeros(shape, dtype=like.dtype)  # MXFP4 zero nibbles decode to 0 at any scale


def _copy_side_files(base: Path, dest: Path) -> list[str]:
    copied: list[str] = []
    for item in sorted(base.iterdir()):
        if item.name in (CONFIG_FILE, INDEX_FILE) or item.name.startswith("."):
            continue
        if item.is_file() and item.suffix != ".safetensors":
            shutil.copy2(item, dest / item.name)
            copied.append(item.name)
        elif item.is_dir() and item.name not in NOT_COPIED_DIRS:
            shutil.copytree(item, dest / item.name)
            copied.append(item.name + "/")
    return copied


def rewrite_checkpoint(
    base_dir: str | Path,
    out_dir: str | Path,
    kept: Sequence[Sequence[int]],
    *,
    layout: str,
    pad_multiple_of: int = 1,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    extra_files: Mapping[str, bytes] | None = None,
) -> RewriteResult:
    """Write ``base_dir`` with only the ``kept[layer]`` experts (ascending ids) to ``out_dir``.

    ``extra_files`` (name -> bytes, plain names) are written into the checkpoint before it is
    moved into place, so the checkpoint never exists without them (the build ships its
    ``reap-recipe.yaml`` and ``reap-scores.yaml`` this way).
    """
    for name in extra_files or {}:
        if Path(name).name != name or name in (CONFIG_FILE, INDEX_FILE, EXPERT_MAPPING_FILE):
            raise ValueError(f"extra_files: {name!r} must be a plain name not used by the rewrite")
    check_output_dir(base_dir, out_dir, overwrite=overwrite)
    base = Path(base_dir)
    ckpt = Checkpoint(base)
    config = ckpt.config
    _check_kept(kept, config.experts_per_layer, config.num_experts_per_tok)
    counts = [len(ids) for ids in kept]
    if layout == "uniform" and len(set(counts)) != 1:
        raise ParameterError(f"layout=uniform needs one count for every layer, got {counts}")
    stored = max(counts)
    if layout == "per-layer" and len(set(counts)) > 1 and pad_multiple_of > 1:
        stored = -(-stored // pad_multiple_of) * pad_multiple_of
    index = [torch.tensor(list(ids), dtype=torch.long) for ids in kept]
    out = Path(out_dir)
    with ShardedWriter(out, max_shard_bytes=max_shard_bytes, overwrite=True) as writer:
        for name in ckpt.names():
            tensor = ckpt.get(name)
            layer = _layer_of(name)
            if layer is not None:
                if tensor.shape[0] != config.num_experts(layer):
                    raise CheckpointFormatError(
                        f"{name} has {tensor.shape[0]} rows, config says "
                        f"{config.num_experts(layer)} experts in layer {layer}"
                    )
                tensor = tensor.index_select(0, index[layer])  # [n_l, ...] same bytes per row
                if stored > len(kept[layer]):
                    tensor = torch.cat([tensor, _dummy_rows(name, tensor, stored - counts[layer])])
            writer.add(name, tensor)
        cfg = read_config_dict(base)
        cfg["num_local_experts"] = stored
        cfg.pop("num_experts", None)  # an alias some tools write; the count lives in one key
        if len(set(counts)) > 1:
            cfg["num_local_experts_per_layer"] = counts
        else:
            cfg.pop("num_local_experts_per_layer", None)
        writer.write_json(CONFIG_FILE, cfg)
        mapping = {
            str(layer): {str(old): new for new, old in enumerate(ids)}
            for layer, ids in enumerate(kept)
        }
        writer.write_json(EXPERT_MAPPING_FILE, mapping)
        copied = _copy_side_files(base, writer.tmp_dir)
        for name, data in (extra_files or {}).items():
            (writer.tmp_dir / name).write_bytes(data)  # inside the temp dir: atomic with it
    log.info("pruned checkpoint written to %s (%s, copied %s)", out, layout, copied)
    return RewriteResult(out, layout, counts, stored, mapping)
