"""Fused Triton kernels around the MoE's grouped GEMMs (CUDA, bf16): fewer passes over memory.

Between and after the two grouped GEMMs the plain-torch path (`expert_math._experts_grouped_gemm`
and the combine in `moe_grouped`, the references) makes about a dozen full passes over
[S, 2F] / [S, D] tensors (S = tokens x top-k): a bias gather and add, the strided gate/up
split, clamps, sigmoid and products, a second bias gather, the un-sort, the gate product and
sum, and an fp32 copy for the norms. Two kernels do the same in one pass each:

- `swiglu_bias(h, bias, expert)`: z = SwiGLU(h + bias[expert]) on interleaved gate/up columns.
- `combine(y, bias, expert, row_of, gates)`: for each token t and slot k, the routed expert's
  output y_e = y[row_of[t, k]] + bias[e] (un-sorting without a copy), its L2 norm (what REAP
  scores), and out[t] = sum_k gates[t, k] * y_e.

Both compute in fp32 and round once at the end, so they are within bf16 rounding of the
references (tests/test_forward_fast.py, TestFastPathsCuda, and under TRITON_INTERPRET on CPU).
"""

from __future__ import annotations

from typing import Any

import torch

BLOCK_ROWS = 16
BLOCK_COLS = 128

__all__ = ["combine", "fused_moe_usable", "swiglu_bias"]

_KERNELS: dict[str, Any] = {}


def _build() -> dict[str, Any]:
    import triton
    import triton.language as tl

    @triton.jit
    def _swiglu_bias(h_ptr, bias_ptr, expert_ptr, z_ptr, S, F, alpha, limit,
                     BR: tl.constexpr, BF: tl.constexpr):  # fmt: skip
        rows = tl.program_id(0) * BR + tl.arange(0, BR)  # [BR]
        cols = tl.program_id(1) * BF + tl.arange(0, BF)  # [BF] output columns j
        in_r, in_c = rows < S, cols < F
        mask = in_r[:, None] & in_c[None, :]
        e = tl.load(expert_ptr + rows, mask=in_r, other=0).to(tl.int64)
        gate_off = rows[:, None].to(tl.int64) * (2 * F) + 2 * cols[None, :]
        bias_off = e[:, None] * (2 * F) + 2 * cols[None, :]
        a = tl.load(h_ptr + gate_off, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(h_ptr + gate_off + 1, mask=mask, other=0.0).to(tl.float32)
        a += tl.load(bias_ptr + bias_off, mask=mask, other=0.0).to(tl.float32)
        u += tl.load(bias_ptr + bias_off + 1, mask=mask, other=0.0).to(tl.float32)
        a = tl.minimum(a, limit)
        u = tl.minimum(tl.maximum(u, -limit), limit)
        z = a * tl.sigmoid(alpha * a) * (u + 1.0)
        z_off = rows[:, None].to(tl.int64) * F + cols[None, :]
        tl.store(z_ptr + z_off, z.to(z_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _combine(y_ptr, bias_ptr, expert_ptr, row_ptr, gate_ptr, out_ptr, norm_ptr, D,
                 K: tl.constexpr, BD: tl.constexpr):  # fmt: skip
        t = tl.program_id(0)
        cols = tl.arange(0, BD)
        in_c = cols < D
        acc = tl.zeros((BD,), dtype=tl.float32)
        for k in tl.static_range(K):
            row = tl.load(row_ptr + t * K + k).to(tl.int64)
            e = tl.load(expert_ptr + t * K + k).to(tl.int64)
            g = tl.load(gate_ptr + t * K + k).to(tl.float32)
            y = tl.load(y_ptr + row * D + cols, mask=in_c, other=0.0).to(tl.float32)
            y += tl.load(bias_ptr + e * D + cols, mask=in_c, other=0.0).to(tl.float32)
            # The reference takes the norm of y_e as rounded to the model dtype.
            y = y.to(out_ptr.dtype.element_ty).to(tl.float32)
            tl.store(norm_ptr + t * K + k, tl.sqrt(tl.sum(y * y, axis=0)))
            acc += g * y
        tl.store(out_ptr + t.to(tl.int64) * D + cols, acc.to(out_ptr.dtype.element_ty), mask=in_c)

    return {"swiglu_bias": _swiglu_bias, "combine": _combine}


def _kernels() -> dict[str, Any]:
    if not _KERNELS:
        _KERNELS.update(_build())
    return _KERNELS


def fused_moe_usable(x: torch.Tensor) -> bool:
    """Whether the fused kernels can run for activations x (CUDA, Triton importable)."""
    if not x.is_cuda:
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def swiglu_bias(
    h: torch.Tensor, bias: torch.Tensor, expert: torch.Tensor, *, alpha: float, limit: float
) -> torch.Tensor:
    """SwiGLU(h + bias[expert]) for h [S, 2F] (interleaved gate/up), bias [E, 2F], expert [S]."""
    import triton

    S, F2 = h.shape
    F = F2 // 2
    z = torch.empty(S, F, dtype=h.dtype, device=h.device)
    grid = (triton.cdiv(S, BLOCK_ROWS), triton.cdiv(F, BLOCK_COLS))
    _kernels()["swiglu_bias"][grid](
        h.contiguous(), bias.contiguous(), expert.contiguous(), z, S, F, float(alpha), float(limit),
        BR=BLOCK_ROWS, BF=BLOCK_COLS,
    )  # fmt: skip
    return z


def combine(
    y: torch.Tensor,
    bias: torch.Tensor,
    expert: torch.Tensor,
    row_of: torch.Tensor,
    gates: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [T, D], norms [T, K] fp32) from expert-sorted outputs y [S, D] without their bias.

    expert [T, K] routed ids, row_of [T, K] the row of y holding (t, k), gates [T, K].
    """
    import triton

    T, K = expert.shape
    D = y.shape[1]
    out = torch.empty(T, D, dtype=y.dtype, device=y.device)
    norms = torch.empty(T, K, dtype=torch.float32, device=y.device)
    _kernels()["combine"][(T,)](
        y.contiguous(), bias.contiguous(), expert.contiguous(), row_of.contiguous(),
        gates.float().contiguous(), out, norms, D, K=K, BD=triton.next_power_of_2(D),
    )  # fmt: skip
    return out, norms
