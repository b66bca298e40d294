"""The passes of EAFT-REAP profiling over the calibration batches (``profile.profile_experts``
decides which run, resumes and saves; this module does the per-batch work).

- ``one_pass``: one forward per batch gives p/H and the MoE traces (``profile_onepass``
  applies the classes after the pass).
- ``signals_pass`` then ``_accumulate_pass``: the two-pass reference (eaftreap_spec §2.3).
- ``finish``: the global thresholds over every batch (gathered across ranks), the
  accumulators, and with ranks their sums (``all_reduce``).

Position t is scored iff token t+1 is a completion token; the class weight of the prediction
made at t is added to the expert contributions at t.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from versa_kernels.distributed import DistContext
from versa_kernels.eaftreap.profile_onepass import OnePassAccumulator
from versa_kernels.eaftreap.profile_state import Progress, Saver
from versa_kernels.eaftreap.scoring import CLASS_NAMES, EaftWeights, ExpertAccumulators

if TYPE_CHECKING:
    from versa_kernels.eaftreap.profile import CalibExample

__all__ = ["LOGIT_CHUNK_TOKENS", "Run", "finish", "one_pass", "pad_batch", "signals_pass"]

LOGIT_CHUNK_TOKENS = 1024  # bounds the [N, V] logits block (1024 x 201088 x 4 B ~ 0.8 GB)


def pad_batch(batch: list[CalibExample], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids ``[B, T]`` and flat indices ``[N]`` of the scored positions in ``B*T``.

    Right padding needs no attention mask: causal attention never lets a real token see a pad.
    """
    width = max(len(ex.input_ids) for ex in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # [B, T]
    flat: list[torch.Tensor] = []
    for b, ex in enumerate(batch):
        ids[b, : len(ex.input_ids)] = ex.input_ids
        flat.append(b * width + ex.positions)
    return ids, torch.cat(flat) if flat else torch.zeros(0, dtype=torch.long)


def _targets(ids: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    return ids.reshape(-1)[flat + 1] if len(flat) else flat  # [N] next token of each position


@dataclass
class Run:
    """What every pass of one profiling call shares (typed, instead of a string-keyed dict)."""

    device: torch.device
    pad_id: int
    weights: EaftWeights
    entropy_top_k: int
    saver: Saver
    on_batch: Callable[[int, int, int], None] | None
    dist: DistContext | None

    def skip(self, i: int) -> bool:
        """True when batch i belongs to another rank (never with a single process)."""
        return self.dist is not None and not self.dist.owns(i)

    def after_batch(self, pass_no: int, state: dict, total: int) -> None:
        self.saver.maybe(state, total)
        if self.on_batch is not None:
            self.on_batch(pass_no, state["done"], total)


def _scored_signals(
    model: Any, hidden: torch.Tensor, targets: torch.Tensor, run: Run
) -> tuple[torch.Tensor, torch.Tensor]:
    """p and H [N] (on the device) of the scored predictions, from chunked LM-head logits."""
    from versa_kernels.signals import token_signals

    p_parts, h_parts = [], []
    for s in range(0, len(targets), LOGIT_CHUNK_TOKENS):
        logits = model.logits(hidden[s : s + LOGIT_CHUNK_TOKENS])  # [n, V]
        p, h, _ = token_signals(
            logits, targets[s : s + LOGIT_CHUNK_TOKENS], entropy_top_k=run.entropy_top_k
        )
        p_parts.append(p.float())
        h_parts.append(h.float())
    empty = torch.zeros(0, device=hidden.device)
    return torch.cat([empty, *p_parts]), torch.cat([empty, *h_parts])


def signals_pass(model: Any, batches: list, state: dict, run: Run) -> None:
    """Two-pass method, pass 1: p and H of every scored prediction.

    With ranks, ``state["p"]`` holds this rank's batches only, in order (r, r+N, ...).
    """
    progress = Progress(1, len(batches), state["done"])
    for i in range(state["done"], len(batches)):
        if run.skip(i):
            continue
        ids, flat = pad_batch(batches[i], run.pad_id)
        out = model(ids.to(run.device))
        hidden = out.hidden.reshape(-1, out.hidden.shape[-1])[flat.to(run.device)]  # [N, D]
        p, h = _scored_signals(model, hidden, _targets(ids, flat).to(run.device), run)
        state["p"].append(p.cpu().numpy())
        state["h"].append(h.cpu().numpy())
        state["done"] = i + 1
        progress.step(state["done"], int(ids.numel()))
        run.after_batch(1, state, len(batches))


def _accumulate_pass(
    model: Any, batches: list, state: dict, run: Run, thr: Any, ph: tuple[list, list]
) -> None:
    """Two-pass method, pass 2: EAFT-weighted REAP sums from the MoE traces (label at t).

    ``ph``: the p and H arrays of every batch, in batch order (gathered across ranks).
    """
    acc = ExpertAccumulators.from_state(state["acc"])
    # Even and odd calibration rows feed two half accumulators: split-half rank stability of
    # the ranking (spec §11.1 #1 asks for it; the original ranked from 16k tokens unchecked).
    halves = [ExpertAccumulators.from_state(h) for h in state["halves"]]
    first_row = np.cumsum([0] + [len(b) for b in batches])
    progress = Progress(2, len(batches), state["done"])
    for i in range(state["done"], len(batches)):
        if run.skip(i):
            continue
        ids, flat = pad_batch(batches[i], run.pad_id)
        _, w = run.weights.token_weights(
            torch.from_numpy(ph[0][i]), torch.from_numpy(ph[1][i]), thr
        )  # w: [N] weight of the prediction made at each scored position
        odd = ((int(first_row[i]) + flat // ids.shape[1]) % 2).bool()  # [N] row parity
        out = model(ids.to(run.device), collect_moe=True)
        fdev = flat.to(run.device)
        for trace in out.moe:
            idx, gates, norms = (
                trace.indices[fdev],  # [N, K]
                trace.gates[fdev],  # [N, K]
                trace.expert_out_norm[fdev],  # [N, K]
            )
            acc.add(trace.layer, idx, gates, norms, w)
            for half, sel in ((halves[0], ~odd), (halves[1], odd)):
                s = sel.to(idx.device)
                half.add(trace.layer, idx[s], gates[s], norms[s], w[sel])
        state["done"] = i + 1
        state["acc"] = acc.state()
        state["halves"] = [h.state() for h in halves]
        progress.step(state["done"], int(ids.numel()))
        run.after_batch(2, state, len(batches))


def one_pass(model: Any, batches: list, state: dict, run: Run, acc: OnePassAccumulator) -> None:
    """One-pass method: one forward per batch gives the signals and the MoE traces."""
    first_row = np.cumsum([0] + [len(b) for b in batches])
    progress = Progress(1, len(batches), state["done"], passes=1)
    for i in range(state["done"], len(batches)):
        if run.skip(i):
            continue
        ids, flat = pad_batch(batches[i], run.pad_id)
        odd = ((int(first_row[i]) + flat // ids.shape[1]) % 2).bool()  # [N] row parity
        out = model(ids.to(run.device), collect_moe=True)
        fdev = flat.to(run.device)
        hidden = out.hidden.reshape(-1, out.hidden.shape[-1])[fdev]  # [N, D]
        p, h = _scored_signals(model, hidden, _targets(ids, flat).to(run.device), run)
        state["p"].append(p.cpu().numpy())
        state["h"].append(h.cpu().numpy())
        acc.add_batch(
            torch.stack([t.indices[fdev] for t in out.moe]),  # [L, N, K]
            torch.stack([t.gates[fdev] for t in out.moe]),
            torch.stack([t.expert_out_norm[fdev] for t in out.moe]),
            p,
            h,
            odd,
            state["h"],
        )
        state["done"] = i + 1
        progress.step(state["done"], int(ids.numel()))
        run.after_batch(1, state, len(batches))


def finish(
    model: Any, batches: list, state: dict, run: Run, onepass: OnePassAccumulator | None
) -> None:
    """Global thresholds, then the accumulators (pass 2 of the reference, or the records)."""
    from versa_kernels.signals import exact_quantile

    weights, dist = run.weights, run.dist
    ph = _all_signals(state, dist, len(batches))
    p_all = torch.from_numpy(np.concatenate([np.zeros(0, np.float32), *ph[0]]))
    h_all = torch.from_numpy(np.concatenate([np.zeros(0, np.float32), *ph[1]]))
    if p_all.numel() == 0:
        raise ValueError("no completion tokens to score in the calibration rows")
    thr = weights.thresholds(p_all, h_all)  # the run's global thresholds
    if onepass is None:
        _accumulate_pass(model, batches, state, run, thr, ph)
    else:
        state["acc"], state["halves"] = onepass.finish(thr, weights)
    if dist is not None:  # partial sums stay in the state; the totals are kept apart
        state["total"] = _reduced(dist, state)
    labels, _ = weights.token_weights(p_all, h_all, thr)
    counts = torch.bincount(labels.long(), minlength=len(CLASS_NAMES)).tolist()
    state["summary"] = {
        "p_lo": thr.p_thr,
        "h_lo": thr.h_thr,
        "h_hi": exact_quantile(h_all, 1.0 - weights.cc_quantile),  # reported only
        "region_counts": {name: int(counts[c]) for c, name in CLASS_NAMES.items()},
        "scored_tokens": int(p_all.numel()),
    }
    state.update({"pass": 3, "done": len(batches)})
    if dist is None:  # per-token data only serves a resume; a finished state stays small
        state.update({"p": [], "h": []})
        state.pop("onepass", None)


def _all_signals(state: dict, dist: DistContext | None, num_batches: int) -> tuple[list, list]:
    """p and H arrays of every batch in batch order; with ranks, gathered from all of them."""
    if dist is None:
        return state["p"], state["h"]
    own = range(dist.rank, num_batches, dist.world_size)  # this rank's batches, in order
    mine = {i: (p, h) for i, p, h in zip(own, state["p"], state["h"], strict=True)}
    merged = dist.gather_in_order(mine)
    return [p for p, _ in merged], [h for _, h in merged]


def _reduced(dist: DistContext, state: dict) -> dict[str, Any]:
    """Accumulators summed over ranks (float64; counts stay exact integers)."""
    flat = {f"acc.{k}": v for k, v in state["acc"].items()}
    for n, half in enumerate(state["halves"]):
        flat.update({f"half{n}.{k}": v for k, v in half.items()})
    summed = dist.sum_arrays(flat)
    return {
        "acc": {k: summed[f"acc.{k}"] for k in state["acc"]},
        "halves": [{k: summed[f"half{n}.{k}"] for k in h} for n, h in enumerate(state["halves"])],
    }
