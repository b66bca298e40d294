"""Greedy decoding with a KV cache on the project's own gpt-oss forward (the "native" engine).

`decode_bench` uses this when neither SGLang nor vLLM is installed on the target; it is also the
yardstick that says a pruned checkpoint still *runs* autoregressively. It reuses the layers of
`GptOssModel` (same weights, same attention-with-sinks and MoE math) and adds only the cache.

Dimension letters: B batch, T new tokens this step, S cached tokens, N query heads, G key/value
heads, d head dim, D hidden, V vocabulary.

What is easy to get wrong:
- Keys are cached *after* RoPE, so a cached key never needs re-rotating.
- A sliding layer's query at position q sees keys in (q - window, q], itself included, so the
  cache of such a layer only ever needs its last `window` keys; full layers keep everything.
- The sink logit is one extra softmax column per head that is dropped after the softmax, so the
  attention weights of a row sum to less than one (exactly as in `attention.sdpa_with_sinks`).
- The reference for this module is the full forward re-run on the whole sequence each step
  (`greedy_reference`); tests assert both pick the same tokens and agree on the logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from versa_kernels.errors import ParameterError
from versa_kernels.gptoss.attention import apply_rope, rope_cos_sin
from versa_kernels.gptoss.model import GptOssModel

__all__ = ["KVCache", "greedy_generate", "greedy_reference", "prefill", "decode_step"]


@dataclass
class KVCache:
    """Post-RoPE keys and values per layer, [B, G, S, d] each; `length` = positions seen so far."""

    keys: list[torch.Tensor | None] = field(default_factory=list)
    values: list[torch.Tensor | None] = field(default_factory=list)
    length: int = 0


def _attend(
    attn: torch.nn.Module,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cache: KVCache,
    layer: int,
) -> torch.Tensor:
    """One attention layer over [cached keys, new keys] for the new tokens x [B, T, D]."""
    B, T, _ = x.shape
    N, G, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
    q = attn.q_proj(x).view(B, T, N, d).transpose(1, 2)  # [B, N, T, d]
    k = attn.k_proj(x).view(B, T, G, d).transpose(1, 2)  # [B, G, T, d]
    v = attn.v_proj(x).view(B, T, G, d).transpose(1, 2)  # [B, G, T, d]
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    past_k, past_v = cache.keys[layer], cache.values[layer]
    S = 0 if past_k is None else past_k.shape[2]
    if past_k is not None:
        k = torch.cat([past_k, k], dim=2)  # [B, G, S+T, d]
        v = torch.cat([past_v, v], dim=2)  # [B, G, S+T, d]
    # Absolute positions: the cache holds the last S positions before this step.
    q_pos = torch.arange(cache.length, cache.length + T, device=x.device)[:, None]  # [T, 1]
    k_pos = torch.arange(cache.length - S, cache.length + T, device=x.device)[None, :]  # [1, S+T]
    visible = k_pos <= q_pos
    if attn.sliding_window is not None:
        visible = visible & (k_pos > q_pos - attn.sliding_window)
    k_rep = k.repeat_interleave(N // G, dim=1)  # [B, N, S+T, d]
    v_rep = v.repeat_interleave(N // G, dim=1)  # [B, N, S+T, d]
    scores = torch.matmul(q, k_rep.transpose(-1, -2)) * d**-0.5  # [B, N, T, S+T]
    scores = scores.masked_fill(~visible, torch.finfo(scores.dtype).min)
    sinks = attn.sinks.to(scores.dtype).view(1, N, 1, 1).expand(B, N, T, 1)  # [B, N, T, 1]
    logits = torch.cat([scores, sinks], dim=-1)  # [B, N, T, S+T+1]
    logits = logits - logits.max(dim=-1, keepdim=True).values
    probs = torch.softmax(logits, dim=-1)[..., :-1]  # drop the sink column
    out = torch.matmul(probs.to(v_rep.dtype), v_rep)  # [B, N, T, d]
    if attn.sliding_window is not None:
        # Keys older than the window can never be seen again by later queries.
        k, v = k[:, :, -(attn.sliding_window - 1) :], v[:, :, -(attn.sliding_window - 1) :]
    cache.keys[layer], cache.values[layer] = k, v
    return attn.o_proj(out.transpose(1, 2).reshape(B, T, N * d))


def _step(model: GptOssModel, input_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Run new tokens [B, T] through every layer with the cache; return last logits [B, V]."""
    B, T = input_ids.shape
    config = model.config
    x = model.model.embed_tokens(input_ids)  # [B, T, D]
    positions = torch.arange(cache.length, cache.length + T, device=input_ids.device)
    cos, sin = rope_cos_sin(
        positions,
        head_dim=config.head_dim,
        theta=config.rope_theta,
        scaling=config.rope_scaling,
        dtype=x.dtype,
    )  # [T, d/2] each
    if not cache.keys:
        cache.keys = [None] * len(model.model.layers)
        cache.values = [None] * len(model.model.layers)
    for index, layer in enumerate(model.model.layers):
        x = x + _attend(layer.self_attn, layer.input_layernorm(x), cos, sin, cache, index)
        h = layer.post_attention_layernorm(x).reshape(B * T, -1)  # [B*T, D]
        out, _, _, _ = layer.mlp(h, top_k=model.top_k, expert_mask=None)
        x = x + out.view(B, T, -1)
    cache.length += T
    return model.lm_head(model.model.norm(x[:, -1]))  # [B, V]


@torch.inference_mode()
def prefill(model: GptOssModel, input_ids: torch.Tensor) -> tuple[torch.Tensor, KVCache]:
    """Process the prompt [B, T]; return the logits of its last position [B, V] and the cache."""
    cache = KVCache()
    return _step(model, input_ids, cache), cache


@torch.inference_mode()
def decode_step(model: GptOssModel, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Feed one token per sequence [B]; return next-token logits [B, V] (cache updated)."""
    return _step(model, tokens[:, None], cache)


@torch.inference_mode()
def greedy_generate(
    model: GptOssModel, input_ids: torch.Tensor, max_new_tokens: int
) -> torch.Tensor:
    """Greedy continuation [B, max_new_tokens] of input_ids [B, T] (no early stop on EOS)."""
    if max_new_tokens < 1:
        raise ParameterError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    logits, cache = prefill(model, input_ids)
    tokens = [logits.argmax(dim=-1)]  # each [B]
    for _ in range(max_new_tokens - 1):
        tokens.append(decode_step(model, tokens[-1], cache).argmax(dim=-1))
    return torch.stack(tokens, dim=1)  # [B, max_new_tokens]


@torch.inference_mode()
def greedy_reference(
    model: GptOssModel, input_ids: torch.Tensor, max_new_tokens: int
) -> torch.Tensor:
    """The same continuation by re-running the full forward each step (slow; for tests)."""
    sequence = input_ids
    for _ in range(max_new_tokens):
        hidden = model(sequence).hidden[:, -1]  # [B, D]
        sequence = torch.cat([sequence, model.logits(hidden).argmax(dim=-1)[:, None]], dim=1)
    return sequence[:, input_ids.shape[1] :]
