"""Calibration packs: fetch parquet files, sample rows deterministically, record what was used.

A pack is a parquet file whose ``text`` column holds full Harmony renderings (prompt and
completion). Packs come from a Hugging Face dataset repo (fetched with huggingface_hub, token from
the ``HF_TOKEN`` secret, ``HF_HUB_OFFLINE`` honoured, the local cache reused) or from local paths.

Sampling is bottom-k by hash (eaftreap_spec §3.2): a row's score is the first 8 bytes (big-endian)
of ``blake2b(f"{seed}\\n{text}", digest_size=8)``; the smallest scores win. The result depends
only on the seed and the row texts, not on file order or process, so a run can be reproduced.

- ``per_file``: cap ``ceil(num_rows / n_files)`` rows per file, then the global smallest
  ``num_rows`` of the survivors (so per-file counts are close to, not exactly, equal).
- ``weighted``: cap_i = ``max(1, ceil(num_rows * w_i / sum(w)))``, then the same global cut.
- ``concat``: all files concatenated into one pool, the smallest ``num_rows`` overall.

Easy to get wrong: rows with no assistant content are skipped (they would score nothing), a file
whose rows have no assistant content at all is an error, and the selected rows are recorded
(count and ``rows_sha256``) so that the same rows can be checked later.
"""

from __future__ import annotations

import hashlib
import heapq
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from versa_kernels.errors import DataError, ParameterError
from versa_kernels.harmony import assistant_content_spans

log = logging.getLogger(__name__)

SAMPLE_STRATEGIES = ("per_file", "weighted", "concat")
DEFAULT_TEXT_COLUMN = "text"
HASH_DIGEST_BYTES = 8  # the row score is one big-endian uint64
HF_TOKEN_ENV = "HF_TOKEN"
HF_OFFLINE_ENV = "HF_HUB_OFFLINE"

__all__ = [
    "SAMPLE_STRATEGIES",
    "CalibRow",
    "PackSample",
    "fetch_pack_files",
    "load_packs",
    "parse_weights_csv",
    "row_score",
    "rows_sha256",
]


@dataclass(frozen=True)
class CalibRow:
    """One sampled calibration row and where it came from."""

    text: str
    source_file: str
    row_i: int


@dataclass
class PackSample:
    """The rows a run uses, with everything needed to reproduce and verify the choice."""

    rows: list[CalibRow]
    pack_files: list[str]
    strategy: str
    seed: int
    num_rows: int
    weights: list[float] | None
    text_column: str
    scanned: int
    skipped_no_assistant: int
    rows_sha256: str
    per_file_counts: dict[str, int] = field(default_factory=dict)

    def record(self) -> dict[str, object]:
        """JSON-ready description (no texts): goes into the manifest and reap-scores.yaml."""
        return {
            "pack_files": list(self.pack_files),
            "strategy": self.strategy,
            "seed": self.seed,
            "num_rows": self.num_rows,
            "rows_used": len(self.rows),
            "weights": self.weights,
            "text_column": self.text_column,
            "scanned": self.scanned,
            "skipped_no_assistant": self.skipped_no_assistant,
            "per_file_counts": dict(self.per_file_counts),
            "rows_sha256": self.rows_sha256,
        }


def row_score(seed: int, text: str) -> int:
    """Deterministic sampling score of a row (smaller is selected first)."""
    digest = hashlib.blake2b(f"{seed}\n{text}".encode(), digest_size=HASH_DIGEST_BYTES).digest()
    return int.from_bytes(digest, "big")


def rows_sha256(rows: Sequence[CalibRow]) -> str:
    """sha256 over the rows in order (source file, row index and text, length-prefixed)."""
    digest = hashlib.sha256()
    for row in rows:
        for part in (row.source_file, str(row.row_i), row.text):
            data = part.encode("utf-8")
            digest.update(len(data).to_bytes(8, "big"))
            digest.update(data)
    return digest.hexdigest()


def parse_weights_csv(text: str | None, n_files: int) -> list[float] | None:
    """Parse ``--calib-pack-weights-csv`` ("1,3,1"); None when not given."""
    if text is None or str(text).strip() == "":
        return None
    try:
        weights = [float(w) for w in str(text).split(",")]
    except ValueError as exc:
        raise ParameterError(
            f"calib_pack_weights_csv={text!r} is not a comma-separated list of numbers",
            hint="Pass one non-negative weight per pack file, e.g. 1,3,1.",
        ) from exc
    if len(weights) != n_files:
        raise ParameterError(
            f"calib_pack_weights_csv has {len(weights)} weights for {n_files} pack files",
            hint="Pass exactly one weight per file in calib_pack_files.",
        )
    if any(w < 0 or not math.isfinite(w) for w in weights) or sum(weights) <= 0:
        raise ParameterError(
            f"calib_pack_weights_csv={text!r}: weights must be finite, >= 0, with a positive sum",
        )
    return weights


