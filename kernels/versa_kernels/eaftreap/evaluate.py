"""Does the prune hold up? Completion-only perplexity of EAFT-REAP vs frequency vs random.

Pruning is emulated with the forward's ``router_mask`` (removed experts' router logits masked),
which equals slicing them out (gptoss_reference §1.10, checked by tests/test_eaftreap_rewrite.py),
so every candidate is evaluated on the same loaded model and the same held-out rows.

Completion-only PPL: ``exp(mean NLL)`` over every position whose next token is inside assistant
content, in nats per token; the prediction of token t+1 comes from the logits at t. Baselines keep
the same number of experts per layer as the EAFT-REAP allocation: *frequency* keeps the most
often routed experts (REAP's ``count``), *random* draws a uniform subset per layer (mean over
seeds). Empty input raises (no PPL exists).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from versa_kernels.eaftreap.profile import LOGIT_CHUNK_TOKENS, CalibExample, model_device, pad_batch

__all__ = ["compare_baselines", "completion_ppl", "keep_masks"]


def keep_masks(
    kept: Sequence[Sequence[int]], experts_per_layer: Sequence[int]
) -> list[torch.Tensor]:
    """Bool router masks ``[E_l]`` (True = kept) from kept id lists."""
    masks = []
    for ids, n in zip(kept, experts_per_layer, strict=True):
        mask = torch.zeros(n, dtype=torch.bool)
        mask[list(ids)] = True
        masks.append(mask)
    return masks


def completion_ppl(
    model: Any,
    examples: Sequence[CalibExample],
    *,
    batch_size: int = 1,
    pad_id: int = 0,
    router_mask: Sequence[torch.Tensor] | None = None,
) -> float:
    """Completion-only perplexity of ``model`` (optionally masked) over ``examples``."""
    from versa_kernels.signals import token_signals

    device = model_device(model)
    masks = None if router_mask is None else [m.to(device) for m in router_mask]
    nll, tokens = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(examples), batch_size):
            ids, flat = pad_batch(list(examples[start : start + batch_size]), pad_id)
            if len(flat) == 0:
                continue
            out = model(ids.to(device), router_mask=masks)
            hidden = out.hidden.reshape(-1, out.hidden.shape[-1])[flat.to(device)]  # [N, D]
            targets = ids.reshape(-1)[flat + 1].to(device)  # [N]
            for s in range(0, len(flat), LOGIT_CHUNK_TOKENS):
                logits = model.logits(hidden[s : s + LOGIT_CHUNK_TOKENS]).float()  # [n, V]
                _, _, logp = token_signals(logits, targets[s : s + LOGIT_CHUNK_TOKENS])
                nll -= float(logp.double().sum())
            tokens += len(flat)
    if tokens == 0:
        raise ValueError("no completion tokens to evaluate")
    return math.exp(nll / tokens)


def compare_baselines(
    model: Any,
    examples: Sequence[CalibExample],
    *,
    kept: Sequence[Sequence[int]],
    count: np.ndarray,
    experts_per_layer: Sequence[int],
    random_seeds: int = 5,
    batch_size: int = 1,
    pad_id: int = 0,
) -> dict[str, Any]:
    """PPL of base, EAFT-REAP, frequency and random pruning with the same per-layer counts."""
    counts = [len(ids) for ids in kept]

    def ppl(k: Sequence[Sequence[int]] | None) -> float:
        mask = None if k is None else keep_masks(k, experts_per_layer)
        return completion_ppl(
            model, examples, batch_size=batch_size, pad_id=pad_id, router_mask=mask
        )

    frequency = [
        sorted(int(e) for e in np.argsort(-count[layer, :n], kind="stable")[: counts[layer]])
        for layer, n in enumerate(experts_per_layer)
    ]
    random_ppl = []
    for seed in range(random_seeds):
        rng = np.random.default_rng(seed)
        draw = [
            sorted(int(e) for e in rng.choice(n, size=counts[layer], replace=False))
            for layer, n in enumerate(experts_per_layer)
        ]
        random_ppl.append(ppl(draw))
    return {
        "tokens_rows": len(examples),
        "base_ppl": ppl(None),
        "eaftreap_ppl": ppl(kept),
        "frequency_ppl": ppl(frequency),
        "random_ppl": random_ppl,
        "random_ppl_mean": float(np.mean(random_ppl)) if random_ppl else float("nan"),
        "random_seeds": random_seeds,
    }
