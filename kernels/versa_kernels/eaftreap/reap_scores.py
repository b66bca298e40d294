"""``reap-scores.yaml`` (kind ``reap_scores``, eaftreap_spec §9.2): write it, and read it back.

The file is what lets another keep_frac be cut with no model forward (``build_pruned(
from_scores=...)``). Schema 2 adds, per expert, every accumulator sum of ``ExpertAccumulators``
(``count`` ... ``neg_gate_norm_sum``) and a ``profiling`` block (the data and EAFT settings that
produced the sums). With the sums, a re-cut computes exactly what the profiled build computed:
the ranking for any score key, the safety core (``pos_gate_norm_sum``, ``count``) and the
per-layer mass. YAML floats are written with ``repr`` precision, so they read back bit-equal.

Schema 1 (the predecessor's files, spec §9.2) has only ``score``, ``count``, per-hit means and
class counts: ``_upgrade_v1`` reads it; such a snapshot ranks by its own score key only and
cannot supply the positive-token mass, so a safety core by ``core_pos_top_m`` is refused.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from versa_kernels.eaftreap.scoring import ExpertAccumulators
from versa_kernels.errors import DataError, ParameterError
from versa_kernels.fsio import atomic_write_text

log = logging.getLogger(__name__)

KIND = "reap_scores"
SCHEMA_VERSION = 2
SUM_FIELDS = tuple(f.name for f in fields(ExpertAccumulators))

__all__ = ["ScoresSnapshot", "load_reap_scores", "ranking_by_layer", "write_reap_scores"]


def _yaml(obj: Any) -> str:
    import yaml

    return yaml.safe_dump(obj, sort_keys=False, default_flow_style=None, width=100)


def ranking_by_layer(scores: np.ndarray, experts_per_layer: Sequence[int]) -> list[list[int]]:
    """Expert ids per layer, best first (ties to the lower id)."""
    return [
        [int(e) for e in np.argsort(-scores[layer, :n], kind="stable")]
        for layer, n in enumerate(experts_per_layer)
    ]


def _score_definition(score_key: str) -> str:
    if score_key == "eaft_gate_norm_sum":
        return (
            "per (layer, expert): sum over scored completion positions t routed to the expert of "
            "w_t * g * ||y_e(x_t)||_2, w_t the EAFT class weight of the prediction made at t"
        )
    return f"accumulator {score_key} per (layer, expert); see scores.parquet"


def reap_scores_doc(
    *,
    score_key: str,
    acc: ExpertAccumulators,
    experts_per_layer: Sequence[int],
    profile_meta: dict[str, Any],
    sample: dict[str, Any],
    profiling: dict[str, Any],
    inputs: dict[str, str],
) -> dict[str, Any]:
    """The ``reap_scores`` mapping (schema 2) of one profile."""
    scores = acc.score(score_key)
    table = {(int(r["layer"]), int(r["expert"])): r for r in acc.table(list(experts_per_layer))}
    ranking = ranking_by_layer(scores, experts_per_layer)
    layer_scores = []
    for layer, order in enumerate(ranking):
        experts = []
        for e in order:
            r = table[(layer, e)]
            entry: dict[str, Any] = {"expert": e, "score": float(scores[layer, e])}
            for key in ("gate_mean", "norm_mean", "saliency_mean", "eaft_saliency_mean"):
                entry[key] = float(r[key])
            for key in SUM_FIELDS:
                value = getattr(acc, key)[layer, e]
                entry[key] = int(value) if key.endswith("count") else float(value)
            experts.append(entry)
        layer_scores.append({"layer": layer, "experts": experts})
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": KIND,
        "method": "eaftreap",
        "score_key": score_key,
        "score_definition": _score_definition(score_key),
        "inputs": inputs,
        "profiling": profiling,
        "profile_meta": profile_meta,
        "sample": sample,
        "summary": {
            "num_layers": len(experts_per_layer),
            "num_experts": int(max(experts_per_layer)),
        },
        "ranking_by_layer": ranking,
        "layer_scores": layer_scores,
    }


def write_reap_scores(path: Path, doc: dict[str, Any]) -> None:
    """Write a ``reap_scores`` mapping atomically."""
    atomic_write_text(path, _yaml(doc))


@dataclass(frozen=True)
class ScoresSnapshot:
    """A read ``reap-scores.yaml``: per-(layer, expert) sums and where they came from."""

    path: Path
    sha256: str
    text: str  # the file as read (a re-cut ships it unchanged)
    schema_version: int
    score_key: str
    num_layers: int
    num_experts: int
    count: np.ndarray  # [L, E]
    file_scores: np.ndarray  # [L, E] the file's own ``score`` column (its score_key)
    acc: ExpertAccumulators | None  # every sum (schema 2); None for schema 1
    profile_meta: dict[str, Any]
    sample: dict[str, Any]
    profiling: dict[str, Any]

    def scores(self, score_key: str) -> np.ndarray:
        """Ranking score ``[L, E]``; any key with schema 2, the file's own key with schema 1."""
        if self.acc is not None:
            return self.acc.score(score_key)
        if score_key != self.score_key:
            raise ParameterError(
                f"score_key={score_key!r}: {self.path} (schema 1) holds scores for "
                f"{self.score_key!r} only",
                hint=f"Pass score_key={self.score_key!r} for this file.",
            )
        return self.file_scores.copy()

    def pos_gate_norm_sum(self, core_pos_top_m: int) -> np.ndarray:
        """Positive-token mass for the safety core (zeros when the core does not use it)."""
        if self.acc is not None:
            return self.acc.pos_gate_norm_sum
        if core_pos_top_m > 0:
            raise ParameterError(
                f"core_pos_top_m={core_pos_top_m}: {self.path} (schema 1) has no "
                "pos_gate_norm_sum to pick the safety core from",
                hint="Pass core_pos_top_m=0, or re-cut from a schema 2 reap-scores.yaml.",
            )
        return np.zeros_like(self.count)


