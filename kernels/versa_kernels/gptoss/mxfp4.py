"""MXFP4 (OCP microscaling FP4) as gpt-oss stores its expert weights on disk.

Format (gptoss_reference.md §2.3): `*_blocks` uint8 [..., R, G, 16] and `*_scales` uint8
[..., R, G]. Each group of 32 consecutive values along the *input* (last) dimension shares one
E8M0 scale byte s meaning 2^(s - 127); each value is an FP4 E2M1 code (sign bit 3, magnitude
codes 0-7), two codes per byte. The logical weight is [..., R, 32 G] in the reference
orientation (output-major, like `nn.Linear.weight`): gate_up [E, 2I, H], down [E, H, I].

What is easy to get wrong:

- Nibble order: the LOW nibble is the even element (2j), the high nibble the odd one (2j+1).
- transformers' `convert_moe_packed_tensors` returns the TRANSPOSE ([E, H, 2I]); `decode_mxfp4`
  returns the reference orientation. Compare after `.transpose(-1, -2)`.
- Re-encoding decoded values is lossless in value but not always identical in bytes: `-0` codes
  come back as `+0`, and a block whose largest code is <= 3 gets a smaller scale with doubled
  codes (§2.4). Compare decoded values, never bytes.
"""

from __future__ import annotations

import torch

FP4_VALUES = (
    +0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0,
    -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
)  # fmt: skip
"""E2M1 value of each 4-bit code (index = nibble); codes 8-15 are the negatives of 0-7."""

VALUES_PER_BLOCK = 32
"""Values sharing one E8M0 scale, consecutive along the input dimension."""

BYTES_PER_BLOCK = 16
"""Bytes holding one block: two 4-bit codes per byte."""

E8M0_BIAS = 127
"""Scale byte s means 2^(s - E8M0_BIAS)."""

E8M0_MAX = 254
"""Largest finite scale byte (255 is NaN in the OCP spec and no loader handles it)."""

LOW_NIBBLE_MASK = 0x0F
"""Mask of the low nibble, which holds the EVEN element of each pair."""

NIBBLE_BITS = 4
"""Shift that brings the high nibble (the ODD element of each pair) down."""

SIGN_CODE = 0b1000
"""Bit 3 of a code is the sign."""

FP4_MAX = 6.0
"""Largest E2M1 magnitude; the encoder picks scales so |x| / scale <= FP4_MAX."""

# Midpoints between consecutive E2M1 magnitudes (0, .5, 1, 1.5, 2, 3, 4, 6): a magnitude at or
# above midpoint i rounds to code i + 1, i.e. ties round away from zero (ROUND_UP rule, §2.4).
_MAGNITUDE_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)

DEFAULT_ROWS_PER_CHUNK = 1 << 20
"""Block rows (of 32 values) decoded per step; bounds the temporary index tensors."""

__all__ = [
    "BYTES_PER_BLOCK",
    "E8M0_BIAS",
    "FP4_VALUES",
    "VALUES_PER_BLOCK",
    "decode_mxfp4",
    "encode_mxfp4",
]


def decode_mxfp4(
    blocks: torch.Tensor,
    scales: torch.Tensor,
    *,
    dtype: torch.dtype = torch.bfloat16,
    rows_per_chunk: int = DEFAULT_ROWS_PER_CHUNK,
) -> torch.Tensor:
    """Dequantize blocks [..., R, G, 16] and scales [..., R, G] to [..., R, 32 G] in `dtype`.

    Bit-identical to transformers' `convert_moe_packed_tensors` (before its transpose): the
    LUT is built in `dtype` and scaled with `ldexp`, which is exact for in-range powers of two.
    """
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.shape[-1] != BYTES_PER_BLOCK or blocks.shape[:-1] != scales.shape:
        raise ValueError(
            f"blocks must be [..., G, {BYTES_PER_BLOCK}] and scales [..., G]; "
            f"got {tuple(blocks.shape)} and {tuple(scales.shape)}"
        )
    if rows_per_chunk < 1:
        raise ValueError(f"rows_per_chunk must be >= 1, got {rows_per_chunk}")
    *prefix, groups, _ = blocks.shape
    lut = torch.tensor(FP4_VALUES, dtype=dtype, device=blocks.device)
    flat_blocks = blocks.reshape(-1, BYTES_PER_BLOCK)  # [N, 16], N = prod(prefix) * G
    flat_exps = scales.reshape(-1, 1)  # [N, 1]
    out = torch.empty(flat_blocks.shape[0], VALUES_PER_BLOCK, dtype=dtype, device=blocks.device)
    for r0 in range(0, flat_blocks.shape[0], rows_per_chunk):
        blk = flat_blocks[r0 : r0 + rows_per_chunk]  # [n, 16]
        sub = out[r0 : r0 + rows_per_chunk]  # [n, 32] view
        sub[:, 0::2] = lut[(blk & LOW_NIBBLE_MASK).long()]
        sub[:, 1::2] = lut[(blk >> NIBBLE_BITS).long()]
        exp = flat_exps[r0 : r0 + rows_per_chunk].to(torch.int32) - E8M0_BIAS  # [n, 1]
        torch.ldexp(sub, exp, out=sub)
    return out.reshape(*prefix, groups * VALUES_PER_BLOCK)  # [..., R, 32 G]


