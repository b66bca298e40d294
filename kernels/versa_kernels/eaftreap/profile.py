"""EAFT-REAP profiling through the project's forward (no hooks), resumable.

Two passes over the same calibration batches (eaftreap_spec §2.3):

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
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from versa_kernels.eaftreap.fsio import atomic_write_bytes
from versa_kernels.eaftreap.scoring import CLASS_NAMES, EaftWeights, ExpertAccumulators
from versa_kernels.harmony import completion_mask

log = logging.getLogger(__name__)

STATE_SCHEMA_VERSION = 1
LOGIT_CHUNK_TOKENS = 512  # bounds the [N, V] logits block (512 x 201088 x 4 B ~ 0.4 GB)

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
    p: np.ndarray
    h: np.ndarray
    p_lo: float
    h_lo: float
    h_hi: float
    region_counts: dict[str, int]
    scored_tokens: int
    tokens_per_s: float
    resumed_from_batch: int

    def meta(self) -> dict[str, Any]:
        """JSON-ready summary (no per-token arrays)."""
        return {
            "p_lo": self.p_lo,
            "h_lo": self.h_lo,
            "h_hi": self.h_hi,
            "region_counts": dict(self.region_counts),
            "scored_tokens": self.scored_tokens,
            "tokens_per_s": self.tokens_per_s,
            "resumed_from_batch": self.resumed_from_batch,
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


def fingerprint(examples: Sequence[CalibExample], **settings: Any) -> str:
    """sha256 over the tokenized inputs and every setting that changes the result."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for ex in examples:
        digest.update(ex.input_ids.numpy().astype(np.int64).tobytes())
        digest.update(b"|")
        digest.update(ex.positions.numpy().astype(np.int64).tobytes())
        digest.update(b"#")
    return digest.hexdigest()


def _save_state(path: Path | None, state: dict[str, Any]) -> None:
    if path is None:
        return
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def _load_state(path: Path | None, fp: str) -> dict[str, Any] | None:
    if path is None or not path.is_file():
        return None
    state = torch.load(path, weights_only=False)
    if state.get("schema_version") != STATE_SCHEMA_VERSION or state.get("fingerprint") != fp:
        log.warning("ignoring profile state %s: it belongs to different inputs", path)
        return None
    return state


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
) -> ProfileResult:
    """Run both passes and return the accumulators (module docstring).

    ``on_batch(pass_no, batches_done, total_batches)`` is called after each batch (progress).
    """
    from versa_kernels.signals import exact_quantile, token_signals

    weights = weights or EaftWeights()
    batches = _batches(examples, batch_size)
    path = Path(state_path) if state_path is not None else None
    fp = fingerprint(
        examples,
        batch_size=batch_size,
        weights=weights,
        top_k=entropy_top_k,
        extra=fingerprint_extra or {},
    )
    state = _load_state(path, fp) or {
        "schema_version": STATE_SCHEMA_VERSION,
        "fingerprint": fp,
        "pass": 1,
        "done": 0,
        "p": [],
        "h": [],
        "acc": ExpertAccumulators.zeros(num_layers, num_experts).state(),
    }
    resumed_from = (state["pass"] - 1) * len(batches) + state["done"]
    if resumed_from:
        log.info("resuming profile at pass %d batch %d", state["pass"], state["done"])
    device = model_device(model)
    started, tokens_seen = time.monotonic(), 0
    last_save = {"t": time.monotonic(), "batch": state["done"]}

    def save_due() -> bool:
        if state["done"] == len(batches):
            return True
        by_count = (
            save_every_batches > 0 and state["done"] - last_save["batch"] >= save_every_batches
        )
        return by_count or time.monotonic() - last_save["t"] >= save_every_s

    def save() -> None:
        _save_state(path, state)
        last_save.update(t=time.monotonic(), batch=state["done"])

    with torch.inference_mode():
        if state["pass"] == 1:
            for i in range(state["done"], len(batches)):
                ids, flat = pad_batch(batches[i], pad_id)
                out = model(ids.to(device))
                hidden = out.hidden.reshape(-1, out.hidden.shape[-1])[flat.to(device)]  # [N, D]
                targets = _targets(ids, flat).to(device)
                p_parts, h_parts = [], []
                for s in range(0, len(flat), LOGIT_CHUNK_TOKENS):
                    logits = model.logits(hidden[s : s + LOGIT_CHUNK_TOKENS]).float()  # [n, V]
                    p, h, _ = token_signals(
                        logits, targets[s : s + LOGIT_CHUNK_TOKENS], entropy_top_k=entropy_top_k
                    )
                    p_parts.append(p.float().cpu())
                    h_parts.append(h.float().cpu())
                empty = torch.zeros(0)
                state["p"].append(torch.cat(p_parts).numpy() if p_parts else empty.numpy())
                state["h"].append(torch.cat(h_parts).numpy() if h_parts else empty.numpy())
                state["done"] = i + 1
                tokens_seen += int(ids.numel())
                if save_due():
                    save()
                if on_batch is not None:
                    on_batch(1, state["done"], len(batches))
            state.update({"pass": 2, "done": 0})
            save()

        p_all = torch.from_numpy(np.concatenate(state["p"]))  # [N_total] float32
        h_all = torch.from_numpy(np.concatenate(state["h"]))  # [N_total] float32
        if p_all.numel() == 0:
            raise ValueError("no completion tokens to score in the calibration rows")
        thr = weights.thresholds(p_all, h_all)
        h_hi = exact_quantile(h_all, 1.0 - weights.cc_quantile)  # reported only (spec §2.3)
        acc = ExpertAccumulators.from_state(state["acc"])
        for i in range(state["done"], len(batches)):
            ids, flat = pad_batch(batches[i], pad_id)
            _, w = weights.token_weights(
                torch.from_numpy(state["p"][i]), torch.from_numpy(state["h"][i]), thr
            )  # w: [N] weight of each scored position's prediction
            out = model(ids.to(device), collect_moe=True)
            fdev = flat.to(device)
            for trace in out.moe:
                acc.add(
                    trace.layer,
                    trace.indices[fdev],  # [N, K]
                    trace.gates[fdev],  # [N, K]
                    trace.expert_out_norm[fdev],  # [N, K]
                    w,
                )
            state["done"] = i + 1
            state["acc"] = acc.state()
            tokens_seen += int(ids.numel())
            if save_due():
                save()
            if on_batch is not None:
                on_batch(2, state["done"], len(batches))

    labels, _ = weights.token_weights(p_all, h_all, thr)
    counts = torch.bincount(labels.long(), minlength=len(CLASS_NAMES)).tolist()
    elapsed = max(time.monotonic() - started, 1e-9)
    return ProfileResult(
        acc=acc,
        p=p_all.numpy(),
        h=h_all.numpy(),
        p_lo=thr.p_thr,
        h_lo=thr.h_thr,
        h_hi=h_hi,
        region_counts={name: int(counts[c]) for c, name in CLASS_NAMES.items()},
        scored_tokens=int(p_all.numel()),
        tokens_per_s=tokens_seen / elapsed,
        resumed_from_batch=resumed_from,
    )
