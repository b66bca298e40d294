"""Streaming statistics of per-token (p, H_norm, logp) for one (model, pack, seq_len).

What is accumulated (eaftreap_spec §6.4, §6.5, with the §11.3 fixes):

- Sums of NLL, NLL², p and H_norm over kept tokens (float64), giving completion-only PPL =
  exp(min(30, mean NLL)), var NLL, mean p and mean H_norm.
- Every kept token's p and H_norm as float32 (8 bytes per token: 4 MB per 512k tokens), so the
  thresholds are **exact** quantiles over all kept tokens (`signals.exact_quantile`) and CC is
  counted per token, not from histogram bins (§11.3 item 18).
- A 2-D histogram (xbins x ybins, flat x-major: idx = ix*ybins + iy) over x = p on [0, 1]
  (linear scale) or x = log10(max(p, 1e-12)) on [logp_min, logp_max] (log scale), and H_norm on
  [0, 1]; plus the two 1-D histograms. Bin = searchsorted(edges, v, right) - 1 clamped, so a
  value on the upper edge lands in the last bin. Values outside the x range are clamped into
  the edge bins; no token is dropped from any statistic (fixes §11.3 item 20).
- A reservoir sample of [x, H_norm] pairs (Algorithm R, numpy `default_rng(seed)`), the same
  sample for the same token stream.

Empty case: with no kept tokens PPL, means and thresholds are NaN and counts 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from versa_kernels.signals import SignalThresholds, exact_quantile

PROB_SCALES = ("linear", "log")
MAX_MEAN_NLL = 30.0  # PPL = exp(min(30, mean NLL)): keeps a broken model's PPL finite
LOG_P_FLOOR = 1e-12  # log scale: p is clamped here before log10
RESERVOIR_SEED = 0
QUANTILE_REPORT = (0.05, 0.50, 0.95)

__all__ = ["PROB_SCALES", "HistogramSpec", "SignalStats"]


@dataclass(frozen=True)
class HistogramSpec:
    """Axes of the p/H histograms: bins and the x range (depends on the prob scale)."""

    xbins: int = 160
    ybins: int = 120
    prob_scale: str = "linear"
    logp_min: float = -8.0
    logp_max: float = 0.0

    @property
    def x_range(self) -> tuple[float, float]:
        return (0.0, 1.0) if self.prob_scale == "linear" else (self.logp_min, self.logp_max)

    @property
    def x_label(self) -> str:
        return "p_t" if self.prob_scale == "linear" else "log10(p_t)"

    def x_of(self, p: torch.Tensor) -> torch.Tensor:
        """The histogram's x for probabilities p."""
        if self.prob_scale == "linear":
            return p
        return torch.log10(p.clamp_min(LOG_P_FLOOR))


