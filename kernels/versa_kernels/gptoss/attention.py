"""gpt-oss attention pieces: RMSNorm, YaRN rotary embedding, and attention with learned sinks.

Written from gptoss_reference.md §1.5 and checked against transformers' `GptOssAttention`
(eager). Dimension letters: B batch, T tokens, D hidden, N query heads, G key/value heads,
d head size.

What is easy to get wrong:

- Sinks: one learned logit per query head is appended as an extra key column; softmax runs over
  [scores, sink] and the sink column is then dropped, so the weights sum to less than one.
- Sliding window (layer_types[i] == "sliding_attention"): a query at q sees keys k with
  q - window < k <= q, i.e. `window` positions including itself.
- Rotary is half-split (NeoX style: first half / second half of d), not interleaved pairs.
- YaRN blends interpolated and extrapolated frequencies with a linear ramp over
  [low, high] dimensions and scales cos/sin by 0.1 ln(factor) + 1. transformers truncates
  (floors/ceils) the ramp bounds unless `truncate: false`; gpt-oss's config says false.
- Norms run in fp32 and cast back, with the gain applied in fp32 (transformers keeps norm weights
  in fp32 even in a bf16 model).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import torch

log = logging.getLogger(__name__)

DEFAULT_QUERY_CHUNK = 1024
"""Queries per attention chunk: bounds the [N, chunk, T] score tensor for long blocks."""

YARN_DEFAULT_BETA_FAST = 32.0
YARN_DEFAULT_BETA_SLOW = 1.0

__all__ = [
    "DEFAULT_QUERY_CHUNK",
    "apply_rope",
    "banded_attention_with_sinks",
    "rms_norm",
    "rope_cos_sin",
    "sdpa_with_sinks",
    "sdpa_with_sinks_flash",
    "sdpa_with_sinks_fused",
]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in fp32, gain applied in fp32, result cast back to x's dtype."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.float() * x32).to(x.dtype)


def _yarn_inv_freq(
    head_dim: int, theta: float, scaling: Mapping[str, Any]
) -> tuple[torch.Tensor, float]:
    """YaRN inverse frequencies [d/2] and the cos/sin scale (arXiv 2309.00071, §3.2-3.4)."""
    factor = float(scaling["factor"])
    original_context = float(scaling["original_max_position_embeddings"])
    beta_fast = float(scaling.get("beta_fast") or YARN_DEFAULT_BETA_FAST)
    beta_slow = float(scaling.get("beta_slow") or YARN_DEFAULT_BETA_SLOW)
    attention_scale = scaling.get("attention_factor")
    if attention_scale is None:
        attention_scale = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0

    def correction_dim(rotations: float) -> float:
        # The dimension whose wavelength fits `rotations` times into the original context.
        return (
            head_dim
            * math.log(original_context / (rotations * 2 * math.pi))
            / (2 * math.log(theta))
        )

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp

    freq_base = theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # [d/2]
    extrapolated = 1.0 / freq_base
    interpolated = 1.0 / (factor * freq_base)
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep_extrapolated = 1 - ramp  # 1 for high-frequency dims (kept), 0 for low (interpolated)
    inv_freq = interpolated * (1 - keep_extrapolated) + extrapolated * keep_extrapolated
    return inv_freq, float(attention_scale)


def rope_cos_sin(
    positions: torch.Tensor,
    *,
    head_dim: int,
    theta: float,
    scaling: Mapping[str, Any] | None,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [T, d/2] for integer positions [T], computed in fp32 then cast."""
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if scaling and rope_type == "yarn":
        inv_freq, scale = _yarn_inv_freq(head_dim, theta, scaling)
    elif rope_type in ("default", None):
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        scale = 1.0
    else:
        raise ValueError(f"rope_scaling.rope_type must be 'yarn' or 'default', got {rope_type!r}")
    freqs = positions.float()[:, None] * inv_freq.to(positions.device)[None, :]  # [T, d/2]
    return (freqs.cos() * scale).to(dtype), (freqs.sin() * scale).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split rotation of x [B, heads, T, d] by cos/sin [T, d/2]."""
    first, second = x.chunk(2, dim=-1)  # [B, h, T, d/2] each
    return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)


def sdpa_with_sinks(
    Q: torch.Tensor,
    K: torch.Tensor,
    V: torch.Tensor,
    S: torch.Tensor,
    *,
    sm_scale: float,
    sliding_window: int | None,
    query_chunk: int = DEFAULT_QUERY_CHUNK,
) -> torch.Tensor:
    """Causal attention with one learned sink logit per head, optionally banded.

    Q [B, N, T, d], K and V [B, G, T, d] with N a multiple of G (grouped-query attention),
    S [N] sink logits. Returns [B, T, N*d]. Queries are processed in chunks of `query_chunk`
    so the score tensor is [B, N, chunk, T] rather than [B, N, T, T]; a banded layer only
    looks at the keys its window can reach.
    """
    B, N, T, d = Q.shape
    G = K.shape[1]
    K = K.repeat_interleave(N // G, dim=1)  # [B, N, T, d]
    V = V.repeat_interleave(N // G, dim=1)  # [B, N, T, d]
    positions = torch.arange(T, device=Q.device)
    outputs = []
    for start in range(0, T, query_chunk):
        stop = min(start + query_chunk, T)
        key_start = 0 if sliding_window is None else max(0, start - sliding_window + 1)
        q_pos = positions[start:stop, None]  # [c, 1]
        k_pos = positions[None, key_start:stop]  # [1, k]
        visible = k_pos <= q_pos
        if sliding_window is not None:
            visible = visible & (k_pos > q_pos - sliding_window)
        scores = torch.matmul(Q[:, :, start:stop], K[:, :, key_start:stop].transpose(-1, -2))
        scores = scores * sm_scale  # [B, N, c, k]
        scores = scores.masked_fill(~visible, torch.finfo(scores.dtype).min)
        sinks = S.to(scores.dtype).view(1, N, 1, 1).expand(B, N, stop - start, 1)  # [B, N, c, 1]
        logits = torch.cat([scores, sinks], dim=-1)  # [B, N, c, k+1]
        # Subtracting the row max keeps bf16 from overflowing; softmax is unchanged by it.
        logits = logits - logits.max(dim=-1, keepdim=True).values
        probs = torch.softmax(logits, dim=-1)[..., :-1]  # drop the sink column
        outputs.append(torch.matmul(probs.to(V.dtype), V[:, :, key_start:stop]))  # [B, N, c, d]
    out = torch.cat(outputs, dim=2)  # [B, N, T, d]
    return out.transpose(1, 2).reshape(B, T, N * d)  # [B, T, N*d]


def sdpa_with_sinks_fused(
    Q: torch.Tensor,
    K: torch.Tensor,
    V: torch.Tensor,
    S: torch.Tensor,
    *,
    sm_scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    """Same result as `sdpa_with_sinks`, through torch's fused `scaled_dot_product_attention`.

    The sink becomes an extra key at slot 0 that every query sees: queries get one more
    coordinate equal to 1, the sink key is (0, ..., 0, S_h / sm_scale) and its value is zero, so
    its score is exactly S_h and it adds nothing to the output. Used for training (much faster
    than the reference on CPU); in bf16 the division by sm_scale rounds S slightly, so inference
    keeps the reference path. Q [B, N, T, d], K/V [B, G, T, d], S [N] -> [B, T, N*d].
    """
    B, N, T, d = Q.shape
    G = K.shape[1]
    q = torch.cat([Q, Q.new_ones(B, N, T, 1)], dim=-1)  # [B, N, T, d+1]
    k = torch.cat([K, K.new_zeros(B, G, T, 1)], dim=-1)  # [B, G, T, d+1]
    v = torch.cat([V, V.new_zeros(B, G, T, 1)], dim=-1)  # [B, G, T, d+1]
    k = k.repeat_interleave(N // G, dim=1)  # [B, N, T, d+1]
    v = v.repeat_interleave(N // G, dim=1)  # [B, N, T, d+1]
    sink_key = torch.cat([S.new_zeros(N, d), (S / sm_scale)[:, None]], dim=-1).to(
        k.dtype
    )  # [N, d+1]
    k = torch.cat(
        [sink_key.view(1, N, 1, d + 1).expand(B, N, 1, d + 1), k], dim=2
    )  # [B, N, T+1, d+1]
    v = torch.cat([v.new_zeros(B, N, 1, d + 1), v], dim=2)  # [B, N, T+1, d+1]
    positions = torch.arange(T, device=Q.device)
    visible = positions[None, :] <= positions[:, None]  # [T, T]
    if sliding_window is not None:
        visible = visible & (positions[None, :] > positions[:, None] - sliding_window)
    mask = torch.cat([visible.new_ones(T, 1), visible], dim=1)  # [T, T+1], sink always visible
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=sm_scale)
    return out[..., :d].transpose(1, 2).reshape(B, T, N * d)  # [B, T, N*d]


def sdpa_with_sinks_flash(
    Q: torch.Tensor,
    K: torch.Tensor,
    V: torch.Tensor,
    S: torch.Tensor,
    *,
    sm_scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    """Same result as `sdpa_with_sinks`, on fused kernels; what the model runs on CUDA in bf16.

    Full causal layers: flash attention without the sink, which also returns the log-sum-exp
    L of each row's scores; the sink is then applied exactly, since softmax over
    [scores, S] = softmax(scores) * 1 / (1 + e^(S - L)) = softmax(scores) * sigmoid(L - S).
    Banded layers: `banded_attention_with_sinks` (blocks of `window` queries against their
    2 * window keys). Q [B, N, T, d], K/V [B, G, T, d], S [N] -> [B, T, N*d].
    """
    B, N, T, d = Q.shape
    if sliding_window is not None and sliding_window < T:
        if Q.is_cuda and _window_flash_usable(Q.device, Q.dtype):
            return _flash_window_with_sinks(Q, K, V, S, sm_scale=sm_scale, window=sliding_window)
        return banded_attention_with_sinks(Q, K, V, S, sm_scale=sm_scale, window=sliding_window)
    G = K.shape[1]
    k = K.repeat_interleave(N // G, dim=1)  # [B, N, T, d]
    v = V.repeat_interleave(N // G, dim=1)  # [B, N, T, d]
    if Q.is_cuda:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
            Q, k, v, 0.0, True, False, scale=sm_scale
        )[:2]  # [B, N, T, d], [B, N, T] fp32
    else:  # the same kernel family on CPU, so CPU tests exercise the sink correction
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            Q, k, v, 0.0, True, scale=sm_scale
        )
    keep = torch.sigmoid(lse.float() - S.float().view(1, N, 1))  # [B, N, T] mass not on the sink
    out = out * keep.unsqueeze(-1).to(out.dtype)
    return out.transpose(1, 2).reshape(B, T, N * d)  # [B, T, N*d]


def banded_attention_with_sinks(
    Q: torch.Tensor,
    K: torch.Tensor,
    V: torch.Tensor,
    S: torch.Tensor,
    *,
    sm_scale: float,
    window: int,
) -> torch.Tensor:
    """Sliding-window attention with sinks by blocks: O(T * window) work, no Python loop.

    Queries are cut into blocks of `window`; block j's queries can only see keys of blocks j-1
    and j, so each block attends to a [2 * window] key slab (built as a strided view over keys
    padded by `window` zeros in front). The mask (q - window < k <= q, no padded key) and the
    sink column are then applied exactly as in `sdpa_with_sinks`, in the same dtypes.
    Q [B, N, T, d], K/V [B, G, T, d], S [N] -> [B, T, N*d].
    """
    B, N, T, d = Q.shape
    G, W = K.shape[1], window
    nb = -(-T // W)  # blocks of queries
    pad_end = nb * W - T
    q = torch.nn.functional.pad(Q, (0, 0, 0, pad_end)).view(B, G, N // G, nb, W, d)
    k = torch.nn.functional.pad(K, (0, 0, W, pad_end))  # [B, G, (nb+1) W, d]
    v = torch.nn.functional.pad(V, (0, 0, W, pad_end))
    k = k.unfold(2, 2 * W, W)  # [B, G, nb, d, 2W]: block j holds key positions (j-1)W .. (j+1)W-1
    v = v.unfold(2, 2 * W, W).transpose(-1, -2)  # [B, G, nb, 2W, d]
    scores = torch.matmul(q, k.unsqueeze(2)) * sm_scale  # [B, G, N/G, nb, W, 2W]
    i = torch.arange(W, device=Q.device)[:, None]  # query offset in its block
    s = torch.arange(2 * W, device=Q.device)[None, :]  # key slot: position (j-1)W + s
    visible = (s > i) & (s <= i + W)  # [W, 2W]: q - W < k <= q
    first = visible & (s >= W)  # block 0: slots < W are padding before position 0
    mask = torch.cat([first[None], visible[None].expand(nb - 1, W, 2 * W)])  # [nb, W, 2W]
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    sinks = S.to(scores.dtype).view(1, G, N // G, 1, 1, 1).expand(*scores.shape[:-1], 1)
    logits = torch.cat([scores, sinks], dim=-1)  # [B, G, N/G, nb, W, 2W+1]
    logits = logits - logits.max(dim=-1, keepdim=True).values
    probs = torch.softmax(logits, dim=-1)[..., :-1]  # drop the sink column
    out = torch.matmul(probs.to(V.dtype), v.unsqueeze(2))  # [B, G, N/G, nb, W, d]
    out = out.reshape(B, N, nb * W, d)[:, :, :T]  # [B, N, T, d]
    return out.transpose(1, 2).reshape(B, T, N * d)


_WINDOW_FLASH_OK: dict[tuple[torch.device, torch.dtype], bool] = {}
WINDOW_CHECK_TOLERANCE = 2e-2
"""Max |flash - banded| / max |banded| accepted by the one-time check (bf16 rounding)."""


def _flash_window_with_sinks(
    Q: torch.Tensor,
    K: torch.Tensor,
    V: torch.Tensor,
    S: torch.Tensor,
    *,
    sm_scale: float,
    window: int,
) -> torch.Tensor:
    """Banded layers on the CUDA flash kernel's own sliding window (keys q - window < k <= q).

    Same sink correction as the full layers. Q [B, N, T, d], K/V [B, G, T, d] -> [B, T, N*d].
    """
    B, N, T, d = Q.shape
    G = K.shape[1]
    q = Q.transpose(1, 2).contiguous()  # [B, T, N, d]: the flash kernel's layout
    k = K.repeat_interleave(N // G, dim=1).transpose(1, 2).contiguous()
    v = V.repeat_interleave(N // G, dim=1).transpose(1, 2).contiguous()
    out, lse = torch.ops.aten._flash_attention_forward(
        q, k, v, None, None, T, T, 0.0, True, False, scale=sm_scale,
        window_size_left=window - 1, window_size_right=0,
    )[:2]  # [B, T, N, d], [B, N, T]  # fmt: skip
    keep = torch.sigmoid(lse.float() - S.float().view(1, N, 1)).transpose(1, 2)  # [B, T, N]
    return (out * keep.unsqueeze(-1).to(out.dtype)).reshape(B, T, N * d)


def _window_flash_usable(device: torch.device, dtype: torch.dtype) -> bool:
    """Checked once per device and dtype against `banded_attention_with_sinks` (which stays the
    path if the kernel is missing or disagrees)."""
    key = (device, dtype)
    if key not in _WINDOW_FLASH_OK:
        ok = False
        try:
            gen = torch.Generator().manual_seed(0)
            q, k, v = (torch.randn(1, h, 300, 64, generator=gen) for h in (8, 2, 2))
            q, k, v = (t.to(device=device, dtype=dtype) for t in (q, k, v))
            sinks = torch.randn(8, generator=gen).to(device=device, dtype=dtype)
            ref = banded_attention_with_sinks(q, k, v, sinks, sm_scale=0.125, window=128).float()
            got = _flash_window_with_sinks(q, k, v, sinks, sm_scale=0.125, window=128).float()
            err = ((got - ref).abs().max() / ref.abs().max()).item()
            ok = err < WINDOW_CHECK_TOLERANCE
            if not ok:
                log.warning("flash sliding window disagrees with the banded path (%.2e)", err)
        except Exception as exc:  # an older torch without window_size_left
            log.warning("flash sliding window unavailable (%s); using the banded path", exc)
        _WINDOW_FLASH_OK[key] = ok
    return _WINDOW_FLASH_OK[key]
