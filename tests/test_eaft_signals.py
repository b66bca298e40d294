"""EAFT token signals, exact quantiles and class labels against independent computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from versa_kernels.signals import (
    CLASS_CONFLICT,
    CLASS_GOOD,
    CLASS_UNCERTAIN,
    SignalThresholds,
    class_weights,
    classify_tokens,
    exact_quantile,
    signal_thresholds,
    token_signals,
)


def _reference_signals(logits: np.ndarray, targets: np.ndarray, k: int):
    """Plain numpy, row by row, float64: the definitions written out."""
    ps, hs, lps = [], [], []
    for row, t in zip(logits.astype(np.float64), targets, strict=True):
        probs = np.exp(row - row.max())
        probs /= probs.sum()
        ps.append(probs[t])
        lps.append(math.log(probs[t]))
        top = np.sort(probs)[::-1][:k]
        top = top / top.sum()
        ent = -sum(x * math.log(max(x, 1e-300)) for x in top)
        hs.append(ent / math.log(k))
    return np.array(ps), np.array(hs), np.array(lps)


def test_token_signals_match_numpy_definitions():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(37, 300, generator=gen) * 3.0
    targets = torch.randint(0, 300, (37,), generator=gen)
    p, h, logp = token_signals(logits, targets, entropy_top_k=20)
    rp, rh, rlp = _reference_signals(logits.numpy(), targets.numpy(), 20)
    assert p.dtype == torch.float32 and p.shape == (37,)
    np.testing.assert_allclose(p.numpy(), rp, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(h.numpy(), rh, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(logp.numpy(), rlp, rtol=1e-5, atol=1e-5)
    assert float(h.min()) >= 0.0 and float(h.max()) <= 1.0


def test_token_signals_extremes_and_bf16():
    # Uniform logits: H_norm = 1 exactly, p = 1/V. One dominant logit: H_norm ~ 0, p ~ 1.
    uniform = torch.zeros(2, 50)
    p, h, _ = token_signals(uniform, torch.tensor([3, 7]))
    assert torch.allclose(h, torch.ones(2)) and torch.allclose(p, torch.full((2,), 1 / 50))
    peaked = torch.zeros(1, 50)
    peaked[0, 5] = 60.0
    p, h, _ = token_signals(peaked, torch.tensor([5]))
    assert float(p) > 0.999999 and float(h) < 1e-6
    logits = torch.randn(8, 64)
    a = token_signals(logits.bfloat16(), torch.arange(8))
    b = token_signals(logits.bfloat16().float(), torch.arange(8))
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


def test_token_signals_empty_and_bad_input():
    p, h, lp = token_signals(torch.zeros(0, 10), torch.zeros(0, dtype=torch.long))
    assert p.numel() == h.numel() == lp.numel() == 0
    with pytest.raises(ValueError, match="targets must lie in"):
        token_signals(torch.zeros(2, 10), torch.tensor([0, -100]))
    with pytest.raises(ValueError, match="2-D"):
        token_signals(torch.zeros(10), torch.tensor([0]))


def test_exact_quantile_is_inverse_cdf():
    values = torch.tensor([5.0, 1.0, 4.0, 2.0, 3.0, 6.0, 7.0, 8.0, 9.0, 10.0] * 10)
    srt = np.sort(values.numpy())
    for q in (0.0, 0.05, 0.15, 0.5, 0.95, 1.0):
        rank = max(1, math.ceil(round(q * len(srt), 9)))
        assert exact_quantile(values, q) == srt[rank - 1]
        # Definition: at least q*n values are <= the result, and fewer below it.
        thr = exact_quantile(values, q)
        assert (srt <= thr).sum() >= q * len(srt)
        assert (srt < thr).sum() < max(1, q * len(srt)) or q == 0.0
    assert math.isnan(exact_quantile(torch.zeros(0), 0.15))


def test_classes_and_weights_follow_design_rule():
    p = torch.tensor([0.01, 0.9, 0.01, 0.9, 0.5])
    h = torch.tensor([0.01, 0.01, 0.9, 0.9, 0.1])
    thr = SignalThresholds(p_thr=0.1, h_thr=0.1, q=0.15, num_tokens=5)
    labels = classify_tokens(p, h, thr)
    assert labels.tolist() == [
        CLASS_CONFLICT,
        CLASS_GOOD,
        CLASS_UNCERTAIN,
        CLASS_UNCERTAIN,
        CLASS_UNCERTAIN,  # H exactly at the threshold is not "below"
    ]
    assert class_weights(labels).tolist() == [-2.0, 1.0, 0.25, 0.25, 0.25]
    thr2 = signal_thresholds(torch.rand(1000), torch.rand(1000))
    assert thr2.num_tokens == 1000 and 0.0 < thr2.p_thr < 0.3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fused_logsumexp_on_cuda_equals_the_reference() -> None:
    """The Triton log-sum-exp (signals_triton) against torch.logsumexp on gpt-oss's vocabulary."""
    gen = torch.Generator().manual_seed(2)
    logits = (torch.randn(300, 201088, generator=gen) * 3).bfloat16().cuda()
    targets = torch.randint(0, 201088, (300,), generator=gen).cuda()
    fast = token_signals(logits, targets)
    ref = token_signals(logits, targets, fused_lse=False)
    torch.testing.assert_close(fast[2], ref[2], atol=2e-5, rtol=1e-6)  # logp
    torch.testing.assert_close(fast[0], ref[0], atol=1e-9, rtol=2e-5)  # p
    assert torch.equal(fast[1], ref[1])  # H does not use the log-sum-exp
