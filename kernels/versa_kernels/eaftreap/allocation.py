"""Keep allocation: how many experts each layer keeps, which ones, and what is infeasible.

Budget rule (per-layer layout, eaftreap_spec §4.4 made exact and usable):

1. ``budget = round(keep_frac * L * E)`` (half-up), which must lie in ``[L*min_keep, L*max_keep]``.
2. Each layer's spread is its effective number of experts ``neff_l = 1 / sum_e (m_e / s)^2``
   (inverse Simpson of the layer's mass ``m``; 0 mass -> E). neff is scale-free, which matters
   because raw scores grow ~300x with depth (spec §2.4): a layer whose mass is spread over many
   experts needs more of them kept. The build passes each layer's routing counts as ``m``, not
   its score mass: on held-out text (benchmarks/bench_quality.py) budgets from the spread of
   routing load lost less perplexity at keep 0.75 to 0.5 than budgets from the spread of the
   EAFT-REAP mass, which concentrates on a few experts and starved layers that route evenly.
   ``share_keep_counts`` (DiEP-style global ranking of layer shares) measured worse than both.
3. Real-valued targets ``t_l = clip(lam * neff_l, min_keep, max_keep)``, with ``lam`` chosen so
   they sum to the budget (water-filling), are rounded by largest remainder (ties to the lower
   layer), so the counts lie within the bounds and sum to the budget exactly.

Uniform layout: one ``keep_n = ceil(keep_frac * E)`` rounded up to ``keep_n_multiple_of`` (down
when that would exceed E), which vLLM and SGLang need (gptoss_reference §0).

Selection per layer: the safety core (top ``core_pos_top_m`` by ``pos_gate_norm_sum`` union top
``core_count_top_m`` by ``count``) is always kept, then the ranking fills the rest; the kept ids
are stored in ascending order (spec §11.2 #15).

Every infeasible combination is found by ``check_feasible`` from the config alone, before any
forward pass (spec §11.2: flags are never accepted and ignored).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from versa_kernels.errors import ParameterError

LAYOUTS = ("per-layer", "uniform")
NEFF_FLOOR = 1e-6  # a layer with a single non-zero expert still gets a positive share

__all__ = [
    "LAYOUTS",
    "AllocationPlan",
    "budget_keep_counts",
    "check_feasible",
    "core_experts",
    "neff",
    "select_experts",
    "share_keep_counts",
    "uniform_keep_n",
]


@dataclass(frozen=True)
class AllocationPlan:
    """Validated allocation parameters for one model (sizes read from its config)."""

    num_layers: int
    num_experts: int
    top_k: int
    keep_frac: float
    layout: str
    min_keep: int
    max_keep: int
    core_pos_top_m: int
    core_count_top_m: int
    keep_n_multiple_of: int

    @property
    def budget(self) -> int:
        """Total kept experts over all layers."""
        if self.layout == "uniform":
            return uniform_keep_n(self.keep_frac, self.num_experts, self.keep_n_multiple_of) * (
                self.num_layers
            )
        return round_half_up(self.keep_frac * self.num_layers * self.num_experts)


def round_half_up(x: float) -> int:
    """Round to nearest, halves up (Python's round() is banker's rounding)."""
    return math.floor(x + 0.5)


def uniform_keep_n(keep_frac: float, num_experts: int, multiple_of: int) -> int:
    """One count for every layer: ceil(keep_frac*E) rounded up to ``multiple_of`` (<= E)."""
    keep_n = min(max(math.ceil(keep_frac * num_experts - 1e-9), 1), num_experts)
    if multiple_of > 1:
        keep_n = math.ceil(keep_n / multiple_of) * multiple_of
        if keep_n > num_experts:
            keep_n = (num_experts // multiple_of) * multiple_of
    return keep_n


def check_feasible(
    *,
    num_layers: int,
    num_experts: int,
    top_k: int,
    keep_frac: float,
    layout: str = "per-layer",
    min_keep: int | None = None,
    max_keep: int | None = None,
    core_pos_top_m: int = 4,
    core_count_top_m: int = 0,
    keep_n_multiple_of: int = 4,
) -> AllocationPlan:
    """Validate allocation flags against the model's sizes; raise ParameterError if infeasible.

    ``min_keep`` defaults to top_k and ``max_keep`` to E (a larger ``max_keep`` is capped at E,
    the most a layer can keep; the plan records the effective bounds). The safety core may hold up to
    ``core_pos_top_m + core_count_top_m`` experts, so that sum must fit the smallest keep.
    """
    if layout not in LAYOUTS:
        raise ParameterError(f"layout={layout!r} is not one of {', '.join(LAYOUTS)}")
    if not (0.0 < keep_frac <= 1.0):
        raise ParameterError(f"keep_frac={keep_frac} must be in (0, 1]")
    if keep_n_multiple_of < 1:
        raise ParameterError(f"keep_n_multiple_of={keep_n_multiple_of} must be >= 1")
    for name, m in (("core_pos_top_m", core_pos_top_m), ("core_count_top_m", core_count_top_m)):
        if not (0 <= m <= num_experts):
            raise ParameterError(f"{name}={m} must be in [0, {num_experts}] (the model's experts)")
    lo = top_k if min_keep is None else min_keep
    hi = num_experts if max_keep is None else max_keep
    if lo > hi:
        raise ParameterError(f"min_keep_per_layer={lo} is larger than max_keep_per_layer={hi}")
    if lo < top_k:
        raise ParameterError(
            f"min_keep_per_layer={lo} is below the router top_k={top_k}",
            hint=f"Keep at least {top_k} experts per layer (top_k is never changed).",
        )
    # A cap above E binds nothing (no layer can keep more than it has): the effective cap is E.
    hi = min(hi, num_experts)
    if lo > num_experts:
        raise ParameterError(
            f"min_keep_per_layer={lo} exceeds the model's {num_experts} experts per layer",
            hint=f"Pass --min-keep-per-layer {num_experts} or less.",
        )
    plan = AllocationPlan(
        num_layers, num_experts, top_k, keep_frac, layout, lo, hi,
        core_pos_top_m, core_count_top_m, keep_n_multiple_of,
    )  # fmt: skip
    if layout == "uniform":
        keep_n = uniform_keep_n(keep_frac, num_experts, keep_n_multiple_of)
        if not (lo <= keep_n <= hi) or keep_n < top_k:
            raise ParameterError(
                f"uniform keep_n={keep_n} (keep_frac={keep_frac}, multiple of "
                f"{keep_n_multiple_of}) is outside [min_keep_per_layer={lo}, "
                f"max_keep_per_layer={hi}] or below top_k={top_k}",
                hint="Change --keep-frac or the per-layer bounds.",
            )
        smallest = keep_n
    else:
        budget = plan.budget
        if not (num_layers * lo <= budget <= num_layers * hi):
            raise ParameterError(
                f"budget round(keep_frac*L*E)={budget} is outside [L*min_keep_per_layer, "
                f"L*max_keep_per_layer]=[{num_layers * lo}, {num_layers * hi}]",
                hint="Raise --keep-frac or relax --min/--max-keep-per-layer.",
            )
        smallest = lo
    if core_pos_top_m + core_count_top_m > smallest:
        raise ParameterError(
            f"safety core up to core_pos_top_m+core_count_top_m="
            f"{core_pos_top_m + core_count_top_m} experts exceeds the smallest keep {smallest}",
            hint="Lower --core-pos-top-m/--core-count-top-m or raise --min-keep-per-layer.",
        )
    return plan


def neff(mass: Sequence[float]) -> float:
    """Effective number of experts (inverse Simpson) of one layer's score mass."""
    m = np.clip(np.asarray(mass, dtype=np.float64), 0.0, None)
    s = float(m.sum())
    if s <= 0.0:
        return float(len(m))  # no information: treat the layer as fully spread
    return float(1.0 / max(1e-12, float(((m / s) ** 2).sum())))


