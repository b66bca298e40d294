"""MXFP4 decode on the GPU in one Triton kernel, into a caller's buffer.

The fast path beside `mxfp4.decode_mxfp4` (the plain-torch reference): same input layout
(blocks [..., R, G, 16], scales [..., R, G], low nibble = even element), same values bit for
bit. It exists so experts can stay in MXFP4 on the GPU (4.25 bits per weight) and be decoded
one layer at a time into a reused bf16 buffer right before that layer's grouped GEMMs: the
20b's experts then take 12 GiB of GPU memory instead of 38 GiB.

How a code becomes a value without a lookup table: an E2M1 code c has sign c >> 3, exponent
e = (c >> 1) & 3 and mantissa m = c & 1; its magnitude is m / 2 when e == 0, else
2^(e - 1) (1 + m / 2). The E8M0 scale byte s is turned into the float32 2^(s - 127) by writing
its bits directly (s << 23; s == 0 is the subnormal 2^-127), so no approximate exp2 is involved.
Every product is exact in float32 and exactly representable in bf16 (both carry 8 exponent bits).

`decode_mxfp4_into` checks the kernel once per process against the reference on a sample and
falls back to the reference (logging why) if Triton is missing or disagrees.
"""

from __future__ import annotations

import logging

import torch

from versa_kernels.gptoss.mxfp4 import BYTES_PER_BLOCK, VALUES_PER_BLOCK, decode_mxfp4

log = logging.getLogger(__name__)

ROWS_PER_PROGRAM = 64
"""Blocks of 32 values one Triton program decodes (64 x 16 bytes in, 64 x 32 values out)."""

SELF_CHECK_ROWS = 4096
"""Blocks decoded by both paths when the kernel is first used (every code and many scales)."""

__all__ = ["decode_mxfp4_into", "triton_decode_usable"]

_KERNEL: object | None = None
_CHECKED: dict[torch.device, bool] = {}


def _build_kernel() -> object:
    import triton
    import triton.language as tl

    @triton.jit
    def _decode(blocks_ptr, scales_ptr, out_ptr, n_rows, ROWS: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * ROWS + tl.arange(0, ROWS)  # [ROWS]
        cols = tl.arange(0, 16)  # [16] bytes of one block
        in_row = rows < n_rows
        offs = rows[:, None].to(tl.int64) * 16 + cols[None, :]
        byte = tl.load(blocks_ptr + offs, mask=in_row[:, None], other=0).to(tl.int32)
        s = tl.load(scales_ptr + rows, mask=in_row, other=127).to(tl.int32)  # [ROWS]
        scale_bits = tl.where(s == 0, 1 << 22, s << 23)
        scale = scale_bits.to(tl.float32, bitcast=True)  # 2^(s - 127), exact

        # Both nibbles at once: [ROWS, 16, 2] codes, (low, high) = (even, odd) element.
        code = tl.join(byte & 15, byte >> 4)
        e = (code >> 1) & 3
        m = (code & 1).to(tl.float32)
        power = tl.where(e == 3, 4.0, tl.where(e == 2, 2.0, 1.0))  # 2^(e - 1) for e >= 1
        mag = tl.where(e == 0, 0.5 * m, (1.0 + 0.5 * m) * power)
        # The sign goes in as a bit: negating would turn code 8 (-0) into +0 on the GPU.
        bits = (mag * scale[:, None, None]).to(tl.int32, bitcast=True) | ((code & 8) << 28)
        val = bits.to(tl.float32, bitcast=True)
        vals = tl.reshape(val, (ROWS, 32))  # lo0, hi0, lo1, hi1, ...
        out_cols = tl.arange(0, 32)
        out_offs = rows[:, None].to(tl.int64) * 32 + out_cols[None, :]
        tl.store(out_ptr + out_offs, vals.to(out_ptr.dtype.element_ty), mask=in_row[:, None])

    return _decode


def _launch(blocks: torch.Tensor, scales: torch.Tensor, out: torch.Tensor) -> None:
    global _KERNEL
    import triton

    if _KERNEL is None:
        _KERNEL = _build_kernel()
    n_rows = scales.numel()
    grid = (triton.cdiv(n_rows, ROWS_PER_PROGRAM),)
    _KERNEL[grid](blocks, scales, out, n_rows, ROWS=ROWS_PER_PROGRAM)  # type: ignore[index]


def triton_decode_usable(device: torch.device) -> bool:
    """Whether the Triton kernel runs on `device` and equals the reference (checked once)."""
    if device.type != "cuda":
        return False
    if device not in _CHECKED:
        try:
            gen = torch.Generator(device="cpu").manual_seed(0)
            blocks = torch.randint(0, 256, (SELF_CHECK_ROWS, BYTES_PER_BLOCK), generator=gen)
            scales = torch.randint(100, 140, (SELF_CHECK_ROWS,), generator=gen)
            scales[:2] = torch.tensor([127, 120])  # 2^0 and a typical gpt-oss scale
            blocks, scales = blocks.to(torch.uint8).to(device), scales.to(torch.uint8).to(device)
            out = torch.empty(
                SELF_CHECK_ROWS, VALUES_PER_BLOCK, dtype=torch.bfloat16, device=device
            )
            _launch(blocks, scales, out)
            ref = decode_mxfp4(blocks[:, None], scales[:, None], dtype=torch.bfloat16)
            ok = torch.equal(
                out.view(torch.int16), ref.view(-1, VALUES_PER_BLOCK).view(torch.int16)
            )
            if not ok:
                log.warning("Triton MXFP4 decode disagrees with the reference; using the reference")
        except Exception as exc:  # triton missing or a compile error: the reference still works
            log.warning("Triton MXFP4 decode unavailable (%s); using the reference", exc)
            ok = False
        _CHECKED[device] = ok
    return _CHECKED[device]


def decode_mxfp4_into(
    blocks: torch.Tensor, scales: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """Decode blocks [..., R, G, 16] / scales [..., R, G] into `out` [..., R, 32 G]; returns out.

    Triton on CUDA (bf16 or fp32 out), the reference `decode_mxfp4` elsewhere; identical values.
    """
    if tuple(out.shape) != (*scales.shape[:-1], scales.shape[-1] * VALUES_PER_BLOCK):
        raise ValueError(
            f"out must be [..., R, 32 G] for scales {tuple(scales.shape)}, got {tuple(out.shape)}"
        )
    if (
        blocks.is_contiguous()
        and scales.is_contiguous()
        and out.is_contiguous()
        and blocks.dtype == torch.uint8
        and scales.dtype == torch.uint8
        and triton_decode_usable(blocks.device)
    ):
        _launch(blocks, scales, out)
        return out
    out.copy_(decode_mxfp4(blocks, scales, dtype=out.dtype))
    return out
