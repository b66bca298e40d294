"""Building a `GptOssModel` from a checkpoint, a tensor dict or a transformers state dict.

`load_checkpoint` reads an HF-layout gpt-oss checkpoint through `Checkpoint`, one tensor at a
time, straight onto the target device, and keeps the experts either

- in MXFP4 (`expert_format="mxfp4"`, the default on CUDA for MXFP4 checkpoints): the
  `*_blocks` / `*_scales` bytes are copied to the GPU as they are (no decode at load; the 20b
  needs 12 GiB of expert memory instead of 38 GiB), and each forward decodes one layer at a time
  (`experts.Mxfp4Experts`); or
- dense (`"dense"`, the default on CPU): decoded once at load, on the target device, in `dtype`.

Pruning at load (`experts_keep`) and per-layer pruned checkpoints (padded rows) slice dim 0 of
every router and expert tensor, which is byte-exact for MXFP4 (gptoss_reference.md §2).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from versa_kernels.errors import CheckpointFormatError, ParameterError
from versa_kernels.gptoss.config import GptOssConfig
from versa_kernels.gptoss.experts import EXPERT_FORMATS, MXFP4_CHECKPOINT_NAMES

if TYPE_CHECKING:
    from versa_kernels.gptoss.model import GptOssModel

MAX_LISTED_NAMES = 5
"""How many missing/unexpected tensor names a load error lists."""

LOAD_THREADS = 8
"""Tensors read at once while loading."""

MOE_MARKERS = (".mlp.router.", ".mlp.experts.")
"""Tensors with experts on dim 0 (sliced by pruning)."""

__all__ = ["from_hf_state_dict", "from_tensors", "load_checkpoint", "resolve_expert_format"]


def resolve_expert_format(expert_format: str, *, is_mxfp4: bool, device: torch.device) -> bool:
    """True when experts stay in MXFP4; refuses unknown formats and MXFP4 from a bf16 file."""
    if expert_format not in EXPERT_FORMATS:
        raise ParameterError(
            f"expert_format={expert_format!r} is not allowed; expected one of {', '.join(EXPERT_FORMATS)}"
        )
    if expert_format == "mxfp4" and not is_mxfp4:
        raise ParameterError(
            "expert_format='mxfp4' needs an MXFP4 checkpoint; this one stores bf16 experts "
            "(use 'dense' or 'auto')"
        )
    if expert_format == "auto":
        return is_mxfp4 and device.type == "cuda"
    return expert_format == "mxfp4"


def load_checkpoint(
    cls: type[GptOssModel],
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    top_k: int | None = None,
    experts_keep: Sequence[Sequence[int]] | None = None,
    expert_format: str = "auto",
) -> GptOssModel:
    """Load an HF-layout MXFP4 (or bf16) gpt-oss checkpoint through `Checkpoint`.

    `experts_keep[layer]` lists the expert ids to keep in that layer (physical pruning at
    load); `top_k` overrides `num_experts_per_tok`. Tensors go to `device` one at a time; dense
    experts are decoded layer by layer on `device`, so host memory peaks near one tensor.
    """
    from versa_kernels.gptoss.checkpoint import EXPERT_PREFIX, Checkpoint

    checkpoint = Checkpoint(path)
    config = checkpoint.config
    dev = torch.device(device)
    mxfp4 = resolve_expert_format(expert_format, is_mxfp4=config.is_mxfp4, device=dev)
    wanted = {n: n for n in checkpoint.names() if ".mlp.experts." not in n}  # ours -> file's
    if mxfp4:
        for layer in range(config.num_hidden_layers):
            prefix = EXPERT_PREFIX.format(layer=layer)
            wanted.update({prefix + k: prefix + v for k, v in MXFP4_CHECKPOINT_NAMES.items()})
    # A few reads at once, so file reads and host-to-device copies of different tensors overlap.
    with ThreadPoolExecutor(max_workers=LOAD_THREADS) as pool:
        loaded = pool.map(lambda n: checkpoint.get(wanted[n], device=dev), list(wanted))
        tensors = {
            name: value.to(dtype=_dtype_for(name, dtype, value.dtype))
            for name, value in zip(list(wanted), loaded, strict=True)
        }
    for layer in range(0 if mxfp4 else config.num_hidden_layers):  # dense: decode on `dev`
        weights = checkpoint.get_expert_weights(layer, dtype=dtype, device=dev)
        for key, value in weights.items():
            tensors[EXPERT_PREFIX.format(layer=layer) + key] = value
    checkpoint.close()
    return from_tensors(
        cls, config, tensors, dtype=dtype, device=dev, top_k=top_k, experts_keep=experts_keep,
        mxfp4_experts=mxfp4,
    )  # fmt: skip


def from_hf_state_dict(
    cls: type[GptOssModel],
    config: GptOssConfig,
    state_dict: Mapping[str, torch.Tensor],
    **kwargs: Any,
) -> GptOssModel:
    """Build from a transformers `GptOssForCausalLM.state_dict()` (dequantized experts).

    transformers stores experts input-major (`gate_up_proj [E, D, 2F]`, `down_proj
    [E, F, D]`); they are transposed to reference orientation here.
    """
    renames = {
        "mlp.experts.gate_up_proj": ("mlp.experts.gate_up", True),
        "mlp.experts.gate_up_proj_bias": ("mlp.experts.gate_up_bias", False),
        "mlp.experts.down_proj": ("mlp.experts.down", True),
        "mlp.experts.down_proj_bias": ("mlp.experts.down_bias", False),
    }
    tensors: dict[str, torch.Tensor] = {}
    for name, value in state_dict.items():
        prefix, _, leaf = name.rpartition(".mlp.experts.")
        key = f"mlp.experts.{leaf}"
        if prefix and key in renames:
            new_key, transpose = renames[key]
            tensors[f"{prefix}.{new_key}"] = value.transpose(1, 2) if transpose else value
        else:
            tensors[name] = value
    return from_tensors(cls, config, tensors, **kwargs)


def _slice_experts(
    tensors: dict[str, torch.Tensor], layer: int, select: torch.Tensor | int
) -> None:
    """Keep rows `select` (ids, or a count = the first rows) of a layer's router/expert tensors."""
    prefix = f"model.layers.{layer}."
    for name in [n for n in tensors if n.startswith(prefix) and any(m in n for m in MOE_MARKERS)]:
        value = tensors[name]
        if isinstance(select, int):
            if value.shape[0] > select:
                tensors[name] = value[:select]
        else:
            tensors[name] = value.index_select(0, select.to(value.device))


