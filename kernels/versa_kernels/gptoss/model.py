"""The project's own gpt-oss forward, written from the formulas, with per-layer expert counts.

References: gptoss_reference.md §1 (MoE math, block structure), transformers 5.23
`modeling_gpt_oss.py` (checked against it to 1e-4 in fp32 on CPU by tests/test_forward.py).
Dimension letters: B batch, T tokens, D hidden, E experts (per layer), K top-k, F expert
intermediate, V vocabulary.

What this forward has that the transformers one does not:

- A different number of experts in each layer (config.experts_per_layer), for per-layer pruned
  checkpoints, and `experts_keep` to slice experts physically at load.
- No forward hooks: `forward(..., collect_moe=True)` returns, per MoE layer, the selected experts,
  their gates and the L2 norm of each routed expert's output y_e (incl. its down bias, before
  gate weighting) - what REAP scoring needs. Each routed expert output is computed once, on the
  tokens routed to it (grouped by expert), never densely for all experts.
- `router_mask` emulates pruning by masking router logits (reference §1.10: equal to slicing).
- `top_k` override to run with a different number of experts per token.
- Logits are never materialized as [T, V] unless asked: `iter_logit_chunks` yields slices.
- Experts can stay in MXFP4 on the GPU (`experts.Mxfp4Experts`, the default on CUDA), decoded
  32 at a time into one shared buffer inside the MoE; on CUDA in bf16 the MoE runs grouped GEMMs
  with fused Triton kernels (`moe_triton`) and attention runs on the flash kernel with the exact
  sink correction (`attention.sdpa_with_sinks_flash`). Each has its plain-torch reference.

What is easy to get wrong is listed in `expert_math` (router, SwiGLU) and `attention` (sinks,
window, YaRN). Module attribute names equal the HF checkpoint tensor names, except the experts:
dense ones hold decoded weights in reference orientation under the names that
`Checkpoint.get_expert_weights` returns (gate_up [E, 2F, D], gate_up_bias, down [E, D, F],
down_bias); MXFP4 ones `gate_up_blocks`, `gate_up_scales`, ... (`experts.MXFP4_CHECKPOINT_NAMES`).
Building from a checkpoint or tensors is in `loading`; one layer's MoE (router, experts, fast
path and reference) is in `moe_block`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from versa_kernels.errors import ParameterError
from versa_kernels.gptoss.attention import (
    DEFAULT_QUERY_CHUNK,
    apply_rope,
    rms_norm,
    rope_cos_sin,
    sdpa_with_sinks,
    sdpa_with_sinks_flash,
    sdpa_with_sinks_fused,
)
from versa_kernels.gptoss.config import SLIDING, GptOssConfig
from versa_kernels.gptoss.experts import ExpertWorkspace
from versa_kernels.gptoss.moe_block import MoeBlock

FUSED_SCORE_BUDGET_BYTES = 1 << 30
"""Largest [B, N, T, T+1] score tensor the fused attention may build on CPU."""

__all__ = ["ForwardOutput", "GptOssModel", "MoeTrace"]


@dataclass
class MoeTrace:
    """What one MoE layer did for each of the B*T tokens (row order = input_ids.flatten())."""

    layer: int
    indices: torch.Tensor
    """[B*T, K] selected expert ids (in this layer's numbering)."""
    gates: torch.Tensor
    """[B*T, K] softmax-over-top-k gate weights, fp32."""
    expert_out_norm: torch.Tensor
    """[B*T, K] L2 norm over D of each routed expert's output y_e (bias included, gate not), fp32."""


@dataclass
class ForwardOutput:
    """The final-normed hidden states and, when asked, the per-layer MoE traces."""

    hidden: torch.Tensor
    """[B, T, D] after the final RMSNorm; feed to `logits` or `iter_logit_chunks`."""
    moe: list[MoeTrace] | None = None


class RMSNorm(nn.Module):
    """RMSNorm whose gain stays fp32 whatever the model dtype (like transformers)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size, dtype=torch.float32))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    """Grouped-query attention with biases, learned sinks and an optional sliding window."""

    def __init__(self, config: GptOssConfig, layer: int) -> None:
        super().__init__()
        D, d = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            d,
        )
        self.q_proj = nn.Linear(D, self.num_heads * d)
        self.k_proj = nn.Linear(D, self.num_kv_heads * d)
        self.v_proj = nn.Linear(D, self.num_kv_heads * d)
        self.o_proj = nn.Linear(self.num_heads * d, D)
        self.sinks = nn.Parameter(torch.empty(self.num_heads))
        is_sliding = config.layer_types[layer] == SLIDING
        self.sliding_window = config.sliding_window if is_sliding else None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        *,
        query_chunk: int,
        fused: bool,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # [B, N, T, d]
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)  # [B, T, G, d]
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)  # [B, T, G, d]
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # [B, G, T, d]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        scale = self.head_dim**-0.5
        # The fused call is used in fp32 only: in bf16 the sink-as-key trick rounds S / sm_scale
        # and the logits drift to 7.6% of max |logit| on the tiny model (the reference: 1.3%).
        # On CPU it materializes [B, N, T, T+1] scores; past a budget the chunked reference
        # bounds memory instead (CUDA kernels never materialize them).
        score_bytes = B * self.num_heads * T * (T + 1) * q.element_size()
        fits = q.is_cuda or score_bytes <= FUSED_SCORE_BUDGET_BYTES
        if fused and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
            out = sdpa_with_sinks_flash(
                q, k, v, self.sinks, sm_scale=scale, sliding_window=self.sliding_window
            )  # [B, T, N*d]: flash kernel + exact sink correction, banded blocks when sliding
        elif fused and q.dtype == torch.float32 and fits:
            out = sdpa_with_sinks_fused(
                q, k, v, self.sinks, sm_scale=scale, sliding_window=self.sliding_window
            )  # [B, T, N*d]
        else:
            out = sdpa_with_sinks(
                q,
                k,
                v,
                self.sinks,
                sm_scale=scale,
                sliding_window=self.sliding_window,
                query_chunk=query_chunk,
            )  # [B, T, N*d]
        return self.o_proj(out)


class DecoderLayer(nn.Module):
    """x += Attn(RMSNorm(x)); x += MoE(RMSNorm(x))."""

    def __init__(
        self,
        config: GptOssConfig,
        layer: int,
        num_experts: int,
        *,
        mxfp4: bool,
        workspace: ExpertWorkspace,
    ) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoeBlock(config, num_experts, mxfp4=mxfp4, workspace=workspace)


class Backbone(nn.Module):
    """Holds the `model.*` tensors (embeddings, layers, final norm) under their HF names."""

    def __init__(
        self,
        config: GptOssConfig,
        experts_per_layer: Sequence[int],
        *,
        mxfp4: bool,
        workspace: ExpertWorkspace,
    ) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, n, mxfp4=mxfp4, workspace=workspace)
            for i, n in enumerate(experts_per_layer)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class GptOssModel(nn.Module):
    """gpt-oss causal LM forward; see the module docstring for what it exposes."""

    def __init__(
        self,
        config: GptOssConfig,
        *,
        experts_per_layer: Sequence[int] | None = None,
        mxfp4_experts: bool = False,
    ) -> None:
        super().__init__()
        self.config = config
        counts = tuple(experts_per_layer or config.experts_per_layer)
        if len(counts) != config.num_hidden_layers:
            raise ValueError(f"{len(counts)} expert counts for {config.num_hidden_layers} layers")
        self.experts_per_layer = counts
        self.top_k = config.num_experts_per_tok
        self.query_chunk = DEFAULT_QUERY_CHUNK
        # fp32 attention through torch's fused SDPA with the sink as an extra key: 4x faster than
        # the chunked reference on CPU at T=2048 (1.86 s -> 0.44 s, trained tiny model) and
        # equal to it within 1e-4 (tests/test_forward.py). The reference stays the yardstick
        # and runs where the fused score tensor would be too big (Attention). On CUDA in bf16
        # the flash path (`attention.sdpa_with_sinks_flash`) runs instead.
        self.fused_attention = True
        self.mxfp4_experts = mxfp4_experts
        self.expert_workspace = ExpertWorkspace()
        self.model = Backbone(config, counts, mxfp4=mxfp4_experts, workspace=self.expert_workspace)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        top_k: int | None = None,
        experts_keep: Sequence[Sequence[int]] | None = None,
        expert_format: str = "auto",
    ) -> GptOssModel:
        """Load an HF-layout MXFP4 (or bf16) gpt-oss checkpoint; see `loading.load_checkpoint`."""
        from versa_kernels.gptoss.loading import load_checkpoint

        return load_checkpoint(
            cls, path, dtype=dtype, device=device, top_k=top_k, experts_keep=experts_keep,
            expert_format=expert_format,
        )  # fmt: skip

    @classmethod
    def from_hf_state_dict(
        cls, config: GptOssConfig, state_dict: Mapping[str, torch.Tensor], **kwargs: Any
    ) -> GptOssModel:
        """Build from a transformers `GptOssForCausalLM.state_dict()` (dequantized experts)."""
        from versa_kernels.gptoss.loading import from_hf_state_dict

        return from_hf_state_dict(cls, config, state_dict, **kwargs)

    @classmethod
    def from_tensors(
        cls,
        config: GptOssConfig,
        tensors: Mapping[str, torch.Tensor],
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        top_k: int | None = None,
        experts_keep: Sequence[Sequence[int]] | None = None,
    ) -> GptOssModel:
        """Build on `meta`, then load `tensors` (this module's names) strictly onto `device`."""
        from versa_kernels.gptoss.loading import from_tensors

        return from_tensors(
            cls, config, tensors, dtype=dtype, device=device, top_k=top_k,
            experts_keep=experts_keep,
        )  # fmt: skip

    def set_top_k(self, top_k: int) -> None:
        """Route each token to `top_k` experts; must not exceed the experts of any layer."""
        smallest = min(self.experts_per_layer)
        if not 1 <= top_k <= smallest:
            raise ParameterError(
                f"top_k must be between 1 and {smallest} (the fewest experts in any layer), got {top_k}"
            )
        self.top_k = top_k

    # ----------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        collect_moe: bool = False,
        router_mask: Sequence[torch.Tensor | None] | None = None,
    ) -> ForwardOutput:
        """Run the model on input_ids [B, T] from position 0; see ForwardOutput.

        `router_mask[layer]` is a bool tensor [E_layer] of experts to keep (None = all); a layer
        must keep at least `top_k` experts.
        """
        B, T = input_ids.shape
        masks = self._check_router_mask(router_mask)
        x = self.model.embed_tokens(input_ids)  # [B, T, D]
        cos, sin = rope_cos_sin(
            torch.arange(T, device=input_ids.device),
            head_dim=self.config.head_dim,
            theta=self.config.rope_theta,
            scaling=self.config.rope_scaling,
            dtype=x.dtype,
        )  # [T, d/2] each
        traces: list[MoeTrace] = []
        for index, layer in enumerate(self.model.layers):
            attn_in = layer.input_layernorm(x)
            x = x + layer.self_attn(
                attn_in, cos, sin, query_chunk=self.query_chunk, fused=self.fused_attention
            )
            h = layer.post_attention_layernorm(x).reshape(B * T, -1)  # [B*T, D]
            out, indices, gates, y_norm = layer.mlp(h, top_k=self.top_k, expert_mask=masks[index])
            x = x + out.view(B, T, -1)
            if collect_moe:
                traces.append(MoeTrace(index, indices, gates.detach().float(), y_norm))
        return ForwardOutput(self.model.norm(x), traces if collect_moe else None)

    def _check_router_mask(
        self, router_mask: Sequence[torch.Tensor | None] | None
    ) -> list[torch.Tensor | None]:
        if router_mask is None:
            return [None] * len(self.experts_per_layer)
        if len(router_mask) != len(self.experts_per_layer):
            raise ParameterError(
                f"router_mask must have one entry per layer ({len(self.experts_per_layer)}), "
                f"got {len(router_mask)}"
            )
        for layer, mask in enumerate(router_mask):
            if mask is None:
                continue
            if mask.dtype != torch.bool or tuple(mask.shape) != (self.experts_per_layer[layer],):
                raise ParameterError(
                    f"router_mask[{layer}] must be a bool tensor of shape "
                    f"({self.experts_per_layer[layer]},), got {mask.dtype} {tuple(mask.shape)}"
                )
            if int(mask.sum()) < self.top_k:
                raise ParameterError(
                    f"router_mask[{layer}] keeps {int(mask.sum())} experts; top_k={self.top_k} "
                    "needs at least that many"
                )
        return list(router_mask)

    # ----------------------------------------------------------------- logits
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """All logits [..., V] for hidden [..., D]; for long inputs prefer `iter_logit_chunks`."""
        return self.lm_head(hidden)

    def iter_logit_chunks(
        self, hidden: torch.Tensor, chunk_tokens: int
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield (first_token, logits [c, V]) over hidden [B, T, D] flattened to B*T rows.

        Only one [chunk_tokens, V] slice exists at a time, so a 201k vocabulary over a long
        block never needs [T, V] memory. Row r of the flattened hidden is token
        (r // T, r % T).
        """
        if chunk_tokens < 1:
            raise ParameterError(f"chunk_tokens must be a positive integer, got {chunk_tokens}")
        flat = hidden.reshape(-1, hidden.shape[-1])  # [B*T, D]
        for start in range(0, flat.shape[0], chunk_tokens):
            yield start, self.lm_head(flat[start : start + chunk_tokens])  # [c, V]