def _bad(path: Path, what: str) -> DataError:
    return DataError(
        f"{path}: {what}",
        hint="Pass the reap-scores.yaml a versa-runner build wrote (kind reap_scores).",
    )


def _upgrade_v1(path: Path, doc: dict[str, Any]) -> dict[str, Any]:
    """Schema 1 has no sums and no profiling block; log what is filled in."""
    log.info(
        "%s: reap_scores schema 1: no accumulator sums (ranking by its own score only, no "
        "pos_gate_norm_sum for a safety core) and no profiling block (filled from profile_meta)",
        path,
    )
    return {**doc, "profiling": doc.get("profiling") or {}}


def load_reap_scores(path: str | Path) -> ScoresSnapshot:
    """Read and check a ``reap-scores.yaml``; errors name the file and what is wrong."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ParameterError(
            f"from_scores={str(path)!r} is not a file",
            hint="Pass the path of a reap-scores.yaml (it ships inside every pruned checkpoint).",
        )
    try:
        data = path.read_bytes()  # read once: the digest, the parse and the shipped copy agree
        text = data.decode("utf-8")
        doc = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise _bad(path, f"not readable YAML ({exc})") from exc
    if not isinstance(doc, dict) or doc.get("kind") != KIND:
        raise _bad(
            path, f"kind is {doc.get('kind') if isinstance(doc, dict) else None!r}, not {KIND!r}"
        )
    version = doc.get("schema_version")
    if version not in (1, SCHEMA_VERSION):
        raise _bad(path, f"schema_version={version!r}; this code reads 1 and {SCHEMA_VERSION}")
    if version == 1:
        doc = _upgrade_v1(path, doc)
    layers = doc.get("layer_scores")
    if not isinstance(layers, list) or not layers:
        raise _bad(path, "layer_scores is missing or empty")
    L = len(layers)
    E = max(int(e["expert"]) for ls in layers for e in ls.get("experts", [])) + 1
    count = np.zeros((L, E))
    file_scores = np.full((L, E), -np.inf)
    sums = {k: np.zeros((L, E)) for k in SUM_FIELDS} if version == SCHEMA_VERSION else None
    for i, ls in enumerate(layers):
        if int(ls.get("layer", -1)) != i or len(ls.get("experts", [])) != E:
            raise _bad(path, f"layer_scores[{i}] must be layer {i} with {E} experts")
        for entry in ls["experts"]:
            e = int(entry["expert"])
            count[i, e] = float(entry["count"])
            file_scores[i, e] = float(entry["score"])
            if sums is not None:
                missing = [k for k in SUM_FIELDS if k not in entry]
                if missing:
                    raise _bad(path, f"layer {i} expert {e} lacks {', '.join(missing)}")
                for k in SUM_FIELDS:
                    sums[k][i, e] = float(entry[k])
    if not np.isfinite(file_scores).all():
        raise _bad(path, "some (layer, expert) has no score entry")
    return ScoresSnapshot(
        path=path.resolve(),
        sha256=hashlib.sha256(data).hexdigest(),
        text=text,
        schema_version=int(version),
        score_key=str(doc.get("score_key", "eaft_gate_norm_sum")),
        num_layers=L,
        num_experts=E,
        count=count,
        file_scores=file_scores,
        acc=ExpertAccumulators(**sums) if sums is not None else None,
        profile_meta=dict(doc.get("profile_meta") or {}),
        sample=dict(doc.get("sample") or {}),
        profiling=dict(doc.get("profiling") or {}),
    )
