"""EAFT-REAP per-(layer, expert) accumulators, token quality classes and score keys.

REAP (arXiv 2510.13999) scores an expert by router-weighted activation: for every routed
(token, expert) pair with gate g and expert-output norm n = ||y_e(x)||_2, accumulate g·n.
EAFT-REAP (eaftreap_spec §2.3) reweights each token by the quality of the model's prediction:

    class               rule (thresholds = the run's global 15% quantiles)   weight
    confident conflict  p <  p_lo and H <  h_lo                               w_conflict (-2.0)
    good                p >= p_lo and H <  h_lo                               w_good     (+1.0)
    uncertain           everything else                                      w_uncertain (+0.25)

Classes, thresholds (exact order-statistic quantiles) and weights come from
`versa_kernels.signals`, so the profiler and the EAFT collector label tokens the same way.
p is the probability of the actual next token and H the top-20 entropy divided by ln 20, both
from the logits at position t (the prediction of token t+1). Easy to get wrong: the weight
attaches to the MoE contributions at position t, the position whose hidden state made the
prediction, not at t+1 (the original code's off-by-one, spec §2.5 / §11.1 #3). Only positions
that predict a completion token are accumulated at all, so count and weighted sums cover the
same tokens (spec §11.1 #8).

Accumulators are float64 on the host: sums over millions of tokens must not depend on chunking,
so an interrupted and resumed run gives the same numbers as an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from versa_kernels.signals import (
    CC_QUANTILE,
    CLASS_CONFLICT,
    CLASS_GOOD,
    CLASS_UNCERTAIN,
    W_CONFLICT,
    W_GOOD,
    W_UNCERTAIN,
    SignalThresholds,
    class_weights,
    classify_tokens,
    signal_thresholds,
)

SCORE_KEYS = (
    "eaft_gate_norm_sum",
    "gate_norm_sum",
    "eaft_saliency_mean",
    "saliency_mean",
    "norm_mean",
    "pos_gate_norm_sum",
    "norm_sum",
    "gate_sum",
    "count",
)
"""Ranking keys: the EAFT-weighted total (default), REAP's per-token mean ``saliency_mean``,
selection frequency ``count``, the mean expert-output norm without the gate ``norm_mean`` (EAN,
the REAP paper's activation-norm baseline), and the other accumulators (totals, or ``*_mean``
per hit)."""

MEAN_KEYS = {
    "saliency_mean": "gate_norm_sum",
    "eaft_saliency_mean": "eaft_gate_norm_sum",
    "norm_mean": "norm_sum",
}

__all__ = [
    "MEAN_KEYS",
    "SCORE_KEYS",
    "EaftWeights",
    "ExpertAccumulators",
    "kendall_tau",
    "split_half_tau",
]


@dataclass(frozen=True)
class EaftWeights:
    """Per-class token weights and the quantile that defines the class thresholds."""

    w_good: float = W_GOOD
    w_conflict: float = W_CONFLICT
    w_uncertain: float = W_UNCERTAIN
    cc_quantile: float = CC_QUANTILE

    def thresholds(self, p: torch.Tensor, h: torch.Tensor) -> SignalThresholds:
        """The run's global thresholds: exact ``cc_quantile`` quantiles of p and H."""
        if p.numel() == 0:
            raise ValueError("no scored tokens: cannot compute EAFT thresholds")
        return signal_thresholds(p, h, q=self.cc_quantile)

    def token_weights(
        self, p: torch.Tensor, h: torch.Tensor, thr: SignalThresholds
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(class label int8 [N], weight float64 [N]) of each prediction."""
        labels = classify_tokens(p, h, thr)
        w = class_weights(
            labels, w_good=self.w_good, w_uncertain=self.w_uncertain, w_conflict=self.w_conflict
        )
        return labels, w.double()


@dataclass
class ExpertAccumulators:
    """Per-(layer, expert) sums; every array is ``[L, E]`` (E = the widest layer)."""

    count: np.ndarray
    gate_sum: np.ndarray
    norm_sum: np.ndarray
    gate_norm_sum: np.ndarray
    eaft_gate_norm_sum: np.ndarray
    pos_count: np.ndarray
    neg_count: np.ndarray
    pos_gate_norm_sum: np.ndarray
    neg_gate_norm_sum: np.ndarray

    @classmethod
    def zeros(cls, num_layers: int, num_experts: int) -> ExpertAccumulators:
        """Empty accumulators for an L x E model."""
        shape = (num_layers, num_experts)
        return cls(**{f.name: np.zeros(shape, dtype=np.float64) for f in fields(cls)})

    def add(
        self,
        layer: int,
        indices: torch.Tensor,
        gates: torch.Tensor,
        norms: torch.Tensor,
        weights: torch.Tensor,
    ) -> None:
        """Accumulate N scored positions of one layer.

        Args:
            indices, gates, norms: ``[N, K]`` routed expert ids, renormalized gates and
                ``||y_e||_2`` at the scored (predicting) positions.
            weights: ``[N]`` EAFT weight of each position's prediction.
        """
        num_experts = self.count.shape[1]
        idx = indices.reshape(-1).long().cpu()  # [N*K]
        g = gates.detach().reshape(-1).double().cpu()  # [N*K]
        n = norms.detach().reshape(-1).double().cpu()  # [N*K]
        w = weights.double().cpu()[:, None].expand(indices.shape).reshape(-1)  # [N*K]
        gn = g * n
        pos, neg = (w > 0).double(), (w < 0).double()
        for name, values in (
            ("count", torch.ones_like(g)),
            ("gate_sum", g),
            ("norm_sum", n),
            ("gate_norm_sum", gn),
            ("eaft_gate_norm_sum", w * gn),
            ("pos_count", pos),
            ("neg_count", neg),
            ("pos_gate_norm_sum", pos * gn),
            ("neg_gate_norm_sum", neg * gn),
        ):
            row = torch.zeros(num_experts, dtype=torch.float64).index_add_(0, idx, values)
            getattr(self, name)[layer] += row.numpy()

    def state(self) -> dict[str, np.ndarray]:
        """Arrays by name, for saving."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> ExpertAccumulators:
        """Inverse of ``state()``."""
        return cls(**{f.name: np.asarray(state[f.name], dtype=np.float64) for f in fields(cls)})

    def score(self, key: str) -> np.ndarray:
        """Ranking score ``[L, E]`` for one of SCORE_KEYS (means divide by ``max(count, 1)``)."""
        if key in MEAN_KEYS:
            return getattr(self, MEAN_KEYS[key]) / np.maximum(self.count, 1.0)
        if key in SCORE_KEYS:
            return getattr(self, key).copy()
        raise ValueError(f"score_key={key!r} is not one of {', '.join(SCORE_KEYS)}")

    def table(self, experts_per_layer: list[int]) -> list[dict[str, float | int]]:
        """One row per real (layer, expert), with REAP's per-hit means (spec §2.3 parquet)."""
        rows: list[dict[str, float | int]] = []
        for layer, n_experts in enumerate(experts_per_layer):
            for e in range(n_experts):
                c = self.count[layer, e]
                hits = max(c, 1.0)
                row: dict[str, float | int] = {"layer": layer, "expert": e}
                for name, values in self.state().items():
                    row[name] = (
                        int(values[layer, e]) if name.endswith("count") else float(values[layer, e])
                    )
                row["gate_mean"] = self.gate_sum[layer, e] / hits
                row["norm_mean"] = self.norm_sum[layer, e] / hits
                row["saliency_mean"] = self.gate_norm_sum[layer, e] / hits
                row["eaft_saliency_mean"] = self.eaft_gate_norm_sum[layer, e] / hits
                rows.append(row)
        return rows


def kendall_tau(a: np.ndarray, b: np.ndarray) -> float:
    """Kendall's tau-a between two score vectors (pairs tied in either count as neither)."""
    da = np.sign(a[:, None] - a[None, :])  # [E, E]
    db = np.sign(b[:, None] - b[None, :])  # [E, E]
    n = len(a)
    return float((da * db).sum() / max(n * (n - 1), 1))


def split_half_tau(halves: tuple[ExpertAccumulators, ...], key: str) -> list[float]:
    """Per layer: how well the ranking from one half of the rows predicts the other half's.

    1.0 means both halves rank the experts identically; near 0 means the calibration set is too
    small for the ranking to mean much (the original profiler's 16k-token rankings, spec §11.1).
    """
    first, second = (h.score(key) for h in halves)
    return [kendall_tau(first[layer], second[layer]) for layer in range(first.shape[0])]


CLASS_NAMES = {CLASS_GOOD: "good", CLASS_CONFLICT: "conflict", CLASS_UNCERTAIN: "uncertain"}
"""Report names of the signal classes."""
