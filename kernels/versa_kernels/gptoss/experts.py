"""Expert weights of one MoE layer, held either dense or in MXFP4 with a shared decode buffer.

Two holders with one interface, `weights(workspace) -> (gate_up [E, 2F, D], down [E, D, F])`
in the reference orientation, so the MoE math (`expert_math.moe_grouped`) does not care which
one a layer has:

- `DenseExperts`: decoded weights resident in the model dtype (CPU, fp32, training, bf16
  checkpoints). The 20b's experts take 38 GiB in bf16.
- `Mxfp4Experts`: the checkpoint's `*_blocks` / `*_scales` bytes resident as they are on disk
  (12 GiB for the 20b, 61 GiB for the 120b); each forward decodes a layer into an
  `ExpertWorkspace` buffer shared by all layers (one layer's bf16 experts, 1.6 GiB at 20b/120b
  shapes) right before its grouped GEMMs. Decoding is exact (`mxfp4_triton` on CUDA, the torch
  reference elsewhere), so both holders give bit-identical layer outputs (tests/test_forward.py).

Module attribute names are what `GptOssModel.from_tensors` loads by; the MXFP4 names map to
the HF checkpoint's as `gate_up_blocks` <- `gate_up_proj_blocks` etc. (`MXFP4_CHECKPOINT_NAMES`).
"""

from __future__ import annotations

import torch
from torch import nn

from versa_kernels.gptoss.mxfp4 import BYTES_PER_BLOCK, VALUES_PER_BLOCK
from versa_kernels.gptoss.mxfp4_triton import decode_mxfp4_into

EXPERTS_PER_DECODE = 32
"""MXFP4 experts decoded at once on the fused CUDA path (1.6 GB bf16 at gpt-oss shapes)."""

EXPERT_FORMATS = ("auto", "dense", "mxfp4")
"""`auto`: MXFP4 on CUDA when the checkpoint is MXFP4, dense otherwise."""

DENSE_EXPERT_TENSORS = ("gate_up", "gate_up_bias", "down", "down_bias")
MXFP4_CHECKPOINT_NAMES = {
    "gate_up_blocks": "gate_up_proj_blocks",
    "gate_up_scales": "gate_up_proj_scales",
    "gate_up_bias": "gate_up_proj_bias",
    "down_blocks": "down_proj_blocks",
    "down_scales": "down_proj_scales",
    "down_bias": "down_proj_bias",
}
"""Module name -> HF checkpoint leaf name under `model.layers.N.mlp.experts.`."""

__all__ = [
    "DENSE_EXPERT_TENSORS",
    "EXPERT_FORMATS",
    "MXFP4_CHECKPOINT_NAMES",
    "DenseExperts",
    "ExpertWorkspace",
    "Mxfp4Experts",
]


class ExpertWorkspace:
    """One layer's decoded experts, reused by every layer of a forward (allocated on first use)."""

    def __init__(self) -> None:
        self.gate_up: torch.Tensor | None = None
        self.down: torch.Tensor | None = None

    def buffers(
        self,
        experts: int,
        intermediate: int,
        hidden: int,
        *,
        dtype: torch.dtype,
        device: torch.device,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Views gate_up [E, 2F, D] and down [E, D, F] of buffers big enough for `experts`."""
        need = (experts, 2 * intermediate, hidden)
        g = self.gate_up
        if (
            g is None
            or g.shape[0] < experts
            or g.shape[1:] != need[1:]
            or g.dtype != dtype
            or g.device != device
        ):
            # Grown to the widest layer seen; a pruned model's narrower layers use a prefix.
            self.gate_up = torch.empty(need, dtype=dtype, device=device)
            self.down = torch.empty((experts, hidden, intermediate), dtype=dtype, device=device)
        assert self.gate_up is not None and self.down is not None
        return self.gate_up[:experts], self.down[:experts]


class DenseExperts(nn.Module):
    """Decoded expert weights, reference orientation (output-major)."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_up = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden))
        self.gate_up_bias = nn.Parameter(torch.empty(num_experts, 2 * intermediate))
        self.down = nn.Parameter(torch.empty(num_experts, hidden, intermediate))
        self.down_bias = nn.Parameter(torch.empty(num_experts, hidden))

    def weights(
        self, workspace: ExpertWorkspace | None, first: int = 0, end: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up [n, 2F, D], down [n, D, F]) of experts first..end-1; no workspace needed."""
        return self.gate_up[first:end], self.down[first:end]


class Mxfp4Experts(nn.Module):
    """MXFP4 expert bytes as stored on disk; decoded per forward into an `ExpertWorkspace`."""

    gate_up_blocks: torch.Tensor  # [E, 2F, D/32, 16] uint8 (buffers, registered below)
    gate_up_scales: torch.Tensor  # [E, 2F, D/32] uint8
    down_blocks: torch.Tensor  # [E, D, F/32, 16] uint8
    down_scales: torch.Tensor  # [E, D, F/32] uint8

    def __init__(self, num_experts: int, hidden: int, intermediate: int) -> None:
        super().__init__()
        E, D, F = num_experts, hidden, intermediate
        u8 = torch.uint8
        self.register_buffer(
            "gate_up_blocks",
            torch.empty(E, 2 * F, D // VALUES_PER_BLOCK, BYTES_PER_BLOCK, dtype=u8),
        )
        self.register_buffer(
            "gate_up_scales", torch.empty(E, 2 * F, D // VALUES_PER_BLOCK, dtype=u8)
        )
        self.register_buffer(
            "down_blocks", torch.empty(E, D, F // VALUES_PER_BLOCK, BYTES_PER_BLOCK, dtype=u8)
        )
        self.register_buffer("down_scales", torch.empty(E, D, F // VALUES_PER_BLOCK, dtype=u8))
        self.gate_up_bias = nn.Parameter(torch.empty(E, 2 * F))
        self.down_bias = nn.Parameter(torch.empty(E, D))
        self.shape = (E, D, F)

    def weights(
        self, workspace: ExpertWorkspace | None, first: int = 0, end: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode experts first..end-1 into the workspace; views gate_up [n, 2F, D], down [n, D, F]."""
        if workspace is None:
            raise ValueError("MXFP4 experts need an ExpertWorkspace to decode into")
        E, D, F = self.shape
        end = E if end is None else end
        dtype, device = self.gate_up_bias.dtype, self.gate_up_bias.device
        gate_up, down = workspace.buffers(end - first, F, D, dtype=dtype, device=device)
        decode_mxfp4_into(self.gate_up_blocks[first:end], self.gate_up_scales[first:end], gate_up)
        decode_mxfp4_into(self.down_blocks[first:end], self.down_scales[first:end], down)
        return gate_up, down
