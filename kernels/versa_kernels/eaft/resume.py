"""Resume state of an `eaft_single` collection: a lost GPU session continues where it stopped.

The collector walks its (seq_len, pack) entries in a fixed order. The state file keeps the
finished entries (their JSON-ready dicts) and, for the entry in progress, the streaming
statistics (`SignalStats.state_dict`: sums, per-token p/H, histogram, reservoir sample and its
generator state) with the number of batches done. It is written atomically (`fsio`) every
``save_every_s`` seconds or ``save_every_blocks`` blocks, and after each finished entry; the
same blocks fed in the same order then give a JSON identical to an uninterrupted run (timings
aside). The file is removed once the JSON is written.

A state belongs to one set of inputs: its fingerprint hashes the model weights (sha256 of the
shards, `eaftreap.fingerprint`), the pack texts, the model id and every setting that changes
the result; a state with another fingerprint is ignored (logged), and so is a partial entry
whose blocks hash to other rows.

Several ranks (`dist`): each rank keeps its own file (`distributed.rank_state_path`) and only
finished entries, since a rank's own signals reach the statistics only at the gather that ends
an entry. On resume the ranks agree on the smallest number of finished entries any of them has.

The state loads with ``weights_only=True``: a file synced from elsewhere cannot run code.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from versa_kernels.distributed import DistContext
from versa_kernels.eaft.stats import SignalStats
from versa_kernels.fsio import atomic_write_bytes

log = logging.getLogger(__name__)

STATE_SCHEMA_VERSION = 1
STATE_SUFFIX = ".collect_state.pt"
"""``<out_root>/<run_id>/<model id, / as __>.collect_state.pt`` (``.rankR-of-N`` before ``.pt``
for a rank of a multi-GPU run)."""

OnBatch = Callable[[str, int, int, int], None]
"""``on_batch(pack, seq_len, blocks_done, total_blocks)``, called after each batch is saved."""

__all__ = ["STATE_SUFFIX", "CollectResume", "OnBatch", "collect_fingerprint", "state_file"]


def state_file(out_dir: Path, model_id: str) -> Path:
    """Where a collection of ``model_id`` into ``out_dir`` keeps its resume state."""
    return out_dir / (model_id.replace("/", "__") + STATE_SUFFIX)


def collect_fingerprint(
    *, weights_sha256: str, packs: Mapping[str, Sequence[str]], settings: Mapping[str, Any]
) -> str:
    """sha256 over the weights' digest, every pack's rows in order and the settings."""
    digest = hashlib.sha256(json.dumps(dict(settings), sort_keys=True, default=str).encode())
    digest.update(weights_sha256.encode())
    for name, rows in packs.items():
        digest.update(b"\x01" + name.encode() + b"\x01")
        for row in rows:
            digest.update(row.encode("utf-8") + b"\x00")
    return digest.hexdigest()


@dataclass
class CollectResume:
    """Finished entries and the entry in progress of one collection, saved when due."""

    path: Path
    fingerprint: str
    save_every_s: float = 300.0
    save_every_blocks: int = 0
    on_batch: OnBatch | None = None
    finished: list[dict[str, Any]] = field(default_factory=list)
    """``{"pack", "seq", "entry"}`` in collection order."""
    partial: dict[str, Any] | None = None
    """The entry in progress: pack, seq, rows_sha256, batches done, wall_s, stats state."""
    single_process: bool = True
    _current: tuple[str, int, str] = ("", 0, "")
    _last_t: float = field(default_factory=time.monotonic)
    _last_blocks: int = 0

    @classmethod
    def open(
        cls, path: Path, fingerprint: str, *, dist: DistContext | None = None, **kw: Any
    ) -> CollectResume:
        """The saved state at ``path`` when it has this fingerprint, else an empty one."""
        resume = cls(path, fingerprint, single_process=dist is None, **kw)
        state = _load(path, fingerprint)
        if state is not None:
            resume.finished = json.loads(state["finished"])
            resume.partial = state.get("partial") if dist is None else None
        if dist is not None:  # every rank resumes from the entries all of them finished
            resume.finished = resume.finished[: dist.min_int(len(resume.finished))]
        if resume.finished or resume.partial:
            log.info(
                "resuming collection from %s: %d entries done%s", path, len(resume.finished),
                f", {resume.partial['done']} batches into the next" if resume.partial else "",
            )  # fmt: skip
        return resume

    def entry(self, pack: str, seq_len: int) -> dict[str, Any] | None:
        """The finished entry of (pack, seq_len), if this collection has one."""
        for item in self.finished:
            if item["pack"] == pack and item["seq"] == seq_len:
                return item["entry"]
        return None

    def begin(
        self, pack: str, seq_len: int, rows_sha256: str, stats: SignalStats
    ) -> tuple[int, float]:
        """Start (pack, seq_len): restores ``stats`` from the partial entry when it is this one.

        Returns (batches already done, wall seconds already spent on them).
        """
        self._current = (pack, seq_len, rows_sha256)
        part = self.partial
        if part is None or (part["pack"], part["seq"]) != (pack, seq_len):
            return 0, 0.0
        if part["rows_sha256"] != rows_sha256:
            log.warning(
                "ignoring the partial entry %s/%d: its blocks are other rows", pack, seq_len
            )
            return 0, 0.0
        stats.load_state_dict(part["stats"])
        return int(part["done"]), float(part["wall_s"])

    def after_batch(
        self, done: int, batch_size: int, total_blocks: int, stats: SignalStats, wall_s: float
    ) -> None:
        """Save when due (single process only: a rank's signals are not in ``stats`` yet)."""
        pack, seq_len, rows = self._current
        blocks = min(done * batch_size, total_blocks)
        due = time.monotonic() - self._last_t >= self.save_every_s or (
            self.save_every_blocks > 0 and blocks - self._last_blocks >= self.save_every_blocks
        )
        if self.single_process and due and blocks < total_blocks:
            self.partial = {
                "pack": pack, "seq": seq_len, "rows_sha256": rows, "done": done,
                "wall_s": wall_s, "stats": stats.state_dict(),
            }  # fmt: skip
            self._save()
            self._last_blocks = blocks
        if self.on_batch is not None:
            self.on_batch(pack, seq_len, blocks, total_blocks)

    def finish(self, pack: str, seq_len: int, entry: dict[str, Any]) -> None:
        """Record a finished entry and save."""
        self.finished.append({"pack": pack, "seq": seq_len, "entry": entry})
        self.partial = None
        self._save()
        self._last_blocks = 0

    def remove(self) -> None:
        """The JSON is written: the state has served its purpose."""
        self.path.unlink(missing_ok=True)

    def _save(self) -> None:
        state: dict[str, Any] = {
            "schema_version": STATE_SCHEMA_VERSION,
            "fingerprint": self.fingerprint,
            # JSON keeps every float of a finished entry exact (repr round-trips, NaN included).
            "finished": json.dumps(self.finished),
        }
        if self.partial is not None:
            state["partial"] = self.partial
        buf = io.BytesIO()
        torch.save(state, buf)
        atomic_write_bytes(self.path, buf.getvalue())
        self._last_t = time.monotonic()


def _load(path: Path, fingerprint: str) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        state = torch.load(path, weights_only=True)
    except Exception as exc:  # torch raises several types for foreign or truncated files
        log.warning("ignoring unreadable collection state %s (%s); starting over", path, exc)
        return None
    if not isinstance(state, dict) or state.get("schema_version") != STATE_SCHEMA_VERSION:
        log.warning("ignoring collection state %s: another schema", path)
        return None
    if state.get("fingerprint") != fingerprint:
        log.warning("ignoring collection state %s: it belongs to different inputs", path)
        return None
    return state
