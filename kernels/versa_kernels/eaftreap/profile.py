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

This module decides what runs (method, resume, ranks, saving); the per-batch passes are in
``profile_passes``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from versa_kernels.distributed import DistContext
from versa_kernels.eaftreap.profile_onepass import OnePassAccumulator
from versa_kernels.eaftreap.profile_passes import (
    LOGIT_CHUNK_TOKENS,
    Run,
    finish,
    one_pass,
    pad_batch,
    signals_pass,
)
from versa_kernels.eaftreap.profile_state import (
    STATE_SCHEMA_VERSION,
    Saver,
    fingerprint,
    load_state,
    save_state,
)
from versa_kernels.eaftreap.scoring import EaftWeights, ExpertAccumulators
from versa_kernels.harmony import completion_mask

log = logging.getLogger(__name__)

METHODS = ("one_pass", "two_pass")
DEFAULT_METHOD = "one_pass"
"""What `build_pruned` runs: one forward per calibration token (module docstring)."""

__all__ = [
    "LOGIT_CHUNK_TOKENS",
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


def model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


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
    run = Run(
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
                one_pass(model, batches, state, run, onepass)
                state.update({"pass": 2, "done": len(batches)})
            else:
                signals_pass(model, batches, state, run)
                state.update({"pass": 2, "done": 0})
            run.saver.maybe(state, len(batches), force=True)
        if state["pass"] == 2:
            finish(model, batches, state, run, onepass)
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
