"""Keep allocation: exact budgets, bounds, safety core, uniform multiple-of, infeasible flags."""

from __future__ import annotations

import numpy as np
import pytest
from versa_kernels.eaftreap.allocation import (
    budget_keep_counts,
    check_feasible,
    core_experts,
    neff,
    select_experts,
    share_keep_counts,
    uniform_keep_n,
)
from versa_kernels.errors import ParameterError


def _plan(**overrides):
    args = dict(num_layers=24, num_experts=32, top_k=4, keep_frac=0.75, min_keep=16, max_keep=32)
    args.update(overrides)
    return check_feasible(**args)


def test_neff_is_scale_free_and_measures_spread() -> None:
    assert neff([1, 1, 1, 1]) == pytest.approx(4.0)
    assert neff([5, 0, 0, 0]) == pytest.approx(1.0)
    assert neff(np.array([3.0, 1.0]) * 1e6) == pytest.approx(neff([3.0, 1.0]))


@pytest.mark.parametrize("seed", range(6))
def test_budget_is_exact_within_bounds_and_follows_spread(seed: int) -> None:
    rng = np.random.default_rng(seed)
    # Layers differ in concentration and in scale (scores grow ~300x with depth, spec §2.4).
    conc = rng.uniform(0.2, 3.0, size=24)
    mass = np.stack([rng.dirichlet(np.full(32, c)) * 10 ** (i / 6) for i, c in enumerate(conc)])
    plan = _plan()
    counts, neffs = budget_keep_counts(mass, plan)
    assert sum(counts) == plan.budget == round(0.75 * 24 * 32) == 576
    assert all(16 <= c <= 32 for c in counts)
    # More spread (higher neff) never gets fewer experts than a more concentrated layer.
    order = np.argsort(neffs)
    assert all(counts[a] <= counts[b] for a, b in zip(order, order[1:], strict=False))


def test_budget_hits_the_bounds_and_stays_exact() -> None:
    mass = np.ones((4, 8))
    mass[0] = [100, 0, 0, 0, 0, 0, 0, 0]  # one expert carries everything: pinned at min
    plan = check_feasible(
        num_layers=4,
        num_experts=8,
        top_k=2,
        keep_frac=0.8,
        min_keep=3,
        max_keep=8,
        core_pos_top_m=2,
    )
    counts, _ = budget_keep_counts(mass, plan)
    assert counts[0] == 3 and sum(counts) == round(0.8 * 32) and max(counts) <= 8


def test_uniform_layout_is_a_multiple_of_four() -> None:
    assert uniform_keep_n(0.75, 32, 4) == 24
    assert uniform_keep_n(0.60, 32, 4) == 20  # ceil(19.2) = 20
    assert uniform_keep_n(0.97, 30, 4) == 28  # rounding up would pass E: round down instead
    plan = _plan(layout="uniform", keep_frac=0.6)
    counts, _ = budget_keep_counts(np.ones((24, 32)), plan)
    assert counts == [20] * 24 and plan.budget == 480


def test_core_is_always_kept_and_ids_are_ascending() -> None:
    scores = np.array([[9.0, 8, 7, 6, 5, 4, 3, 0.1]])  # expert 7 ranks last
    pos_mass = np.array([[0.0, 0, 0, 0, 0, 0, 0, 99]])  # ...but holds the positive-token mass
    count = np.array([[1, 1, 1, 1, 1, 50, 1, 1]])
    cores = core_experts(pos_mass, count, pos_top_m=1, count_top_m=1)
    assert cores == [[5, 7]]
    kept = select_experts(scores, [4], cores)
    assert kept == [[0, 1, 5, 7]]
    assert select_experts(scores, [4], [[]]) == [[0, 1, 2, 3]]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"min_keep": 20, "max_keep": 16},
            "min_keep_per_layer=20 is larger than max_keep_per_layer=16",
        ),
        ({"min_keep": 28}, r"budget round\(keep_frac\*L\*E\)=576 is outside .*=\[672, 768\]"),
        ({"keep_frac": 0.3}, r"budget round\(keep_frac\*L\*E\)=230 is outside .*=\[384, 768\]"),
        ({"min_keep": 2}, "min_keep_per_layer=2 is below the router top_k=4"),
        ({"min_keep": 40, "max_keep": 40}, "min_keep_per_layer=40 exceeds the model's 32 experts"),
        ({"core_pos_top_m": 12, "core_count_top_m": 8}, "safety core up to .*=20 experts exceeds"),
        (
            {"layout": "uniform", "keep_frac": 0.25},
            r"uniform keep_n=8 .* outside \[min_keep_per_layer=16",
        ),
        ({"layout": "ragged"}, "layout='ragged' is not one of per-layer, uniform"),
        ({"keep_frac": 1.5}, r"keep_frac=1.5 must be in \(0, 1\]"),
        ({"core_pos_top_m": 33}, r"core_pos_top_m=33 must be in \[0, 32\]"),
    ],
)
def test_infeasible_combinations_are_errors(overrides: dict, message: str) -> None:
    with pytest.raises(ParameterError, match=message):
        _plan(**overrides)


def test_playbook_defaults_are_feasible_and_a_cap_above_e_is_the_effective_e() -> None:
    plan = _plan(core_pos_top_m=4, core_count_top_m=0)
    assert (plan.min_keep, plan.max_keep, plan.budget) == (16, 32, 576)
    small = check_feasible(num_layers=4, num_experts=8, top_k=4, keep_frac=0.75, max_keep=32)
    assert small.max_keep == 8 and small.min_keep == 4


@pytest.mark.parametrize("seed", range(4))
def test_share_budget_is_one_global_ranking_of_layer_shares(seed: int) -> None:
    rng = np.random.default_rng(seed)
    conc = rng.uniform(0.2, 3.0, size=24)
    mass = np.stack([rng.dirichlet(np.full(32, c)) * 10 ** (i / 6) for i, c in enumerate(conc)])
    plan = _plan(min_keep=4)
    counts = share_keep_counts(mass, plan)
    assert sum(counts) == plan.budget and all(4 <= c <= 32 for c in counts)
    # Brute force: every layer's top min_keep, then the largest remaining shares over all layers.
    shares = mass / mass.sum(axis=1, keepdims=True)
    rest = np.sort(np.concatenate([np.sort(r)[::-1][4:] for r in shares]))[::-1]
    threshold = rest[plan.budget - 24 * 4 - 1]  # the smallest share that was still kept
    for layer, c in enumerate(counts):
        ordered = np.sort(shares[layer])[::-1]
        assert c == 4 or ordered[c - 1] >= threshold
        assert c == 32 or ordered[c] <= threshold
    # Scale-free: multiplying one layer's mass changes nothing.
    scaled = mass.copy()
    scaled[3] *= 1e6
    assert share_keep_counts(scaled, plan) == counts


def test_share_budget_gives_a_concentrated_layer_fewer_experts() -> None:
    flat, peaked = np.ones(16), np.array([100.0] * 4 + [1.0] * 12)
    plan = check_feasible(num_layers=2, num_experts=16, top_k=4, keep_frac=0.625)
    assert share_keep_counts([flat, peaked], plan) == [16, 4]  # budget 20
    assert share_keep_counts([np.zeros(16), peaked], plan) == [16, 4]  # no mass = uniform shares
    uniform = check_feasible(
        num_layers=2, num_experts=16, top_k=4, keep_frac=0.625, layout="uniform"
    )
    assert share_keep_counts([flat, peaked], uniform) == [12, 12]  # multiple of 4
