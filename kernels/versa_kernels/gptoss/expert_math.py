"""gpt-oss MoE math: router, clamped interleaved SwiGLU, one expert, and the plain MoE reference.

Written from the formulas in gptoss_reference.md §1.2-§1.8 (checked against transformers'
`GptOssTopKRouter` / `GptOssExperts`). Dimension letters: T tokens, E experts, K top-k,
D hidden, F expert intermediate (so gate_up has 2F rows).

What is easy to get wrong, and how this module does it:

- Router: logits = W x + b (with bias); take the top-k *logits*, then softmax over those k only.
  There is no softmax over all E experts first.
- SwiGLU input is *interleaved*: even rows of gate_up are the gate ("glu") half, odd rows the up
  ("linear") half, not two contiguous halves.
- Clamps are asymmetric: the gate is clamped from above only (<= limit), the up half to
  [-limit, limit]; the up half gets an extra `+ 1`.
- The down bias is added per expert *before* the gate weight multiplies the expert output.

Two MoE paths with the same signature: `moe_reference` (a plain loop, the yardstick) and
`moe_grouped` (what the model runs: each routed (token, expert) output computed once on the
tokens grouped by expert, returning the routing and each y_e's norm too); tests hold them equal.

Weights here use the reference orientation (output-major like `nn.Linear.weight`):
gate_up [E, 2F, D], gate_up_bias [E, 2F], down [E, D, F], down_bias [E, D]. transformers stores
the transposes (`gate_up_proj [E, D, 2F]`, `down_proj [E, F, D]`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from versa_kernels.gptoss.moe_triton import fused_moe_usable

WeightsFor = Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]
"""(first, end) expert ids -> (gate_up [n, 2F, D], down [n, D, F]) of those experts."""

SWIGLU_ALPHA = 1.702
"""gpt-oss's sigmoid sharpness in `gate * sigmoid(alpha * gate)` (config `swiglu_alpha`)."""

SWIGLU_LIMIT = 7.0
"""gpt-oss's activation clamp (config `swiglu_limit`)."""

__all__ = [
    "SWIGLU_ALPHA",
    "SWIGLU_LIMIT",
    "expert_forward",
    "moe_grouped",
    "moe_reference",
    "route_topk",
    "router_logits",
    "swiglu",
]


def router_logits(x: torch.Tensor, router_w: torch.Tensor, router_b: torch.Tensor) -> torch.Tensor:
    """Router logits G = x W_r^T + b_r for x [T, D], W_r [E, D], b_r [E] -> [T, E]."""
    return torch.nn.functional.linear(x, router_w, router_b)  # [T, E]