def fetch_pack_files(
    repo_id: str, files: Sequence[str], *, cache_dir: str | os.PathLike[str] | None = None
) -> list[Path]:
    """Download ``files`` from the dataset repo ``repo_id`` (or take them from the local cache).

    The token is read from ``HF_TOKEN`` at call time (it arrives as a secret, never as a
    parameter); ``HF_HUB_OFFLINE=1`` makes this a cache-only lookup.
    """
    from huggingface_hub import hf_hub_download

    token = os.environ.get(HF_TOKEN_ENV) or None
    offline = os.environ.get(HF_OFFLINE_ENV, "").strip().lower() in ("1", "true", "yes", "on")
    paths: list[Path] = []
    for name in files:
        try:
            local = hf_hub_download(
                repo_id,
                name,
                repo_type="dataset",
                token=token,
                cache_dir=cache_dir,
                local_files_only=offline,
            )
        except Exception as exc:  # huggingface_hub raises many types; keep the cause
            raise DataError(
                f"could not fetch {name!r} from dataset {repo_id!r}: {type(exc).__name__}: {exc}",
                hint=(
                    "Check the repo and file names; for a private repo pass HF_TOKEN as a "
                    "secret; offline, pre-populate the cache or pass local calib_pack_files."
                ),
            ) from exc
        paths.append(Path(local))
    return paths


def _read_texts(path: Path, text_column: str) -> list[object]:
    import pyarrow.parquet as pq

    if not path.is_file():
        raise DataError(f"calibration pack {str(path)!r} does not exist")
    try:
        schema = pq.read_schema(path)
    except Exception as exc:
        raise DataError(f"calibration pack {str(path)!r} is not a readable parquet file") from exc
    if text_column not in schema.names:
        raise DataError(
            f"calibration pack {str(path)!r} has no {text_column!r} column (columns: "
            f"{', '.join(schema.names[:10])})",
            hint="Packs need a text column holding Harmony-formatted rows.",
        )
    return pq.read_table(path, columns=[text_column]).column(text_column).to_pylist()


def _caps(strategy: str, num_rows: int, n_files: int, weights: list[float] | None) -> list[int]:
    if strategy == "per_file":
        return [math.ceil(num_rows / n_files)] * n_files
    if strategy == "weighted":
        if weights is None:
            raise ParameterError(
                "calib_pack_sample_strategy=weighted needs calib_pack_weights_csv",
                hint="Pass --calib-pack-weights-csv with one weight per pack file.",
            )
        total = sum(weights)
        return [max(1, math.ceil(num_rows * w / total)) for w in weights]
    return [num_rows] * n_files  # concat: no per-file cap, only the global cut


def load_packs(
    files: Sequence[str | os.PathLike[str]],
    *,
    num_rows: int,
    seed: int,
    strategy: str = "per_file",
    weights: list[float] | None = None,
    text_column: str = DEFAULT_TEXT_COLUMN,
    exclude: set[tuple[str, int]] | None = None,
) -> PackSample:
    """Sample ``num_rows`` rows from local parquet ``files`` with ``strategy`` (module docstring).

    ``exclude`` holds ``(file name, row index)`` pairs never to pick (held-out evaluation rows
    must not overlap the calibration rows).
    """
    if strategy not in SAMPLE_STRATEGIES:
        raise ParameterError(
            f"calib_pack_sample_strategy={strategy!r} is not one of {', '.join(SAMPLE_STRATEGIES)}"
        )
    if not files:
        raise ParameterError("calib_pack_files is empty", hint="Pass at least one parquet file.")
    if num_rows < 1:
        raise ParameterError(f"num_rows={num_rows} must be >= 1")
    if weights is not None and strategy != "weighted":
        raise ParameterError(
            f"calib_pack_weights_csv is only used with calib_pack_sample_strategy=weighted "
            f"(got {strategy!r})",
            hint="Drop the weights or pass --calib-pack-sample-strategy weighted.",
        )
    caps = _caps(strategy, num_rows, len(files), weights)
    # Global pool of (score, scan index, row); negated entries make heapq a bounded max-heap.
    survivors: list[tuple[int, int, CalibRow]] = []
    scanned = skipped = 0
    scan_i = 0
    for path, cap in zip([Path(f) for f in files], caps, strict=True):
        texts = _read_texts(path, text_column)
        heap: list[tuple[int, int, CalibRow]] = []
        usable = 0
        for row_i, text in enumerate(texts):
            scanned += 1
            if not isinstance(text, str) or not assistant_content_spans(text):
                skipped += 1
                continue
            usable += 1
            if exclude and (path.name, row_i) in exclude:
                continue
            score = row_score(seed, text)
            item = (-score, -scan_i, CalibRow(text, path.name, row_i))
            scan_i += 1
            if len(heap) < cap:
                heapq.heappush(heap, item)
            elif item[:2] > heap[0][:2]:
                heapq.heapreplace(heap, item)
        if usable == 0:
            raise DataError(
                f"calibration pack {str(path)!r} has no row with assistant text "
                f"({len(texts)} rows scanned)",
                hint="Completion-only scoring needs Harmony rows with assistant messages.",
            )
        survivors.extend((-s, -i, row) for s, i, row in heap)
    if len(survivors) < num_rows:
        raise DataError(
            f"only {len(survivors)} usable rows for num_rows={num_rows} "
            f"(strategy {strategy}, {scanned} scanned, {skipped} without assistant text)",
            hint="Lower --num-rows or add pack files.",
        )
    chosen = sorted(survivors, key=lambda item: (item[0], item[1]))[:num_rows]
    rows = [row for _, _, row in chosen]
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.source_file] = counts.get(row.source_file, 0) + 1
    log.info("sampled %d of %d scanned rows (%s, seed %d)", len(rows), scanned, strategy, seed)
    return PackSample(
        rows=rows,
        pack_files=[str(f) for f in files],
        strategy=strategy,
        seed=seed,
        num_rows=num_rows,
        weights=weights,
        text_column=text_column,
        scanned=scanned,
        skipped_no_assistant=skipped,
        rows_sha256=rows_sha256(rows),
        per_file_counts=counts,
    )
