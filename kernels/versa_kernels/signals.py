"""EAFT per-token signals: probability of the real next token, top-K entropy, quality classes.

What this implements (EAFT, arXiv 2601.02151 §3; eaftreap_spec §2.3 and §6.4; DESIGN.md):

- `token_signals`: for each prediction (a row of logits and the token that actually came next)
  p = P(target), logp = log P(target) over the **full** vocabulary, and H_norm = entropy of the
  top-K distribution renormalized to sum 1, divided by ln K (K = 20 by default), so H_norm is in
  [0, 1].
- `exact_quantile` / `signal_thresholds`: the 15% quantiles of p and H_norm, taken exactly over
  every kept token (an order statistic, not a histogram bin edge; eaftreap_spec §11.3 item 18).
- `classify_tokens` / `class_weights`: confident conflict / good / uncertain labels and the
  EAFT-REAP weights attached to them.

Easy to get wrong:

- p and logp use the softmax over the whole vocabulary; only the entropy uses the top-K
  renormalized distribution. Mixing the two changes PPL.
- The prediction made at position t is about token t+1. Callers pass logits[t] with targets =
  input_ids[t+1]; the quality class then weights position t (the hidden state that predicted).
- Class rule (DESIGN.md): conflict = p < p_thr and H < h_thr; good = p >= p_thr and H < h_thr;
  everything else (H >= h_thr) is uncertain. Both thresholds are quantiles at the same q (0.15).
- Everything is computed in float32 (entropy of the K candidates in float64) whatever the logits
  dtype, so bf16 logits give the same signals as their float32 upcast.

Dimension letters: N predictions (kept tokens), V vocabulary, K entropy top-k.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from versa_kernels.signals_triton import logsumexp_rows, triton_lse_usable

__all__ = [
    "CC_QUANTILE",
    "CLASS_CONFLICT",
    "CLASS_GOOD",
    "CLASS_UNCERTAIN",
    "ENTROPY_TOP_K",
    "SignalThresholds",
    "W_CONFLICT",
    "W_GOOD",
    "W_UNCERTAIN",
    "class_weights",
    "classify_tokens",
    "exact_quantile",
    "signal_thresholds",
    "token_signals",
]

ENTROPY_TOP_K = 20  # EAFT paper: top-20 entropy correlates ~0.999 with the full entropy
CC_QUANTILE = 0.15  # bottom 15% of p and of H (EAFT pilot; eaftreap_spec Appendix A)

# Class labels stored as small ints so a per-token label tensor stays 1 byte per token.
CLASS_GOOD = 0
CLASS_UNCERTAIN = 1
CLASS_CONFLICT = 2

# EAFT-REAP class weights (eaftreap_spec §2.3, Appendix A); callers may pass others.
W_GOOD = 1.0
W_UNCERTAIN = 0.25
W_CONFLICT = -2.0


def token_signals(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    entropy_top_k: int = ENTROPY_TOP_K,
    fused_lse: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-prediction (p, H_norm, logp) from logits [N, V] and the actual next tokens [N].

    On CUDA the log-sum-exp runs in `signals_triton` (one read of the logits); elsewhere, or
    with `fused_lse=False`, `torch.logsumexp` over an fp32 copy (the reference).

    Why: p says whether the model expected the real token; H_norm says how sure it was of
    anything. Low p with low H is a confident conflict (the model is sure of something else).

    Masking: this function scores every row it is given. Completion-only scoring is the
    caller's job: select the kept rows (and their targets) before calling, so no ignore index
    exists here; every target must lie in [0, V).

    Units: p in [0, 1]; logp in nats (<= 0); H_norm in [0, 1] (entropy in nats / ln K'), where
    K' = min(entropy_top_k, V). With K' == 1 the entropy is defined as 0.

    Empty case: N == 0 returns three empty float32 tensors on the logits' device.

    Returns float32 tensors of shape [N] each: (p, H_norm, logp).
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D [N, V], got shape {tuple(logits.shape)}")
    if targets.dim() != 1 or targets.shape[0] != logits.shape[0]:
        raise ValueError(
            f"targets must be 1-D [N] with N={logits.shape[0]}, got shape {tuple(targets.shape)}"
        )
    if entropy_top_k < 1:
        raise ValueError(f"entropy_top_k must be >= 1, got {entropy_top_k}")
    n_rows, vocab = logits.shape
    if n_rows == 0:
        empty = torch.empty(0, dtype=torch.float32, device=logits.device)
        return empty, empty.clone(), empty.clone()
    targets = targets.to(device=logits.device, dtype=torch.long)
    if int(targets.min()) < 0 or int(targets.max()) >= vocab:
        raise ValueError(
            f"targets must lie in [0, {vocab}); got range [{int(targets.min())}, "
            f"{int(targets.max())}] (drop masked positions before calling)"
        )

    if fused_lse and triton_lse_usable(logits):
        log_z = logsumexp_rows(logits)  # [N] fp32, one read of the logits
    else:
        log_z = torch.logsumexp(logits.float(), dim=-1)  # [N], the reference
    logp = logits.gather(1, targets[:, None]).squeeze(1).float() - log_z  # [N]
    p = logp.exp()

    k = min(entropy_top_k, vocab)
    # On the logits as given: upcasting is exact and keeps the order, and a bf16 top-k reads
    # half the bytes of the fp32 copy.
    top = torch.topk(logits, k, dim=-1).values.double()  # [N, K]
    log_q = torch.log_softmax(top, dim=-1)  # [N, K], renormalized over the top-K only
    entropy = -(log_q.exp() * log_q).sum(dim=-1)  # [N], nats
    if k > 1:
        h_norm = (entropy / math.log(k)).clamp_(0.0, 1.0).float()
    else:
        h_norm = torch.zeros(n_rows, dtype=torch.float32, device=logits.device)
    return p, h_norm, logp


def exact_quantile(values: torch.Tensor, q: float) -> float:
    """Exact q-quantile of all `values`: the smallest value v with at least q*n values <= v.

    This is the inverse empirical CDF (Hyndman-Fan type 1, no interpolation), so the threshold is
    always one of the observed values and a CC count using it is reproducible bit for bit. It is
    computed on the full set given (every kept token), never from histogram bins.

    Empty input returns NaN (no threshold exists); q must lie in [0, 1].
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must lie in [0, 1], got {q}")
    flat = values.reshape(-1)
    n = flat.numel()
    if n == 0:
        return float("nan")
    # round() guards against q*n = 15.000000000000002 turning into rank 16.
    rank = max(1, math.ceil(round(q * n, 9)))
    return float(torch.kthvalue(flat.float().cpu(), rank).values)


