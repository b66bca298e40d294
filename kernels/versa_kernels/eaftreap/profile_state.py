"""Resume state of EAFT-REAP profiling: fingerprint, atomic save and load, when to save, progress.

The state is a dict of numpy arrays (and lists / dicts of them) saved with `torch.save` as
tensors only, so it loads with `weights_only=True`: a state file synced from elsewhere cannot run
code. It belongs to one set of inputs: `fingerprint` hashes the tokenized rows and every setting
that changes the result, and a state with another fingerprint is ignored.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from versa_kernels.fsio import atomic_write_bytes

if TYPE_CHECKING:
    from versa_kernels.eaftreap.profile import CalibExample

log = logging.getLogger("versa_kernels.eaftreap.profile")

STATE_SCHEMA_VERSION = 3  # 2: split-half accumulators, tensors only; 3: one-pass method

__all__ = ["STATE_SCHEMA_VERSION", "Progress", "Saver", "fingerprint", "load_state", "save_state"]


def fingerprint(examples: Sequence[CalibExample], **settings: Any) -> str:
    """sha256 over the tokenized inputs and every setting that changes the result."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for ex in examples:
        digest.update(ex.input_ids.numpy().astype(np.int64).tobytes())
        digest.update(b"|")
        digest.update(ex.positions.numpy().astype(np.int64).tobytes())
        digest.update(b"#")
    return digest.hexdigest()


def _to_tensors(obj: Any) -> Any:
    """numpy arrays -> tensors, recursively, so the state loads with ``weights_only=True``."""
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj)
    if isinstance(obj, dict):
        return {k: _to_tensors(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_tensors(v) for v in obj]
    return obj


def _to_arrays(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.numpy()
    if isinstance(obj, dict):
        return {k: _to_arrays(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_arrays(v) for v in obj]
    return obj


def save_state(path: Path | None, state: dict[str, Any]) -> None:
    if path is None:
        return
    buf = io.BytesIO()
    torch.save(_to_tensors(state), buf)
    atomic_write_bytes(path, buf.getvalue())


def load_state(path: Path | None, fp: str) -> dict[str, Any] | None:
    if path is None or not path.is_file():
        return None
    # weights_only: a state file synced from elsewhere must not be able to run code on load.
    try:
        state = _to_arrays(torch.load(path, weights_only=True))
    except Exception as exc:  # torch raises several types for foreign or truncated files
        log.warning(
            "ignoring unreadable profile state %s (%s); profiling from the start", path, exc
        )
        return None
    if state.get("schema_version") != STATE_SCHEMA_VERSION or state.get("fingerprint") != fp:
        log.warning("ignoring profile state %s: it belongs to different inputs", path)
        return None
    return state


class Saver:
    """Writes the state when due: every ``every_s`` seconds or ``every_batches`` batches."""

    def __init__(self, path: Path | None, every_batches: int, every_s: float) -> None:
        self.path, self.every_batches, self.every_s = path, every_batches, every_s
        self.last_t, self.last_batch = time.monotonic(), -1

    def maybe(self, state: dict[str, Any], total: int, *, force: bool = False) -> None:
        by_count = self.every_batches > 0 and state["done"] - self.last_batch >= self.every_batches
        by_time = time.monotonic() - self.last_t >= self.every_s
        if force or state["done"] == total or by_count or by_time:
            save_state(self.path, state)
            self.last_t, self.last_batch = time.monotonic(), state["done"]


class Progress:
    """Log lines with rate and ETA (the target has no progress bar, only the run log)."""

    def __init__(self, pass_no: int, total: int, done: int, passes: int = 2) -> None:
        self.pass_no, self.total, self.start_done, self.passes = pass_no, total, done, passes
        self.t0, self.tokens = time.monotonic(), 0
        self.every = max(1, total // 20)

    def step(self, done: int, tokens: int) -> None:
        self.tokens += tokens
        if done % self.every and done != self.total:
            return
        elapsed = max(time.monotonic() - self.t0, 1e-9)
        rate = (done - self.start_done) / elapsed
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        log.info(
            "profile pass %d/%d: batch %d/%d, %.0f tok/s, ETA %.0f s",
            self.pass_no, self.passes, done, self.total, self.tokens / elapsed, eta,
        )  # fmt: skip
