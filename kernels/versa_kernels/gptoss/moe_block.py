"""One layer's mixture of experts: the router and the experts, with the fast path beside its
plain-torch reference.

`MoeBlock.forward` is the grouped path (`expert_math.moe_grouped`: each routed expert output
computed once, on the tokens routed to it; on CUDA in bf16 the fused Triton kernels of
`moe_triton`), and `MoeBlock.reference` the plain loop (`expert_math.moe_reference`) it is tested
against. MXFP4 experts (`experts.Mxfp4Experts`) are decoded inside the grouped path, a chunk of
experts at a time, into the model's one shared workspace. Module attribute names equal the HF
checkpoint tensor names (`mlp.router.weight`, `mlp.experts.*`).
"""

from __future__ import annotations

import torch
from torch import nn

from versa_kernels.gptoss.config import GptOssConfig
from versa_kernels.gptoss.expert_math import moe_grouped, moe_reference
from versa_kernels.gptoss.experts import (
    EXPERTS_PER_DECODE,
    DenseExperts,
    ExpertWorkspace,
    Mxfp4Experts,
)

FEW_ROWS_PER_EXPERT = 4
"""Below this many routed rows per expert, MXFP4 experts are decoded only where hit."""

__all__ = ["MoeBlock", "Router"]


class Router(nn.Module):
    """Router weight [E, D] and bias [E] (the bias is what pruning-by-masking overrides)."""

    def __init__(self, num_experts: int, hidden: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden))
        self.bias = nn.Parameter(torch.empty(num_experts))


class MoeBlock(nn.Module):
    """Router + experts of one layer; `forward` is the grouped path, `reference` the plain loop.

    `workspace` is the model's shared decode buffer (MXFP4 experts decode into it; a plain
    attribute, so it is neither a submodule nor saved).
    """

    def __init__(
        self, config: GptOssConfig, num_experts: int, *, mxfp4: bool, workspace: ExpertWorkspace
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.router = Router(num_experts, config.hidden_size)
        holder = Mxfp4Experts if mxfp4 else DenseExperts
        self.experts = holder(num_experts, config.hidden_size, config.intermediate_size)
        self.alpha = config.swiglu_alpha
        self.limit = config.swiglu_limit
        self.workspace = workspace

    def forward(
        self, x: torch.Tensor, *, top_k: int, expert_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        e = self.experts
        if isinstance(e, Mxfp4Experts):  # decoded by moe_grouped, a chunk of experts at a time
            gate_up = down = None
            # Few routed rows (a decode step): decode only the experts that were hit, one by one.
            few = x.shape[0] * top_k < FEW_ROWS_PER_EXPERT * self.num_experts
            chunk = 1 if few else EXPERTS_PER_DECODE
        else:
            (gate_up, down), chunk = e.weights(None), 0
        return moe_grouped(
            x,
            self.router.weight,
            self.router.bias,
            gate_up,
            e.gate_up_bias,
            down,
            e.down_bias,
            top_k=top_k,
            alpha=self.alpha,
            limit=self.limit,
            expert_mask=expert_mask,
            weights_for=lambda a, b: e.weights(self.workspace, a, b),
            experts_per_chunk=chunk,
        )

    def reference(self, x: torch.Tensor, *, top_k: int) -> torch.Tensor:
        """The plain loop (`moe_reference`) on this block's weights; the yardstick for `forward`."""
        e = self.experts
        gate_up, down = e.weights(self.workspace)
        return moe_reference(
            x,
            self.router.weight,
            self.router.bias,
            gate_up,
            e.gate_up_bias,
            down,
            e.down_bias,
            top_k=top_k,
            alpha=self.alpha,
            limit=self.limit,
        )