@dataclass(frozen=True)
class SignalThresholds:
    """Quantile thresholds that split tokens into quality classes (both at quantile `q`)."""

    p_thr: float
    h_thr: float
    q: float
    num_tokens: int


def signal_thresholds(
    p: torch.Tensor, h_norm: torch.Tensor, *, q: float = CC_QUANTILE
) -> SignalThresholds:
    """Exact q-quantiles of p and H_norm over all given (kept) tokens."""
    if p.numel() != h_norm.numel():
        raise ValueError(f"p and h_norm differ in size: {p.numel()} vs {h_norm.numel()}")
    return SignalThresholds(
        p_thr=exact_quantile(p, q), h_thr=exact_quantile(h_norm, q), q=q, num_tokens=p.numel()
    )


def classify_tokens(
    p: torch.Tensor, h_norm: torch.Tensor, thresholds: SignalThresholds
) -> torch.Tensor:
    """Quality class per token (CLASS_GOOD / CLASS_UNCERTAIN / CLASS_CONFLICT) as int8 [N].

    conflict: p < p_thr and H < h_thr; good: p >= p_thr and H < h_thr; uncertain: H >= h_thr.
    """
    low_h = h_norm < thresholds.h_thr
    labels = torch.full(p.shape, CLASS_UNCERTAIN, dtype=torch.int8, device=p.device)
    labels[low_h & (p < thresholds.p_thr)] = CLASS_CONFLICT
    labels[low_h & (p >= thresholds.p_thr)] = CLASS_GOOD
    return labels


def class_weights(
    labels: torch.Tensor,
    *,
    w_good: float = W_GOOD,
    w_uncertain: float = W_UNCERTAIN,
    w_conflict: float = W_CONFLICT,
) -> torch.Tensor:
    """Per-token EAFT-REAP weight (float32 [N]) from class labels."""
    table = torch.tensor(
        [w_good, w_uncertain, w_conflict], dtype=torch.float32, device=labels.device
    )
    return table[labels.long()]  # [N]