def route_topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Select the k largest router logits per token and softmax over those k only.

    Returns (gates [T, K], indices [T, K]); gates sum to 1 per token. Ties break the way
    `torch.topk(sorted=True)` breaks them, like transformers and the reference.
    """
    if k < 1 or k > logits.shape[-1]:
        raise ValueError(f"k must be in [1, {logits.shape[-1]}] (experts available), got {k}")
    top_values, indices = torch.topk(logits, k, dim=-1, sorted=True)  # [T, K], [T, K]
    gates = torch.softmax(top_values, dim=-1)  # [T, K]
    return gates, indices


def swiglu(
    h: torch.Tensor, *, alpha: float = SWIGLU_ALPHA, limit: float = SWIGLU_LIMIT
) -> torch.Tensor:
    """Clamped SwiGLU on interleaved h [..., 2F] -> [..., F].

    z = min(a, limit) * sigmoid(alpha * min(a, limit)) * (clamp(u, -limit, limit) + 1) with
    a = h[..., 0::2] (gate) and u = h[..., 1::2] (up). The `+ 1` is gpt-oss's implicit bias on
    the linear half (reference §1.3).
    """
    gate = h[..., 0::2].clamp(max=limit)  # [..., F]
    up = h[..., 1::2].clamp(min=-limit, max=limit)  # [..., F]
    return gate * torch.sigmoid(alpha * gate) * (up + 1)


def expert_forward(
    x: torch.Tensor,
    gate_up_e: torch.Tensor,
    gate_up_bias_e: torch.Tensor,
    down_e: torch.Tensor,
    down_bias_e: torch.Tensor,
    *,
    alpha: float = SWIGLU_ALPHA,
    limit: float = SWIGLU_LIMIT,
) -> torch.Tensor:
    """One expert's output y_e = W2 swiglu(W1 x + b1) + b2 for x [T, D] -> [T, D].

    gate_up_e [2F, D], gate_up_bias_e [2F], down_e [D, F], down_bias_e [D] (reference
    orientation). The output includes the down bias and is *not* gate-weighted: this is the
    y_e whose norm REAP scores.
    """
    h = torch.nn.functional.linear(x, gate_up_e, gate_up_bias_e)  # [T, 2F]
    z = swiglu(h, alpha=alpha, limit=limit)  # [T, F]
    return torch.nn.functional.linear(z, down_e, down_bias_e)  # [T, D]


def moe_reference(
    x: torch.Tensor,
    router_w: torch.Tensor,
    router_b: torch.Tensor,
    gate_up: torch.Tensor,
    gate_up_bias: torch.Tensor,
    down: torch.Tensor,
    down_bias: torch.Tensor,
    *,
    top_k: int,
    alpha: float = SWIGLU_ALPHA,
    limit: float = SWIGLU_LIMIT,
) -> torch.Tensor:
    """The plain, readable MoE block: route, then loop over experts and add gate-weighted outputs.

    x [T, D] is the post-attention RMSNorm output; returns the MoE output [T, D] (without the
    residual). Weights in reference orientation: gate_up [E, 2F, D], gate_up_bias [E, 2F],
    down [E, D, F], down_bias [E, D]. Kept deliberately simple as the yardstick for fast paths.
    """
    num_experts = gate_up.shape[0]
    gates, indices = route_topk(router_logits(x, router_w, router_b), top_k)  # [T, K], [T, K]
    out = torch.zeros_like(x)  # [T, D]
    for expert in range(num_experts):
        token_idx, slot = torch.where(indices == expert)  # tokens routed to this expert
        if token_idx.numel() == 0:
            continue
        y = expert_forward(
            x[token_idx],
            gate_up[expert],
            gate_up_bias[expert],
            down[expert],
            down_bias[expert],
            alpha=alpha,
            limit=limit,
        )  # [n, D]
        out.index_add_(0, token_idx, y * gates[token_idx, slot, None])
    return out


def moe_grouped(
    x: torch.Tensor,
    router_w: torch.Tensor,
    router_b: torch.Tensor,
    gate_up: torch.Tensor | None,
    gate_up_bias: torch.Tensor,
    down: torch.Tensor | None,
    down_bias: torch.Tensor,
    *,
    top_k: int,
    alpha: float = SWIGLU_ALPHA,
    limit: float = SWIGLU_LIMIT,
    expert_mask: torch.Tensor | None = None,
    fused: bool = True,
    weights_for: WeightsFor | None = None,
    experts_per_chunk: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """MoE block, grouped by expert: each routed (token, expert) output is computed exactly once.

    `weights_for(a, b)` -> (gate_up, down) of experts a..b-1: the fused CUDA path then takes the
    experts `experts_per_chunk` at a time (MXFP4 experts are decoded chunk by chunk into a small
    buffer: the 120b's 128 experts need 6.4 GB decoded at once, 1.6 GB in chunks of 32). Other
    paths call it once for all experts when `gate_up` / `down` are not given.

    Same arguments as `moe_reference` plus `expert_mask` [E] (True = kept; masked experts get a
    router logit of -inf, which equals removing them, reference §1.10). Differentiable.
    On CUDA in bf16 without autograd the experts run as two grouped GEMMs with the Triton
    kernels of `moe_triton` between and after them (`fused=False`: the plain-torch grouped path,
    `_experts_grouped_gemm`, their reference); elsewhere as a loop over experts (`_experts_loop`).

    Returns (out [T, D], indices [T, K], gates [T, K], y_norm [T, K]) where y_norm is the L2 norm
    of each routed expert's own output y_e in fp32.
    """
    T, D = x.shape
    num_experts = router_w.shape[0]
    logits = router_logits(x, router_w, router_b)  # [T, E]
    if expert_mask is not None:
        logits = logits.masked_fill(~expert_mask.to(logits.device), float("-inf"))
    gates, indices = route_topk(logits, top_k)  # [T, K], [T, K]

    flat_expert = indices.reshape(-1)  # [T*K], assignment a = t*K + k
    order = torch.argsort(flat_expert, stable=True)  # assignments grouped by expert
    token_of = order // top_k  # [T*K] token of each grouped assignment
    if weights_for is None:
        if gate_up is None or down is None:
            raise ValueError("moe_grouped needs gate_up and down, or weights_for")
        all_gate_up, all_down = gate_up, down
        weights_for = lambda a, b: (all_gate_up[a:b], all_down[a:b])  # noqa: E731
    if fused and _grouped_gemm_usable(x, gate_up_bias) and fused_moe_usable(x):
        return _moe_fused_cuda(
            x[token_of], flat_expert[order], order, indices, gates, weights_for, gate_up_bias,
            down_bias, alpha=alpha, limit=limit, chunk=experts_per_chunk or num_experts,
        )  # fmt: skip
    if gate_up is None or down is None:
        gate_up, down = weights_for(0, num_experts)
    if _grouped_gemm_usable(x, gate_up):
        grouped = _experts_grouped_gemm(
            x[token_of], flat_expert[order], gate_up, gate_up_bias, down, down_bias,
            alpha=alpha, limit=limit,
        )  # fmt: skip
    else:
        grouped = _experts_loop(
            x, token_of, torch.bincount(flat_expert, minlength=num_experts).tolist(),
            gate_up, gate_up_bias, down, down_bias, alpha=alpha, limit=limit,
        )  # fmt: skip
    y = grouped[torch.argsort(order)].view(T, top_k, D)  # [T, K, D] back in token order
    out = (y * gates.unsqueeze(-1).to(y.dtype)).sum(dim=1)  # [T, D]
    return out, indices, gates, y.detach().float().norm(dim=-1)


def _moe_fused_cuda(
    x_sorted: torch.Tensor,
    expert_sorted: torch.Tensor,
    order: torch.Tensor,
    indices: torch.Tensor,
    gates: torch.Tensor,
    weights_for: WeightsFor,
    gate_up_bias: torch.Tensor,
    down_bias: torch.Tensor,
    *,
    alpha: float,
    limit: float,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The grouped path with fused bias + SwiGLU and a fused un-sort / norm / gate combine.

    Rows are sorted by expert, so the rows of experts a..b-1 are one contiguous slice: each
    chunk of experts runs its two grouped GEMMs on its own slice.
    """
    from versa_kernels.gptoss.moe_triton import combine, swiglu_bias

    num_experts = gate_up_bias.shape[0]
    counts = torch.bincount(expert_sorted, minlength=num_experts)  # [E]
    ends = torch.cumsum(counts, dim=0)  # [E] end row of each expert
    single = chunk >= num_experts
    bounds = [] if single else [0, *ends.tolist()]  # one host sync, only when chunking
    y = torch.empty(len(order), down_bias.shape[1], dtype=x_sorted.dtype, device=x_sorted.device)
    for a in range(0, num_experts, chunk):
        b = min(a + chunk, num_experts)
        r0, r1 = (0, len(order)) if single else (bounds[a], bounds[b])
        if r1 == r0 and not single:
            continue  # no token routed to this chunk: skip its decode
        gate_up, down = weights_for(a, b)  # [b-a, 2F, D], [b-a, D, F]
        offs = (ends[a:b] - r0).to(torch.int32)  # end rows within the slice
        h = torch._grouped_mm(x_sorted[r0:r1], gate_up.transpose(1, 2), offs=offs)  # [n, 2F]
        z = swiglu_bias(h, gate_up_bias[a:b], expert_sorted[r0:r1] - a, alpha=alpha, limit=limit)
        y[r0:r1] = torch._grouped_mm(z, down.transpose(1, 2), offs=offs)  # [n, D], no bias yet
    row_of = torch.empty_like(order)
    row_of[order] = torch.arange(order.numel(), device=order.device)  # sorted row of each (t, k)
    out, norms = combine(y, down_bias, indices, row_of.view(indices.shape), gates)
    return out, indices, gates, norms


def _grouped_gemm_usable(x: torch.Tensor, gate_up: torch.Tensor) -> bool:
    """True where torch's grouped GEMM runs: CUDA, bf16, torch with `_grouped_mm`, no autograd."""
    return (
        x.is_cuda
        and x.dtype == torch.bfloat16
        and gate_up.dtype == torch.bfloat16
        and hasattr(torch, "_grouped_mm")
        and not torch.is_grad_enabled()
    )


def _experts_grouped_gemm(
    x_sorted: torch.Tensor,
    expert_sorted: torch.Tensor,
    gate_up: torch.Tensor,
    gate_up_bias: torch.Tensor,
    down: torch.Tensor,
    down_bias: torch.Tensor,
    *,
    alpha: float,
    limit: float,
) -> torch.Tensor:
    """Every routed (token, expert) output in two grouped GEMMs, rows sorted by expert.

    x_sorted [S, D] and expert_sorted [S] are the assignments in expert order; returns y [S, D]
    in the same order. `offs` are the end rows of each expert's group; the weights are passed
    as [E, D, 2F] / [E, F, D] views of the reference orientation (no copy). One launch per GEMM
    instead of a Python loop over experts (benchmarks/bench_moe.py measures both).
    """
    num_experts = gate_up.shape[0]
    counts = torch.bincount(expert_sorted, minlength=num_experts)  # [E]
    offs = torch.cumsum(counts, dim=0, dtype=torch.int32)  # [E]
    h = torch._grouped_mm(x_sorted, gate_up.transpose(1, 2), offs=offs)  # [S, 2F]
    h = h + gate_up_bias[expert_sorted]
    z = swiglu(h, alpha=alpha, limit=limit)  # [S, F]
    y = torch._grouped_mm(z, down.transpose(1, 2), offs=offs)  # [S, D]
    return y + down_bias[expert_sorted]


def _experts_loop(
    x: torch.Tensor,
    token_of: torch.Tensor,
    counts: list[int],
    gate_up: torch.Tensor,
    gate_up_bias: torch.Tensor,
    down: torch.Tensor,
    down_bias: torch.Tensor,
    *,
    alpha: float,
    limit: float,
) -> torch.Tensor:
    """The same outputs [S, D] by a loop over experts (CPU, fp32, training, old torch)."""
    pieces = []
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        rows = token_of[start : start + count]
        pieces.append(
            expert_forward(
                x[rows],
                gate_up[expert],
                gate_up_bias[expert],
                down[expert],
                down_bias[expert],
                alpha=alpha,
                limit=limit,
            )  # fmt: skip
        )  # [count, D]
        start += count
    return torch.cat(pieces)
