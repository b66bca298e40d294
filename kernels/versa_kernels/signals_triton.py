"""Row-wise log-sum-exp of logits in one read, on the GPU (Triton): the fast path of
`signals.token_signals`, whose reference is `torch.logsumexp(logits.float())`.

For 1024 rows of gpt-oss's 201,088-entry vocabulary the reference first writes an fp32 copy
(0.8 GB) and then reads it in several passes (1.8 ms per chunk on an H100, about 10% of an
`eaft_single` forward). This kernel streams each bf16 row once with an online maximum and
rescaled sum in fp32 (one program per row), so the values agree with the reference to fp32
rounding (tests/test_eaft_signals.py).
"""

from __future__ import annotations

from typing import Any

import torch

BLOCK = 2048
"""Vocabulary entries one program reads per step."""

__all__ = ["logsumexp_rows", "triton_lse_usable"]

_KERNEL: list[Any] = []


def _build() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def _lse(x_ptr, stride, out_ptr, V: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        m = tl.full((BLOCK,), float("-inf"), tl.float32)  # running max per lane
        s = tl.zeros((BLOCK,), tl.float32)  # running sum of exp(x - m) per lane
        for start in range(0, V, BLOCK):  # V is a compile-time constant (one vocabulary)
            idx = start + cols
            x = tl.load(x_ptr + row * stride + idx, mask=idx < V, other=float("-inf"))
            x = x.to(tl.float32)
            m_new = tl.maximum(m, x)
            # Lanes that have seen nothing yet keep s = 0 (avoid exp(-inf - -inf) = nan).
            scale = tl.where(m_new == float("-inf"), 0.0, tl.exp(m - m_new))
            s = s * scale + tl.where(x == float("-inf"), 0.0, tl.exp(x - m_new))
            m = m_new
        m_all = tl.max(m, axis=0)
        total = tl.sum(s * tl.where(m == float("-inf"), 0.0, tl.exp(m - m_all)), axis=0)
        tl.store(out_ptr + row, m_all + tl.log(total))

    return _lse


def triton_lse_usable(logits: torch.Tensor) -> bool:
    """CUDA tensor, rows contiguous, Triton importable."""
    if not logits.is_cuda or logits.dim() != 2 or logits.stride(1) != 1:
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def logsumexp_rows(logits: torch.Tensor) -> torch.Tensor:
    """log(sum(exp(logits), dim=-1)) in fp32 for logits [N, V] (any float dtype); [N]."""
    if not _KERNEL:
        _KERNEL.append(_build())
    n, vocab = logits.shape
    out = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n:
        _KERNEL[0][(n,)](logits, logits.stride(0), out, V=vocab, BLOCK=BLOCK)
    return out