def encode_mxfp4(
    weight: torch.Tensor, *, rows_per_chunk: int = DEFAULT_ROWS_PER_CHUNK
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize weight [..., R, C] (C a multiple of 32) to (blocks [..., R, C/32, 16], scales).

    ROUND_UP rule of the OpenAI/triton reference quantizer (§2.4): per block, scale =
    2^ceil(log2(amax / 6)) so nothing saturates; codes are the nearest E2M1 value with ties
    away from zero. An all-zero block gets scale byte E8M0_BIAS (2^0). Decoding the result
    reproduces every value that was representable (e.g. any `decode_mxfp4` output) exactly.
    """
    if weight.shape[-1] % VALUES_PER_BLOCK:
        raise ValueError(
            f"last dim must be a multiple of {VALUES_PER_BLOCK}, got shape {tuple(weight.shape)}"
        )
    if not weight.is_floating_point():
        raise ValueError(f"weight must be a floating tensor, got {weight.dtype}")
    *prefix, cols = weight.shape
    groups = cols // VALUES_PER_BLOCK
    flat = weight.reshape(-1, VALUES_PER_BLOCK)  # [N, 32]
    blocks = torch.empty(flat.shape[0], BYTES_PER_BLOCK, dtype=torch.uint8, device=weight.device)
    scales = torch.empty(flat.shape[0], dtype=torch.uint8, device=weight.device)
    midpoints = torch.tensor(_MAGNITUDE_MIDPOINTS, dtype=torch.float32, device=weight.device)
    for r0 in range(0, flat.shape[0], rows_per_chunk):
        x = flat[r0 : r0 + rows_per_chunk].to(torch.float64)  # [n, 32]
        exp = _block_exponents(x)  # [n]
        scales[r0 : r0 + rows_per_chunk] = (exp + E8M0_BIAS).to(torch.uint8)
        scaled = torch.ldexp(x, -exp[:, None]).to(torch.float32)  # [n, 32], |v| <= 6
        magnitude = torch.bucketize(scaled.abs(), midpoints, right=True)  # [n, 32] codes 0..7
        codes = torch.where((scaled < 0) & (magnitude > 0), magnitude + SIGN_CODE, magnitude)
        codes = codes.to(torch.uint8)  # [n, 32]
        blocks[r0 : r0 + rows_per_chunk] = codes[:, 0::2] | (codes[:, 1::2] << NIBBLE_BITS)
    return (
        blocks.reshape(*prefix, groups, BYTES_PER_BLOCK),  # [..., R, G, 16]
        scales.reshape(*prefix, groups),  # [..., R, G]
    )


def _block_exponents(x: torch.Tensor) -> torch.Tensor:
    """Smallest e with max|x| / 2^e <= FP4_MAX per row of x [n, 32] (float64), clamped to E8M0."""
    amax = x.abs().amax(dim=-1)  # [n]
    exp = torch.zeros_like(amax, dtype=torch.int64)
    nonzero = amax > 0
    exp[nonzero] = torch.ceil(torch.log2(amax[nonzero] / FP4_MAX)).to(torch.int64)
    # log2 of a ratio can land one ulp off a power of two; step up where the block would saturate
    exp = torch.where(torch.ldexp(amax, -exp) > FP4_MAX, exp + 1, exp)
    return exp.clamp(-E8M0_BIAS, E8M0_MAX - E8M0_BIAS)
