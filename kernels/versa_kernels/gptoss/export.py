"""Write a `GptOssModel` as an HF-layout gpt-oss checkpoint with MXFP4 experts.

Used by scripts/train_tiny_moe.py to commit the trained model and by tests to produce MXFP4
files that both transformers and our loader read. The layout is the hub's
(gptoss_reference.md §2.2): expert weights as `*_blocks` uint8 [E, rows, cols/32, 16] and
`*_scales` uint8 [E, rows, cols/32] in reference orientation (rows = output dim), everything
else (router, attention, norms, embeddings, lm_head, expert biases) as plain tensors.

What is easy to get wrong: never use transformers' `save_pretrained` for this (after
`Mxfp4Config(dequantize=True)` it writes BF16 data under the `_blocks` names, §3.2), and keep
`quantization_config` so loaders know the experts are MXFP4.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from versa_kernels.gptoss.checkpoint import DEFAULT_MAX_SHARD_BYTES, ShardedWriter
from versa_kernels.gptoss.config import CONFIG_FILE, MXFP4_QUANTIZATION_CONFIG
from versa_kernels.gptoss.experts import MXFP4_CHECKPOINT_NAMES
from versa_kernels.gptoss.model import GptOssModel
from versa_kernels.gptoss.mxfp4 import VALUES_PER_BLOCK, encode_mxfp4

# Our expert tensor -> hub tensor base name (weights get _blocks/_scales, biases are stored as is).
EXPERT_WEIGHT_NAMES = {"gate_up": "gate_up_proj", "down": "down_proj"}
EXPERT_BIAS_NAMES = {"gate_up_bias": "gate_up_proj_bias", "down_bias": "down_proj_bias"}

__all__ = ["MXFP4_QUANTIZATION_CONFIG", "save_mxfp4_checkpoint"]


def save_mxfp4_checkpoint(
    model: GptOssModel,
    out_dir: str | os.PathLike[str],
    *,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    side_files_from: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `model` to `out_dir` (atomically, via ShardedWriter); returns the directory.

    Non-expert tensors are stored in `dtype` (the hub uses bf16; norms too). Expert weights are
    quantized with `encode_mxfp4`, so a re-load sees the MXFP4-rounded values. `side_files_from`
    names a directory whose tokenizer/generation files are copied alongside.
    """
    for size_name in ("hidden_size", "intermediate_size"):
        size = getattr(model.config, size_name)
        if size % VALUES_PER_BLOCK:
            raise ValueError(
                f"{size_name}={size} must be a multiple of {VALUES_PER_BLOCK} for MXFP4"
            )
    counts = tuple(model.experts_per_layer)
    config = dataclasses.replace(
        model.config,
        num_local_experts=max(counts),
        experts_per_layer=counts,
        quantization_config=dict(MXFP4_QUANTIZATION_CONFIG),
    )
    with ShardedWriter(out_dir, max_shard_bytes=max_shard_bytes, overwrite=overwrite) as writer:
        for name, value in model.state_dict().items():
            prefix, _, leaf = name.rpartition(".mlp.experts.")
            if prefix and leaf in EXPERT_WEIGHT_NAMES:
                base = f"{prefix}.mlp.experts.{EXPERT_WEIGHT_NAMES[leaf]}"
                blocks, scales = encode_mxfp4(value.detach().float().cpu())
                writer.add(f"{base}_blocks", blocks)  # [E, rows, cols/32, 16]
                writer.add(f"{base}_scales", scales)  # [E, rows, cols/32]
            elif prefix and value.dtype == torch.uint8 and leaf in MXFP4_CHECKPOINT_NAMES:
                # Experts kept in MXFP4 (`Mxfp4Experts`): their bytes are already the format.
                writer.add(f"{prefix}.mlp.experts.{MXFP4_CHECKPOINT_NAMES[leaf]}", value.detach())
            elif prefix and leaf in EXPERT_BIAS_NAMES:
                writer.add(
                    f"{prefix}.mlp.experts.{EXPERT_BIAS_NAMES[leaf]}", value.detach().to(dtype)
                )
            else:
                writer.add(name, value.detach().to(dtype))
        writer.write_json(CONFIG_FILE, config.to_hf_dict())
        if side_files_from is not None:
            writer.copy_side_files(side_files_from)
    return Path(out_dir)
