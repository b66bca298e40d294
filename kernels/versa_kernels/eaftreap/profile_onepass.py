"""One-pass EAFT-REAP profiling: one forward per calibration batch, classes applied afterwards.

The two-pass method (`profile.py`, the reference) runs every batch twice because a token's
class needs the run's *global* 15% quantiles of p and H, known only after all tokens are seen.
This module runs each batch once and still gives the two-pass accumulators, by splitting what
the weighting needs:

    eaft_gate_norm_sum = w_u * G_all + (w_g - w_u) * G_good + (w_c - w_u) * G_conflict

where G_x is the sum of gate * ||y_e|| over the tokens of class x (per layer and expert), and
likewise counts C_x for `pos_count` / `neg_count` / `pos_*` / `neg_*`. Sums over *all* tokens
(count, gate_sum, norm_sum, gate_norm_sum, G_all) are accumulated during the pass. Only good
and conflict tokens need their own sums, and both classes require H < h_lo. So per-token
records (routed ids [L, K] and gate * norm [L, K] in float64, p, H, row parity) are kept only
for tokens that can still turn out to have H < h_lo: with n scored tokens in the run (known in
advance) and r = ceil(q n), the r-th smallest H seen so far is an upper bound of the final h_lo
(more tokens can only lower an order statistic), so a token with H >= that bound is
"uncertain" whatever comes later and its record is dropped. Records then stay near q n tokens
(about 15%); after the pass the exact thresholds classify them and their sums are added.

Memory: a record is L x K x 9 bytes (864 B per token for the 20b, 1,296 B for the 120b), and
at most about 1.25 q n tokens are recorded: ~19% of the scored tokens, e.g. 1.6 GB of host
memory (and resume state) per 10M scored tokens of the 20b. A calibration set so large that this
does not fit should run `method="two_pass"`, which keeps 8 bytes per token.

Every value is the two-pass value up to float64 summation order; counts are exact. The sums of
one batch are one-hot matrix products in float64 (deterministic on GPU, unlike atomic adds),
so a resumed run equals an uninterrupted one. tests/test_eaftreap_onepass.py holds the two
methods equal on the trained tiny model; benchmarks/bench_profile.py --onepass-diff measures
the difference on the 20b shape.

Sets: index 0 = all rows, 1 = even calibration rows, 2 = odd rows (split-half stability).
Columns of the running sums: count, gate_sum, norm_sum, gate_norm_sum.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from versa_kernels.eaftreap.scoring import EaftWeights
from versa_kernels.signals import CLASS_CONFLICT, CLASS_GOOD, SignalThresholds, classify_tokens

SETS = 3
RUNNING = ("count", "gate_sum", "norm_sum", "gate_norm_sum")
RECORD_SLACK = 1.25
"""Records are re-cut to below the H bound once they exceed this many times q n tokens."""
ONE_HOT_BUDGET_BYTES = 256 << 20
"""Largest float64 one-hot block [L, chunk, E] built at once when summing a batch."""

__all__ = ["OnePassAccumulator"]


class OnePassAccumulator:
    """Running sums plus bounded per-token records; state-dict friendly for resume."""

    def __init__(self, state: dict[str, Any], *, total_tokens: int, cc_quantile: float) -> None:
        self.state = state
        self.rank_needed = max(1, math.ceil(round(cc_quantile * total_tokens, 9)))

    @staticmethod
    def new_state(num_layers: int, num_experts: int) -> dict[str, Any]:
        """The resumable part: running sums [SETS, 4, L, E], records, the H bound."""
        return {
            "running": np.zeros((SETS, len(RUNNING), num_layers, num_experts), dtype=np.float64),
            "records": [],
            "h_bound": np.array(np.inf),
        }

    def add_batch(
        self,
        indices: torch.Tensor,
        gates: torch.Tensor,
        norms: torch.Tensor,
        p: torch.Tensor,
        h: torch.Tensor,
        odd: torch.Tensor,
        seen_h: list[np.ndarray],
    ) -> None:
        """One batch: indices/gates/norms [L, N, K] at the scored positions, p/h/odd [N].

        `seen_h`: every H array of this process so far (this batch included), for the bound.
        """
        num_experts = self.state["running"].shape[-1]
        if num_experts > 256:
            raise ValueError(
                f"one-pass records store expert ids as bytes; got {num_experts} experts"
            )
        gn = gates.double() * norms.double()  # [L, N, K], as the two-pass accumulator computes it
        odd = odd.to(indices.device)
        self.state["running"] += _running_sums(indices, gates, norms, gn, odd, num_experts)
        bound = float(self.state["h_bound"])
        keep = (h < bound).to(indices.device)  # [N]
        if bool(keep.any()):
            self.state["records"].append(
                {
                    "p": p[keep.to(p.device)].float().cpu().numpy(),
                    "h": h[keep.to(h.device)].float().cpu().numpy(),
                    "odd": odd[keep].cpu().numpy(),
                    "idx": indices[:, keep].to(torch.uint8).cpu().numpy(),  # [L, n, K]
                    "gn": gn[:, keep].cpu().numpy(),  # [L, n, K] float64
                }
            )
        self._tighten(seen_h)

    def _tighten(self, seen_h: list[np.ndarray]) -> None:
        """Lower the H bound once enough tokens are seen, and drop records at or above it."""
        kept = sum(len(r["h"]) for r in self.state["records"])
        seen = sum(len(a) for a in seen_h)
        r = self.rank_needed
        if seen < r or (np.isfinite(self.state["h_bound"]) and kept <= RECORD_SLACK * r):
            return  # amortized: re-cut only when the records have grown by a quarter
        everything = np.concatenate(seen_h)
        bound = np.partition(everything, r - 1)[r - 1]
        self.state["h_bound"] = np.array(bound)
        merged = _concat_records(self.state["records"])
        if merged is None:
            return
        sel = merged["h"] < bound
        self.state["records"] = [
            {k: (v[:, sel] if v.ndim == 3 else v[sel]) for k, v in merged.items()}
        ]

    def finish(
        self, thr: SignalThresholds, weights: EaftWeights
    ) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
        """Accumulator states (total, [even half, odd half]) in `ExpertAccumulators` form."""
        running = self.state["running"]
        _, _, L, E = running.shape
        merged = _concat_records(self.state["records"])
        class_sums = np.zeros((SETS, 2, 2, L, E))  # set, (good, conflict), (count, gn)
        if merged is not None:
            labels = classify_tokens(
                torch.from_numpy(merged["p"]), torch.from_numpy(merged["h"]), thr
            ).numpy()
            odd = merged["odd"].astype(bool)
            flat = np.arange(L)[:, None, None] * E + merged["idx"].astype(np.int64)  # [L, n, K]
            for s, rows in enumerate((np.ones_like(odd), ~odd, odd)):
                for c, label in enumerate((CLASS_GOOD, CLASS_CONFLICT)):
                    sel = rows & (labels == label)  # [n]
                    ids = flat[:, sel].reshape(-1)
                    class_sums[s, c, 0] = np.bincount(ids, minlength=L * E).reshape(L, E)
                    w = merged["gn"][:, sel].reshape(-1)
                    class_sums[s, c, 1] = np.bincount(ids, weights=w, minlength=L * E).reshape(L, E)
        states = [_accumulators(running[s], class_sums[s], weights) for s in range(SETS)]
        return states[0], states[1:]


def _running_sums(
    indices: torch.Tensor,
    gates: torch.Tensor,
    norms: torch.Tensor,
    gn: torch.Tensor,
    odd: torch.Tensor,
    num_experts: int,
) -> np.ndarray:
    """[SETS, 4, L, E] float64 sums of one batch, as one-hot products (deterministic)."""
    L, N, K = indices.shape
    odd_k = odd[:, None].expand(N, K).reshape(-1).double()  # [N*K]
    base = torch.stack([torch.ones_like(gn), gates.double(), norms.double(), gn], dim=-1).reshape(
        L, N * K, len(RUNNING)
    )  # [L, NK, 4]
    cols = torch.cat(
        [base, base * (1 - odd_k)[None, :, None], base * odd_k[None, :, None]], dim=-1
    )  # [L, NK, 12]: all, even, odd
    out = torch.zeros(L, num_experts, cols.shape[-1], dtype=torch.float64, device=gn.device)
    flat_idx = indices.reshape(L, N * K).long()
    chunk = max(1, ONE_HOT_BUDGET_BYTES // (8 * L * num_experts))
    for start in range(0, N * K, chunk):
        one_hot = torch.nn.functional.one_hot(flat_idx[:, start : start + chunk], num_experts)
        out += torch.bmm(one_hot.double().transpose(1, 2), cols[:, start : start + chunk])
    # [L, E, SETS*4] -> [SETS, 4, L, E]
    return out.view(L, num_experts, SETS, len(RUNNING)).permute(2, 3, 0, 1).cpu().numpy()


def _concat_records(records: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray] | None:
    if not records:
        return None
    out = {}
    for key in records[0]:
        axis = 1 if records[0][key].ndim == 3 else 0
        out[key] = np.concatenate([r[key] for r in records], axis=axis)
    return out


def _accumulators(
    running: np.ndarray, class_sums: np.ndarray, weights: EaftWeights
) -> dict[str, np.ndarray]:
    """The nine ExpertAccumulators arrays from all-token sums and good/conflict class sums."""
    count, gate_sum, norm_sum, gn_all = running
    (c_good, g_good), (c_conf, g_conf) = class_sums
    per_class = {  # class -> (weight, count, gate*norm sum)
        "good": (weights.w_good, c_good, g_good),
        "conflict": (weights.w_conflict, c_conf, g_conf),
        "uncertain": (weights.w_uncertain, count - c_good - c_conf, gn_all - g_good - g_conf),
    }
    zeros = np.zeros_like(count)
    out = {
        "count": count,
        "gate_sum": gate_sum,
        "norm_sum": norm_sum,
        "gate_norm_sum": gn_all,
        "eaft_gate_norm_sum": weights.w_uncertain * gn_all
        + (weights.w_good - weights.w_uncertain) * g_good
        + (weights.w_conflict - weights.w_uncertain) * g_conf,
        "pos_count": zeros.copy(),
        "neg_count": zeros.copy(),
        "pos_gate_norm_sum": zeros.copy(),
        "neg_gate_norm_sum": zeros.copy(),
    }
    for w, c, g in per_class.values():
        if w > 0:
            out["pos_count"] += c
            out["pos_gate_norm_sum"] += g
        elif w < 0:
            out["neg_count"] += c
            out["neg_gate_norm_sum"] += g
    return out