def _water_fill(weights: np.ndarray, budget: int, lo: int, hi: int) -> np.ndarray:
    """Real targets ``clip(lam * weights, lo, hi)`` with ``lam`` chosen so they sum to ``budget``.

    The sum is continuous and non-decreasing in ``lam``, so bisection finds it; feasibility
    (``L*lo <= budget <= L*hi``) was checked before any work.
    """
    w = np.asarray(weights, dtype=np.float64)
    lam_lo, lam_hi = 0.0, float(hi) / float(w.min())
    for _ in range(200):
        lam = 0.5 * (lam_lo + lam_hi)
        if np.clip(lam * w, lo, hi).sum() < budget:
            lam_lo = lam
        else:
            lam_hi = lam
    return np.clip(lam_hi * w, lo, hi)


def budget_keep_counts(
    mass_by_layer: Sequence[Sequence[float]], plan: AllocationPlan
) -> tuple[list[int], list[float]]:
    """Per-layer keep counts (summing exactly to the budget) and each layer's neff."""
    neffs = [max(NEFF_FLOOR, neff(m)) for m in mass_by_layer]
    if plan.layout == "uniform":
        keep_n = uniform_keep_n(plan.keep_frac, plan.num_experts, plan.keep_n_multiple_of)
        return [keep_n] * plan.num_layers, neffs
    budget = plan.budget
    target = _water_fill(np.asarray(neffs), budget, plan.min_keep, plan.max_keep)
    counts = np.clip(np.floor(target + 1e-9), plan.min_keep, plan.max_keep).astype(int)
    short = budget - int(counts.sum())
    # Largest remainder; stable sort keeps ties in layer order.
    order = np.argsort(-(target - counts), kind="stable")
    for layer in order:
        if short <= 0:
            break
        if counts[layer] < plan.max_keep:
            counts[layer] += 1
            short -= 1
    if int(counts.sum()) != budget:
        raise RuntimeError(f"allocation did not reach the budget {budget}: {counts.tolist()}")
    return [int(c) for c in counts], neffs


