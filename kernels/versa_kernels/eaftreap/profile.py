"""EAFT-REAP profiling through the project's forward (no hooks), resumable.

`method="one_pass"` (the default) runs each batch once and applies the classes after the pass
(`profile_onepass`: same accumulators up to float64 summation order). `method="two_pass"` is
the reference, two passes over the same calibration batches (eaftreap_spec §2.3):

1. Signals: the forward's final hidden states at the *predicting* positions go through the LM
   head in chunks; ``token_signals`` gives p (probability of the actual next token) and the
   normalized top-20 entropy H. After the pass the global 15% quantiles give p_lo and h_lo.
2. Accumulation: the forward again with ``collect_moe=True``; each layer's ``MoeTrace`` carries
   the routed ids, gates and expert-output norms (each routed expert output computed once, inside
   the MoE), and the class weight of the prediction made at position t is added to the
   contributions at position t.

A position t is scored iff token t+1 is a completion token (inside assistant content); with
``max_tokens_per_row`` the scored positions are strided down to that many (spec §2.6), 0 = all.

Resume: every ``save_every_s`` seconds (or ``save_every_batches`` batches) the state (pass, batches done, signals, accumulator
arrays) is written atomically to ``state_path`` together with a fingerprint of the inputs. A run
that finds a state with the same fingerprint continues from it; float64 sums in the same batch
order make the resumed result identical to an uninterrupted one.

Several ranks (``dist``, a ``versa_kernels.distributed.DistContext``): rank r runs batches r,
r+N, ... of every pass. After pass 1 every rank gathers all ranks' p/H arrays in batch order, so the
thresholds are the exact global quantiles of a single process. After pass 2 the float64
accumulators are summed across ranks (all_reduce). Each rank saves its own state file (its own
p/H arrays and partial sums, kept to the end); on resume the ranks first agree on the earliest
pass any of them is in, so every rank takes part in the same gather and reduction.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from versa_kernels.distributed import DistContext
from versa_kernels.eaftreap.profile_onepass import OnePassAccumulator
from versa_kernels.eaftreap.profile_state import (
    STATE_SCHEMA_VERSION,
    Progress,
    Saver,
    fingerprint,
    load_state,
    save_state,
)
from versa_kernels.eaftreap.scoring import CLASS_NAMES, EaftWeights, ExpertAccumulators
from versa_kernels.harmony import completion_mask

log = logging.getLogger(__name__)

LOGIT_CHUNK_TOKENS = 1024  # bounds the [N, V] logits block (1024 x 201088 x 4 B ~ 0.8 GB)
METHODS = ("one_pass", "two_pass")
DEFAULT_METHOD = "one_pass"
"""What `build_pruned` runs: one forward per calibration token (module docstring)."""

__all__ = [
    "CalibExample",
    "ProfileResult",
    "model_device",
    "pad_batch",
    "prepare_examples",
    "profile_experts",
]


@dataclass(frozen=True)
class CalibExample:
    """One tokenized row: ids ``[T]`` and the predicting positions ``[N]`` that are scored."""

    input_ids: torch.Tensor
    positions: torch.Tensor


@dataclass
class ProfileResult:
    """Accumulators plus the token statistics of the run (goes into meta and reports)."""

    acc: ExpertAccumulators
    halves: tuple[ExpertAccumulators, ...]
    """Sums over even and over odd calibration rows, for split-half rank stability."""
    p_lo: float
    h_lo: float
    h_hi: float
    region_counts: dict[str, int]
    scored_tokens: int
    tokens_per_s: float
    resumed_from_batch: int
    total_batches: int
    """Batches over all passes of the method (one pass or two): resumed_from_batch equal to it
    means the saved profile was already finished and no forward ran."""

    @property
    def finished_before(self) -> bool:
        return self.resumed_from_batch >= self.total_batches

    def meta(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {
            "p_lo": self.p_lo,
            "h_lo": self.h_lo,
            "h_hi": self.h_hi,
            "region_counts": dict(self.region_counts),
            "scored_tokens": self.scored_tokens,
            "tokens_per_s": self.tokens_per_s,
            "resumed_from_batch": self.resumed_from_batch,
            "total_batches": self.total_batches,
        }


def _strided(positions: torch.Tensor, cap: int) -> torch.Tensor:
    n = len(positions)
    if cap <= 0 or n <= cap:
        return positions
    return positions[(torch.arange(cap) * n) // cap]  # floor(i * n / cap), spec §2.6


def prepare_examples(
    texts: Sequence[str], tokenizer: Any, *, max_seq_length: int, max_tokens_per_row: int = 0
) -> list[CalibExample]:
    """Tokenize rows (left-truncated) and find the positions that predict completion tokens."""
    examples: list[CalibExample] = []
    for text in texts:
        ids, mask = completion_mask(text, tokenizer, max_length=max_seq_length)
        # Position t predicts token t+1: scored iff t+1 is a completion token.
        positions = torch.nonzero(mask[1:], as_tuple=False).flatten()  # [N]
        examples.append(CalibExample(ids, _strided(positions, max_tokens_per_row)))
    return examples


def _batches(examples: Sequence[CalibExample], batch_size: int) -> list[list[CalibExample]]:
    return [list(examples[i : i + batch_size]) for i in range(0, len(examples), batch_size)]


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


def model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


@dataclass
class _Run:
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
    model: Any, hidden: torch.Tensor, targets: torch.Tensor, run: _Run
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


def _signals_pass(model: Any, batches: list, state: dict, run: _Run) -> None:
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
    model: Any, batches: list, state: dict, run: _Run, thr: Any, ph: tuple[list, list]
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


def _one_pass(model: Any, batches: list, state: dict, run: _Run, acc: OnePassAccumulator) -> None:
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


def profile_experts(
    model: Any,
    examples: Sequence[CalibExample],
    *,
    num_layers: int,
    num_experts: int,
    batch_size: int = 1,
    pad_id: int = 0,
    weights: EaftWeights | None = None,
    entropy_top_k: int = 20,
    state_path: str | Path | None = None,
    save_every_batches: int = 0,
    save_every_s: float = 300.0,
    fingerprint_extra: dict[str, Any] | None = None,
    on_batch: Callable[[int, int, int], None] | None = None,
    model_loader: Callable[[], Any] | None = None,
    dist: DistContext | None = None,
    single_state_path: str | Path | None = None,
    method: str = DEFAULT_METHOD,
) -> ProfileResult:
    """Profile the experts and return the accumulators (module docstring).

    ``method``: "one_pass" (one forward per batch) or "two_pass" (the reference).
    ``model`` may be None with a ``model_loader`` instead: the model is then loaded only when a
    pass still has to run (re-cutting a finished 20b profile skips minutes of loading).

    ``on_batch(pass_no, batches_done, total_batches)`` is called after each batch. When the
    passes are done the per-token arrays are dropped from the saved state (they are only needed
    to resume), so a finished state stays small and re-running the build only re-cuts.

    ``dist`` shards the batches over ranks; every rank returns the same reduced result, and
    rank 0 also writes the finished state in single-process form to ``single_state_path``:
    the notebook's own call then re-cuts from it.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not allowed; expected one of {', '.join(METHODS)}")
    weights = weights or EaftWeights()
    batches = _batches(examples, batch_size)
    passes = 1 if method == "one_pass" else 2
    path = Path(state_path) if state_path is not None else None
    settings = {"batch_size": batch_size, "weights": weights, "top_k": entropy_top_k}
    if method != "two_pass":  # two-pass states keep the fingerprint they always had
        settings["method"] = method
    fp = fingerprint(examples, **settings, extra=fingerprint_extra or {})
    state = load_state(path, fp) or {
        "schema_version": STATE_SCHEMA_VERSION,
        "fingerprint": fp,
        "pass": 1,
        "done": 0,
        "p": [],
        "h": [],
        "acc": ExpertAccumulators.zeros(num_layers, num_experts).state(),
        "halves": [ExpertAccumulators.zeros(num_layers, num_experts).state() for _ in range(2)],
        **(
            {"onepass": OnePassAccumulator.new_state(num_layers, num_experts)}
            if passes == 1
            else {}
        ),
    }
    if dist is not None and dist.min_int(state["pass"]) < 3 <= state["pass"]:
        # Another rank has work left: rejoin at the end of the last pass (own arrays are kept).
        state.update({"pass": 2, "done": len(batches)})
    resumed_from = min(state["pass"] - 1, passes) * len(batches) + state["done"]
    resumed_from = min(resumed_from, passes * len(batches))
    if resumed_from:
        log.info("resuming profile at pass %d batch %d", state["pass"], state["done"])
    tokens = sum(len(ex.input_ids) for ex in examples)
    if state["pass"] < 3 and model is None:
        if model_loader is None:
            raise ValueError("profile_experts needs a model (or a model_loader) to run a pass")
        model = model_loader()
    run = _Run(
        device=model_device(model),
        pad_id=pad_id,
        weights=weights,
        entropy_top_k=entropy_top_k,
        saver=Saver(path, save_every_batches, save_every_s),
        on_batch=on_batch,
        dist=dist,
    )
    started = time.monotonic()  # tokens/s of the passes, not of loading the model
    with torch.inference_mode():
        onepass = None
        if passes == 1 and "onepass" in state:
            scored = sum(len(ex.positions) for ex in examples)
            onepass = OnePassAccumulator(
                state["onepass"], total_tokens=scored, cc_quantile=weights.cc_quantile
            )
        if state["pass"] == 1:
            if onepass is not None:
                _one_pass(model, batches, state, run, onepass)
                state.update({"pass": 2, "done": len(batches)})
            else:
                _signals_pass(model, batches, state, run)
                state.update({"pass": 2, "done": 0})
            run.saver.maybe(state, len(batches), force=True)
        if state["pass"] == 2:
            _finish(model, batches, state, run, onepass)
            run.saver.maybe(state, len(batches), force=True)
    total = state["total"] if dist is not None else state
    if dist is not None and dist.is_main and single_state_path is not None:
        keep = ("schema_version", "fingerprint", "summary")
        single = {**{k: state[k] for k in keep}, "pass": 3, "done": len(batches), "p": [], "h": []}
        save_state(Path(single_state_path), {**single, **total})
    elapsed = max(time.monotonic() - started, 1e-9)
    done_now = passes * len(batches) - resumed_from
    return ProfileResult(
        acc=ExpertAccumulators.from_state(total["acc"]),
        halves=tuple(ExpertAccumulators.from_state(h) for h in total["halves"]),
        tokens_per_s=tokens * done_now / max(len(batches), 1) / elapsed,
        resumed_from_batch=resumed_from,
        total_batches=passes * len(batches),
        **state["summary"],
    )


def _finish(
    model: Any, batches: list, state: dict, run: _Run, onepass: OnePassAccumulator | None
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
