"""The CC rate of a run under another run's thresholds, and how far that figure can be trusted.

The pair summary puts both runs under the left (baseline) run's 15% thresholds, so their CC
rates count the same region. A run's own CC rate is exact: the collector counts every kept
token against its own thresholds on the GPU. Under *another* run's thresholds only what the
collector JSON keeps can be counted:

- the reservoir sample of (x, H) points, each coordinate stored rounded to `SAMPLE_DECIMALS`
  decimals (`versa_kernels.eaft.stats`). A point within half a unit of the last decimal of a
  threshold may lie on either side of it, so the count is an interval: points surely below both
  thresholds, up to points possibly below. The figure is exact only when the sample holds every
  kept token and no point is that close; it used to be called exact regardless, and in 5 of 16
  complete-sample entries it was one token off (issue 14);
- without samples, the 2-D histogram, each cell counted by the fraction of its area below both
  thresholds (tokens taken as uniform inside a cell): an estimate, bounded by the cells wholly
  below and the cells that reach below.

`CcUnderThresholds.cell` writes the figure with that qualification, never more precise than it is.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

SAMPLE_DECIMALS = 6
"""Decimals the collector keeps of each sample coordinate (`samples ... .round(6)`)."""
PERCENT = 100.0


@dataclass(frozen=True)
class CcUnderThresholds:
    """A CC share with the interval the data allows and where it came from.

    `source`: "own" (the collector's count over every kept token, under the run's own
    thresholds), "samples" (the reservoir sample) or "histogram" (2-D histogram by cell area).
    `counted` is the number of points behind it (the sample size, or the kept tokens).
    """

    rate: float
    low: float
    high: float
    source: str
    counted: int
    kept_tokens: int

    @property
    def complete(self) -> bool:
        """Every kept token was counted (own count, or a sample as large as the run)."""
        return self.source == "own" or (
            self.source == "samples" and self.counted >= self.kept_tokens > 0
        )

    @property
    def exact(self) -> bool:
        """True only when the figure is the count itself: complete and without ambiguity."""
        return self.complete and self.low == self.high

    @property
    def tokens_either_side(self) -> int:
        """How many counted points may lie on the other side of a threshold."""
        return round((self.high - self.low) * self.counted)

    def cell(self) -> str:
        """The figure for a table: `2.400%` when exact, `2.400% ±1 tok` for a complete sample
        with points on a threshold, `~2.400%` (sample or histogram estimate) otherwise."""
        text = f"{self.rate * PERCENT:.3f}%"
        if self.exact:
            return text
        if self.complete:
            return f"{text} ±{self.tokens_either_side} tok"
        return f"~{text}"


def own_cc(model: dict[str, Any]) -> CcUnderThresholds:
    """The run's CC rate under its own thresholds, as the collector counted it (exact)."""
    rate = float(model["cc_rate"])
    kept = int(model.get("kept_tokens", 0))
    return CcUnderThresholds(rate, rate, rate, "own", kept, kept)


def cc_under_thresholds(model: dict[str, Any], *, x_thr: float, h_thr: float) -> CcUnderThresholds:
    """Share of a run's kept tokens with x < x_thr and H < h_thr (see the module docstring)."""
    kept = int(model.get("kept_tokens", 0))
    samples = model.get("samples") or []
    if samples:
        return _from_samples(samples, x_thr, h_thr, kept)
    return _from_histogram(model["hist2d_x_H"], x_thr, h_thr, kept)


def stored_half_width(samples: Sequence[Sequence[float]]) -> float:
    """How far a stored coordinate may be from the value measured: half a unit of the 6th
    decimal when every coordinate sits on that grid (the collector rounds), else 0 (a collector
    that stores full precision)."""
    scale = 10**SAMPLE_DECIMALS
    for point in samples:
        for value in point:
            if abs(value * scale - round(value * scale)) > 1e-6:
                return 0.0
    return float(0.5 / scale * (1 + 1e-9))  # the 1e-9: the rounded value is itself a binary float


def _from_samples(
    samples: Sequence[Sequence[float]], x_thr: float, h_thr: float, kept: int
) -> CcUnderThresholds:
    half = stored_half_width(samples)
    point = sure = possible = 0
    for x, h in samples:
        point += x < x_thr and h < h_thr
        sure += x + half < x_thr and h + half < h_thr
        possible += x - half < x_thr and h - half < h_thr
    n = len(samples)
    return CcUnderThresholds(point / n, sure / n, possible / n, "samples", n, kept)


def _from_histogram(
    hist: dict[str, Any], x_thr: float, h_thr: float, kept: int
) -> CcUnderThresholds:
    # Bin midpoints are not used: the 15% p quantile usually lies inside the first p bin, where a
    # midpoint rule counts nothing (seen on the tiny playbook: 0% vs 2.4%).
    x_edges, y_edges, counts = hist["x_edges"], hist["y_edges"], hist["counts"]
    ybins = int(hist["ybins"])
    total = math.fsum(counts)
    if total <= 0:
        nan = float("nan")
        return CcUnderThresholds(nan, nan, nan, "histogram", 0, kept)
    area, whole, touched = [], [], []
    for ix in range(int(hist["xbins"])):
        fx = _share_below(x_edges[ix], x_edges[ix + 1], x_thr)
        if fx == 0.0:
            continue
        for iy in range(ybins):
            fy = _share_below(y_edges[iy], y_edges[iy + 1], h_thr)
            if fy == 0.0:
                continue
            count = counts[ix * ybins + iy]  # flat x-major: idx = ix*ybins + iy
            area.append(count * fx * fy)
            touched.append(count)
            if fx == 1.0 and fy == 1.0:
                whole.append(count)
    return CcUnderThresholds(math.fsum(area) / total, math.fsum(whole) / total,
                             math.fsum(touched) / total, "histogram", int(total), kept)  # fmt: skip


def _share_below(low: float, high: float, threshold: float) -> float:
    """Fraction of the interval [low, high) lying below `threshold`."""
    if threshold <= low:
        return 0.0
    if threshold >= high or high <= low:
        return 1.0
    return (threshold - low) / (high - low)


__all__ = [
    "SAMPLE_DECIMALS",
    "CcUnderThresholds",
    "cc_under_thresholds",
    "own_cc",
    "stored_half_width",
]
