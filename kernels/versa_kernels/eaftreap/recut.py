"""Cut variants from scores: allocate, select, rewrite, and ship the recipe and the scores.

The cut needs only per-(layer, expert) arrays (``ScoreSource``): the ranking score, the routed
``count`` and the positive-token mass for the safety core. A profiled build fills them from its
accumulators; ``source_from_scores`` fills them from a ``reap-scores.yaml`` with no model, no
tokenizer and no calibration data, so a re-cut costs the rewrite only.

Easy to get wrong: the scores must belong to the same base model. A re-cut checks the layer and
expert counts against the config, and the base weights' sha256 against the one the profile
recorded (when it did), before any file is written.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from versa_kernels.eaftreap.allocation import budget_keep_counts, core_experts, select_experts
from versa_kernels.eaftreap.reap_scores import ScoresSnapshot
from versa_kernels.eaftreap.recipe import reap_recipe_doc
from versa_kernels.errors import ParameterError

if TYPE_CHECKING:
    from versa_kernels.eaftreap.build import Variant

log = logging.getLogger(__name__)

PROFILING_KEYS = (
    "model_path", "calib_packs_repo", "calib_pack_files", "calib_pack_sample_strategy",
    "calib_pack_weights_csv", "num_rows", "seed", "max_seq_length", "batch_size",
    "max_tokens_per_row", "eaft_cc_quantile", "eaft_weight_good", "eaft_weight_cc",
    "eaft_weight_uncertain",
)  # fmt: skip
"""The build parameters that decide the scores (the rest only decide the cut)."""

__all__ = ["PROFILING_KEYS", "ScoreSource", "cut_variants", "source_from_scores"]


@dataclass
class ScoreSource:
    """What a cut reads, and what the outputs record about where it came from."""

    scores: np.ndarray  # [L, E] ranking score of the build's score_key
    count: np.ndarray  # [L, E] routed tokens (safety core by count)
    pos_gate_norm_sum: np.ndarray  # [L, E] positive-token mass (safety core by mass)
    table: list[dict[str, float | int]] | None  # scores.parquet rows (None: not known)
    meta: dict[str, Any]
    sample: dict[str, Any]
    profiling: dict[str, Any]  # PROFILING_KEYS of the profile that made the scores
    scores_yaml: str  # the reap-scores.yaml text shipped with every variant
    cut_from: dict[str, Any] | None  # None: this build profiled
    evaluate: Callable[[Variant], dict[str, Any]] | None = None  # held-out baselines


def profiling_block(params: Mapping[str, Any]) -> dict[str, Any]:
    """The profile-deciding parameters of a build, list-valued where the flag is a CSV."""
    out = {k: params[k] for k in PROFILING_KEYS}
    files = out["calib_pack_files"]
    out["calib_pack_files"] = (
        [f.strip() for f in files.split(",") if f.strip()]
        if isinstance(files, str)
        else list(files)
    )
    weights = out["calib_pack_weights_csv"]
    if isinstance(weights, list | tuple):
        out["calib_pack_weights_csv"] = ",".join(str(w) for w in weights)
    return out


def source_from_scores(
    snap: ScoresSnapshot,
    *,
    params: Mapping[str, Any],
    num_layers: int,
    num_experts: int,
    weights_digest: str,
) -> ScoreSource:
    """A read ``reap-scores.yaml`` as a ``ScoreSource`` (no model, no data)."""
    path = snap.path
    if (snap.num_layers, snap.num_experts) != (num_layers, num_experts):
        raise ParameterError(
            f"from_scores={str(path)!r} scores {snap.num_layers} layers x {snap.num_experts} "
            f"experts; model_path={params['model_path']!r} has {num_layers} x {num_experts}",
            hint="Pass the base model the scores were profiled on.",
        )
    profiled_on = snap.profile_meta.get("base_weights_sha256")
    if profiled_on and profiled_on != weights_digest:
        raise ParameterError(
            f"from_scores={str(path)!r} was profiled on weights with sha256 {profiled_on}; "
            f"model_path={params['model_path']!r} has {weights_digest}",
            hint="Pass the base model the scores were profiled on, or profile this one.",
        )
    score_key = params["score_key"]
    acc = snap.acc
    cut_from = {"kind": "reap_scores", "path": str(snap.path), "sha256": snap.sha256}
    meta = {**snap.profile_meta, "score_key": score_key, "cut_from": cut_from}
    return ScoreSource(
        scores=snap.scores(score_key),
        count=snap.count,
        pos_gate_norm_sum=snap.pos_gate_norm_sum(int(params["core_pos_top_m"])),
        table=acc.table([num_experts] * num_layers) if acc is not None else None,
        meta=meta,
        sample=snap.sample,
        # Schema 1 files carry no profiling block: this call's values stand in, and say so.
        profiling={**profiling_block(params), **snap.profiling},
        scores_yaml=snap.text,
        cut_from=cut_from,
    )


def cut_variants(
    source: ScoreSource,
    variants: list[Variant],
    base: Path,
    *,
    params: Mapping[str, Any],
    keepfrac_task: bool,
    code: Mapping[str, Any],
    weights: Mapping[str, Any],
) -> None:
    """Allocate, select and rewrite every variant (fills the variants' fields in place)."""
    from versa_kernels.eaftreap.outputs import REAP_RECIPE_YAML, REAP_SCORES_YAML, yaml_text
    from versa_kernels.eaftreap.rewrite import rewrite_checkpoint

    scores = source.scores
    mass = np.clip(scores, 0.0, None)  # [L, E]; negative totals carry no keep-worthy mass
    total = np.maximum(mass.sum(axis=1), 1e-30)  # [L]
    for v in variants:
        v.keep_counts, v.neff = budget_keep_counts(mass, v.plan)
        v.cores = core_experts(
            source.pos_gate_norm_sum, source.count,
            pos_top_m=v.plan.core_pos_top_m, count_top_m=v.plan.core_count_top_m,
        )  # fmt: skip
        v.kept = select_experts(scores, v.keep_counts, v.cores)
        v.mass_share_kept = [float(mass[i, ids].sum() / total[i]) for i, ids in enumerate(v.kept)]
        v.recipe = reap_recipe_doc(
            v, params=params, profiling=source.profiling, meta=source.meta, sample=source.sample,
            keepfrac_task=keepfrac_task, cut_from=source.cut_from, code=code, weights=weights,
        )  # fmt: skip
        shipped = {
            REAP_RECIPE_YAML: yaml_text(v.recipe).encode(),
            REAP_SCORES_YAML: source.scores_yaml.encode(),
        }
        result = rewrite_checkpoint(
            base, v.out_dir, v.kept, layout=v.plan.layout,
            pad_multiple_of=v.plan.keep_n_multiple_of, overwrite=bool(params["overwrite"]),
            extra_files=shipped,
        )  # fmt: skip
        v.stored_experts = result.stored_experts
        if source.evaluate is not None:
            v.baselines = source.evaluate(v)