def share_keep_counts(mass_by_layer: Sequence[Sequence[float]], plan: AllocationPlan) -> list[int]:
    """Per-layer keep counts from one global ranking of experts by their share of their layer's
    mass (DiEP-style: a layer whose mass is spread keeps more experts, one dominated by a few
    keeps fewer), within ``[min_keep, max_keep]`` and summing exactly to the budget.

    Every layer first gets its ``min_keep`` largest shares; the rest of the budget goes to the
    largest remaining shares over all layers (ties to the lower layer, then the lower expert).
    A layer with no positive mass has uniform shares. The uniform layout is unchanged.
    """
    if plan.layout == "uniform":
        return budget_keep_counts(mass_by_layer, plan)[0]
    counts, candidates = [], []
    for layer, row in enumerate(mass_by_layer):
        m = np.clip(np.asarray(row, dtype=np.float64), 0.0, None)
        total = float(m.sum())
        shares = m / total if total > 0 else np.full(len(m), 1.0 / len(m))
        ordered = np.sort(shares)[::-1]  # descending
        counts.append(plan.min_keep)
        candidates += [(-float(v), layer, i) for i, v in enumerate(ordered[plan.min_keep :])]
    short = plan.budget - sum(counts)
    for _, layer, _ in sorted(candidates):
        if short <= 0:
            break
        if counts[layer] < plan.max_keep:
            counts[layer] += 1
            short -= 1
    if short != 0:
        raise RuntimeError(f"allocation did not reach the budget {plan.budget}: {counts}")
    return counts


def _top_ids(values: np.ndarray, m: int) -> list[int]:
    # Descending by value, ties to the lower expert id (stable on the negated values).
    return [int(e) for e in np.argsort(-values, kind="stable")[:m]]


def core_experts(
    pos_gate_norm_sum: np.ndarray, count: np.ndarray, *, pos_top_m: int, count_top_m: int
) -> list[list[int]]:
    """Safety core per layer: top ``pos_top_m`` by positive-token mass ∪ top by count, sorted."""
    cores: list[list[int]] = []
    for layer in range(pos_gate_norm_sum.shape[0]):  # pos_gate_norm_sum: [L, E]
        ids = set(_top_ids(pos_gate_norm_sum[layer], pos_top_m))
        ids |= set(_top_ids(count[layer].astype(np.float64), count_top_m))
        cores.append(sorted(ids))
    return cores


def select_experts(
    scores: np.ndarray, keep_counts: Sequence[int], cores: Sequence[Sequence[int]]
) -> list[list[int]]:
    """Kept ids per layer (ascending): the core first, then the best-ranked others to the count."""
    kept: list[list[int]] = []
    for layer, keep_n in enumerate(keep_counts):  # scores: [L, E]
        core = list(cores[layer])
        if len(core) > keep_n:
            raise ParameterError(
                f"layer {layer}: safety core of {len(core)} experts exceeds its keep {keep_n}"
            )
        chosen = set(core)
        for e in _top_ids(scores[layer], scores.shape[1]):
            if len(chosen) >= keep_n:
                break
            chosen.add(e)
        kept.append(sorted(chosen))
    return kept