def from_tensors(
    cls: type[GptOssModel],
    config: GptOssConfig,
    tensors: Mapping[str, torch.Tensor],
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    top_k: int | None = None,
    experts_keep: Sequence[Sequence[int]] | None = None,
    mxfp4_experts: bool = False,
) -> GptOssModel:
    """Build on `meta`, then load `tensors` (this module's names) strictly onto `device`."""
    tensors = dict(tensors)
    counts = list(config.experts_per_layer)
    if not config.is_uniform:
        # Per-layer pruned checkpoints (eaftreap.rewrite) store every layer padded to one
        # count with masked dummy experts *after* the real ones, so stock runtimes load
        # them; `num_local_experts_per_layer` says how many rows are real.
        for layer, count in enumerate(counts):
            _slice_experts(tensors, layer, count)
    if experts_keep is not None:
        if len(experts_keep) != config.num_hidden_layers:
            raise ParameterError(
                f"experts_keep must list kept expert ids for each of the "
                f"{config.num_hidden_layers} layers, got {len(experts_keep)} lists"
            )
        for layer, keep in enumerate(experts_keep):
            keep_idx = torch.as_tensor(list(keep), dtype=torch.long)
            if (
                keep_idx.numel() == 0
                or int(keep_idx.max()) >= counts[layer]
                or int(keep_idx.min()) < 0
            ):
                raise ParameterError(
                    f"experts_keep[{layer}] must be non-empty ids in [0, {counts[layer]}), got {list(keep)}"
                )
            _slice_experts(tensors, layer, keep_idx)
            counts[layer] = keep_idx.numel()
        # The config describes the model as built: sliced counts, max as num_local_experts.
        config = dataclasses.replace(
            config, experts_per_layer=tuple(counts), num_local_experts=max(counts)
        )
    with torch.device("meta"):
        model = cls(config, experts_per_layer=counts, mxfp4_experts=mxfp4_experts)
    expected = dict(model.state_dict())
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointFormatError(
            f"checkpoint tensors do not match the gpt-oss layout: missing {missing[:MAX_LISTED_NAMES]}"
            f" ({len(missing)}), unexpected {unexpected[:MAX_LISTED_NAMES]} ({len(unexpected)})"
        )
    converted = {}
    for name, meta in expected.items():
        value = tensors.pop(name)  # drop our reference as we go: peak memory ~ one copy
        if tuple(value.shape) != tuple(meta.shape):
            raise CheckpointFormatError(
                f"tensor {name} has shape {tuple(value.shape)}, config implies {tuple(meta.shape)}"
            )
        converted[name] = value.to(device=device, dtype=_dtype_for(name, dtype, value.dtype))
    model.load_state_dict(converted, strict=True, assign=True)
    model.set_top_k(top_k if top_k is not None else config.num_experts_per_tok)
    return model.eval()


def _dtype_for(name: str, dtype: torch.dtype, stored: torch.dtype | None = None) -> torch.dtype:
    """Norm gains stay fp32 whatever the model dtype (like transformers' _keep_in_fp32_modules);
    MXFP4 bytes (uint8) stay bytes."""
    if stored == torch.uint8:
        return stored
    return torch.float32 if name.endswith("norm.weight") else dtype
