"""One-pass EAFT-REAP profiling against the exact two-pass method (the reference).

On the committed trained tiny model (real routing and real signal spread), the one-pass method
must give every accumulator of the two-pass method up to float64 summation order, rank the
experts identically under every score key, keep far fewer per-token records than tokens, and
resume after a crash to the same result.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
import versa_kernels
from versa_kernels.eaftreap.profile import CalibExample, profile_experts
from versa_kernels.eaftreap.profile_onepass import OnePassAccumulator
from versa_kernels.eaftreap.scoring import SCORE_KEYS, EaftWeights, ExpertAccumulators
from versa_kernels.gptoss.model import GptOssModel

TRAINED = Path(versa_kernels.__file__).parent / "data" / "tiny_moe_trained"
SEQ, ROWS = 128, 16
SUM_ORDER_RTOL = 1e-12  # float64 sums of the same terms in another order


@pytest.fixture(scope="module")
def trained() -> tuple[GptOssModel, list[CalibExample]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TRAINED)
    text = (Path(sysconfig.get_paths()["stdlib"]) / "logging/handlers.py").read_text("utf-8")
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"][: ROWS * SEQ])
    gen = torch.Generator().manual_seed(0)
    examples = []
    for row in ids.view(ROWS, SEQ):
        # Score a random ~70% of positions, as completion masks leave prompts out.
        keep = torch.rand(SEQ - 1, generator=gen) < 0.7
        examples.append(CalibExample(row, torch.nonzero(keep).flatten()))
    return GptOssModel.from_checkpoint(TRAINED), examples


def _profile(model, examples, **kwargs):
    L, E = model.config.num_hidden_layers, max(model.experts_per_layer)
    return profile_experts(model, examples, num_layers=L, num_experts=E, batch_size=2, **kwargs)


def test_one_pass_equals_two_pass_and_ranks_identically(trained) -> None:
    model, examples = trained
    one = _profile(model, examples, method="one_pass")
    two = _profile(model, examples, method="two_pass")
    assert (one.p_lo, one.h_lo, one.h_hi) == (two.p_lo, two.h_lo, two.h_hi)
    assert one.region_counts == two.region_counts and one.region_counts["conflict"] > 0
    for a, b in ((one.acc, two.acc), *zip(one.halves, two.halves, strict=True)):
        for name, value in a.state().items():
            ref = b.state()[name]
            if name.endswith("count"):
                assert np.array_equal(value, ref), name  # counts are exact
            np.testing.assert_allclose(
                value,
                ref,
                rtol=SUM_ORDER_RTOL,
                atol=SUM_ORDER_RTOL * np.abs(ref).max(),
                err_msg=name,
            )
    for key in SCORE_KEYS:
        ranks_one = np.argsort(-one.acc.score(key), axis=1, kind="stable")
        ranks_two = np.argsort(-two.acc.score(key), axis=1, kind="stable")
        assert np.array_equal(ranks_one, ranks_two), key


def test_records_are_bounded_and_the_bound_never_drops_a_needed_token() -> None:
    """Synthetic batches: the finished sums equal a brute-force two-pass accumulation."""
    gen = torch.Generator().manual_seed(1)
    L, E, K, batches, n = 3, 6, 2, 12, 50
    weights = EaftWeights()
    data = []
    for _ in range(batches):
        idx = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(L * n)]).view(
            L, n, K
        )
        data.append(
            (idx, torch.rand(L, n, K, generator=gen), torch.rand(L, n, K, generator=gen) * 3,
             torch.rand(n, generator=gen), torch.rand(n, generator=gen) ** 3,
             torch.rand(n, generator=gen) < 0.5)
        )  # fmt: skip
    state = OnePassAccumulator.new_state(L, E)
    acc = OnePassAccumulator(state, total_tokens=batches * n, cc_quantile=weights.cc_quantile)
    seen_h: list[np.ndarray] = []
    for idx, gates, norms, p, h, odd in data:
        seen_h.append(h.numpy())
        acc.add_batch(idx, gates, norms, p, h, odd, seen_h)
    kept = sum(len(r["h"]) for r in state["records"])
    assert kept < 0.5 * batches * n  # ~15% of the tokens, not all of them
    p_all = torch.cat([d[3] for d in data])
    h_all = torch.cat([d[4] for d in data])
    thr = weights.thresholds(p_all, h_all)
    total, halves = acc.finish(thr, weights)
    brute = [ExpertAccumulators.zeros(L, E) for _ in range(3)]
    for idx, gates, norms, p, h, odd in data:
        _, w = weights.token_weights(p, h, thr)
        for layer in range(L):
            for target, sel in zip(brute, (torch.ones_like(odd), ~odd, odd), strict=True):
                target.add(layer, idx[layer][sel], gates[layer][sel], norms[layer][sel], w[sel])
    for ours, ref in zip((total, *halves), brute, strict=True):
        for name, value in ref.state().items():
            np.testing.assert_allclose(ours[name], value, rtol=1e-12, atol=1e-12, err_msg=name)


def test_one_pass_resumes_after_a_crash_with_the_same_result(trained, tmp_path: Path) -> None:
    model, examples = trained
    clean = _profile(model, examples)
    state = tmp_path / "state.pt"

    def crash(pass_no: int, done: int, total: int) -> None:
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _profile(model, examples, state_path=state, save_every_batches=1, on_batch=crash)
    seen: list[int] = []
    resumed = _profile(
        model, examples, state_path=state, save_every_batches=1,
        on_batch=lambda p, d, t: seen.append(d),
    )  # fmt: skip
    assert resumed.resumed_from_batch == 3 and seen == list(range(4, ROWS // 2 + 1))
    for name, value in clean.acc.state().items():
        assert np.array_equal(getattr(resumed.acc, name), value), name
    finished = torch.load(state, weights_only=True)
    assert "onepass" not in finished and not finished["p"]  # a finished state stays small
    with pytest.raises(ValueError, match="method='three_pass' is not allowed"):
        _profile(model, examples, method="three_pass")