@dataclass
class SignalStats:
    """Accumulates kept-token signals batch by batch; `summary()` gives the JSON `model` entry."""

    spec: HistogramSpec
    cc_quantile: float = 0.15
    sample_points: int = 0
    sum_nll: float = 0.0
    sum_nll2: float = 0.0
    sum_p: float = 0.0
    sum_h: float = 0.0
    count: int = 0
    _p: list[torch.Tensor] = field(default_factory=list)
    _h: list[torch.Tensor] = field(default_factory=list)
    _samples: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    _rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(RESERVOIR_SEED))

    def __post_init__(self) -> None:
        x_lo, x_hi = self.spec.x_range
        self.x_edges = torch.linspace(x_lo, x_hi, self.spec.xbins + 1, dtype=torch.float64)
        self.y_edges = torch.linspace(0.0, 1.0, self.spec.ybins + 1, dtype=torch.float64)
        self.hist2d = torch.zeros(self.spec.xbins * self.spec.ybins, dtype=torch.int64)
        self._samples = np.zeros((self.sample_points, 2), dtype=np.float64)

    def add(self, p: torch.Tensor, h_norm: torch.Tensor, logp: torch.Tensor) -> None:
        """Add one batch of kept tokens (1-D tensors of equal length, any device)."""
        p, h, lp = (t.detach().reshape(-1).double().cpu() for t in (p, h_norm, logp))
        if p.numel() == 0:
            return
        nll = -lp
        self.sum_nll += float(nll.sum())
        self.sum_nll2 += float((nll * nll).sum())
        self.sum_p += float(p.sum())
        self.sum_h += float(h.sum())
        self._p.append(p.float())
        self._h.append(h.float())
        x = self.spec.x_of(p)
        ix = self._bin(x, self.x_edges)  # [n]
        iy = self._bin(h, self.y_edges)  # [n]
        self.hist2d += torch.bincount(ix * self.spec.ybins + iy, minlength=self.hist2d.numel())
        self._reservoir(torch.stack([x, h], dim=1).numpy())  # [n, 2]
        self.count += p.numel()

    @staticmethod
    def _bin(values: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
        bins = edges.numel() - 1
        return (torch.bucketize(values, edges, right=True) - 1).clamp_(0, bins - 1)

    def _reservoir(self, points: np.ndarray) -> None:
        """Algorithm R: item i (0-based) replaces slot j ~ U{0..i} when j < capacity."""
        cap = self.sample_points
        if cap == 0:
            return
        start = self.count
        fill = max(0, min(cap - start, len(points)))
        if fill:
            self._samples[start : start + fill] = points[:fill]
        rest = points[fill:]
        if len(rest) == 0:
            return
        seen = np.arange(start + fill, start + fill + len(rest))  # index of each item
        j = self._rng.integers(0, seen + 1)  # one draw per item, in stream order
        hit = np.nonzero(j < cap)[0]
        # Later items overwrite earlier ones in the same slot, as a sequential loop would.
        slots, last = np.unique(j[hit][::-1], return_index=True)
        self._samples[slots] = rest[hit[::-1][last]]

    def state_dict(self) -> dict[str, Any]:
        """Everything `add` has accumulated, as tensors and plain values (`torch.save`-able,
        loads with ``weights_only=True``); `load_state_dict` continues bit for bit."""
        import json

        p, h = self._all()
        return {
            "sums": [self.sum_nll, self.sum_nll2, self.sum_p, self.sum_h],
            "count": self.count,
            "p": p,
            "h": h,
            "hist2d": self.hist2d.clone(),
            "samples": torch.from_numpy(np.array(self._samples, dtype=np.float64)),
            # PCG64's state holds 128-bit ints: JSON keeps them exact.
            "rng": json.dumps(self._rng.bit_generator.state),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state_dict()` of a stats object with the same spec and settings."""
        import json

        self.sum_nll, self.sum_nll2, self.sum_p, self.sum_h = (float(v) for v in state["sums"])
        self.count = int(state["count"])
        self._p = [state["p"].float()] if state["p"].numel() else []
        self._h = [state["h"].float()] if state["h"].numel() else []
        if state["hist2d"].shape != self.hist2d.shape:
            raise ValueError("stats state has another histogram shape")
        self.hist2d = state["hist2d"].clone().to(torch.int64)
        self._samples = state["samples"].numpy().astype(np.float64).copy()
        self._rng.bit_generator.state = json.loads(state["rng"])

    def thresholds(self) -> SignalThresholds:
        """Exact cc_quantile thresholds of p and H_norm over every kept token."""
        p, h = self._all()
        return SignalThresholds(
            p_thr=exact_quantile(p, self.cc_quantile),
            h_thr=exact_quantile(h, self.cc_quantile),
            q=self.cc_quantile,
            num_tokens=p.numel(),
        )

    def _all(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._p:
            return torch.zeros(0), torch.zeros(0)
        return torch.cat(self._p), torch.cat(self._h)

    def summary(self, *, predicted_tokens: int, wall_s: float) -> dict[str, Any]:
        """The collector JSON's `model` entry (field names of eaftreap_spec §6.6)."""
        n = self.count
        nan = float("nan")
        mean_nll = self.sum_nll / n if n else nan
        p, h = self._all()
        thr = self.thresholds()
        low_p, low_h = p < thr.p_thr, h < thr.h_thr
        quadrants = {
            "LL": int((low_p & low_h).sum()),
            "LH": int((low_p & ~low_h).sum()),
            "HL": int((~low_p & low_h).sum()),
            "HH": int((~low_p & ~low_h).sum()),
        }
        xbins, ybins = self.spec.xbins, self.spec.ybins
        grid = self.hist2d.view(xbins, ybins)  # [xbins, ybins], x-major
        x_thr = (
            thr.p_thr
            if self.spec.prob_scale == "linear"
            else math.log10(max(thr.p_thr, LOG_P_FLOOR))
        )
        out: dict[str, Any] = {
            "ppl": math.exp(min(MAX_MEAN_NLL, mean_nll)) if n else nan,
            "kept_tokens": n,
            "predicted_tokens": predicted_tokens,
            "tok_s_pred": predicted_tokens / wall_s if wall_s > 0 else nan,
            "mean_prob": self.sum_p / n if n else nan,
            "mean_entropy": self.sum_h / n if n else nan,
            "mean_nll": mean_nll,
            "var_nll": max(0.0, self.sum_nll2 / n - mean_nll**2) if n else nan,
            "p_thr": thr.p_thr,
            "h_thr": thr.h_thr,
            "x_thr": x_thr,
            "cc_rate": quadrants["LL"] / n if n else nan,
            "cc_count": quadrants["LL"],
            "quadrants": {k: v / n if n else nan for k, v in quadrants.items()},
            "quadrant_counts": quadrants,
            "quantile_method": "exact (inverse empirical CDF over all kept tokens)",
            "cc_rule": "p < p_thr and H_norm < h_thr (thresholds: own exact cc_quantile)",
            "hist2d_x_H": {
                "x_edges": self.x_edges.tolist(),
                "y_edges": self.y_edges.tolist(),
                "counts": self.hist2d.tolist(),
                "xbins": xbins,
                "ybins": ybins,
            },
            "hist1d_x": {"edges": self.x_edges.tolist(), "counts": grid.sum(1).tolist()},
            "hist1d_H": {"edges": self.y_edges.tolist(), "counts": grid.sum(0).tolist()},
            "samples": self._samples[: min(n, self.sample_points)].round(6).tolist(),
            "x_scale": self.spec.x_label,
            "x_min": self.spec.x_range[0],
            "x_max": self.spec.x_range[1],
        }
        for q in QUANTILE_REPORT:
            tag = f"q{round(q * 100):02d}"
            out[f"p_{tag}"] = exact_quantile(p, q)
            out[f"h_{tag}"] = exact_quantile(h, q)
        return out
