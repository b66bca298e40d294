"""``reap-recipe.yaml`` (kind ``reap_recipe``, eaftreap_spec §9.1): write it, and build from it.

Every build writes one recipe per variant, in the variant's artifacts folder and inside its
pruned checkpoint. The recipe names everything that decides the kept experts: base model (and
the sha256 of its weights), calibration data (and the sha256 of the sampled rows), EAFT
scoring, allocation constraints, plus the kept experts it produced and the code version.

``build_params_from_recipe`` maps a resolved recipe (``extends`` already merged, e.g. by
``versa_runner.recipes.load_recipe``) back to ``build_pruned`` keyword arguments. It accepts the
hand-written §9.1 shape too (``entropy_topk``, ``uniform_keep_n_across_layers``, no ``build``
block): a key it does not find keeps ``build_pruned``'s default. ``build_from_recipe`` runs the
build and, by default, refuses different calibration rows or weights before any forward, then
says whether the kept experts match the recipe's. Importing this module loads neither torch
nor numpy, so the host side can map a recipe to task flags with ``build_params_from_recipe``.

A recipe of a re-cut variant (``from_scores``) describes the *profile* the scores came from, so
running it profiles again and reproduces the same scores and kept experts; ``source.cut_from``
records the scores file and its sha256.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from versa_kernels.errors import ParameterError

if TYPE_CHECKING:
    from versa_kernels.eaftreap.build import BuildResult, Variant

log = logging.getLogger(__name__)

KIND = "reap_recipe"
SCHEMA_VERSION = 1
ENTROPY_TOP_K = 20  # fixed by the profiler (eaftreap_spec §2.3)

__all__ = ["build_from_recipe", "build_params_from_recipe", "reap_recipe_doc"]


def reap_recipe_doc(
    v: Variant,
    *,
    params: Mapping[str, Any],
    profiling: Mapping[str, Any],
    meta: Mapping[str, Any],
    sample: Mapping[str, Any],
    keepfrac_task: bool,
    cut_from: Mapping[str, Any] | None,
    code: Mapping[str, Any],
    weights: Mapping[str, Any],
) -> dict[str, Any]:
    """The recipe mapping of one variant (``profiling``: the settings that made the scores)."""
    plan = v.plan
    uniform = len(set(v.keep_counts)) == 1
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": KIND,
        "name": v.name,
        "description": "EAFT-REAP expert prune, top_k unchanged, no finetune (versa-runner build).",
        "source": {
            "created_by": "versa_kernels.eaftreap.build.build_pruned",
            "run_id": params.get("run_id", ""),
            "cut_from": dict(cut_from) if cut_from else None,
        },
        "model": {
            "base_model_id": profiling["model_path"],
            "pruned_model_label": v.name,
            "keep_frac_requested": v.keep_frac,
            "keep_frac_actual": sum(v.keep_counts) / (plan.num_layers * plan.num_experts),
            **({"keep_n": v.keep_counts[0]} if uniform else {}),
            "num_layers": plan.num_layers,
            "num_experts": plan.num_experts,
            "uniform_keep_n_across_layers": uniform,
            "layout": plan.layout,
            "variant_naming": "keepfrac" if keepfrac_task else "budgeted",
            "top_k_unchanged": True,
        },
        "scoring": {
            "method": "eaftreap",
            "top_k": plan.top_k,
            "entropy_topk": meta.get("entropy_top_k", ENTROPY_TOP_K),
            "cc_quantile": profiling["eaft_cc_quantile"],
            "uncertain_quantile": 1.0 - float(profiling["eaft_cc_quantile"]),
            "weights": {
                "w_good": profiling["eaft_weight_good"],
                "w_uncertain": profiling["eaft_weight_uncertain"],
                "w_conflict": profiling["eaft_weight_cc"],
            },
            "score_key": params["score_key"],
            "label_position": "predicting position t",
        },
        "profiling_data": {
            "dataset_repo": profiling["calib_packs_repo"],
            "pack_files": list(profiling["calib_pack_files"]),
            "sampling": {
                "strategy": profiling["calib_pack_sample_strategy"],
                "num_rows": profiling["num_rows"],
                "seed": profiling["seed"],
                "weights_csv": profiling["calib_pack_weights_csv"],
                "rows_sha256": sample.get("rows_sha256"),
            },
            "max_seq_length": profiling["max_seq_length"],
            "batch_size": profiling["batch_size"],
            "token_sampling": {
                "max_tokens_per_row": profiling["max_tokens_per_row"],
                "strategy": "strided",
            },
        },
        "selection_constraints": {
            "keep_n_multiple_of": plan.keep_n_multiple_of,
            "min_keep_per_layer": plan.min_keep,
            "max_keep_per_layer": plan.max_keep,
            "core_experts": {
                "core_pos_top_m": plan.core_pos_top_m,
                "core_count_top_m": plan.core_count_top_m,
            },
        },
        "structural_rewrite": {
            "writer": "safetensors",
            "byte_exact_slices": True,
            "mapping_file_in_model_dir": "expert_mapping.json",
        },
        "evaluation": {  # held-out PPL against other prunes with the same counts (0 rows: off)
            "baselines": {
                "methods": ["frequency", "random"],
                "eval_rows": params.get("baseline_eval_rows", 0),
                "random_seeds": params.get("baseline_random_seeds", 5),
            },
        },
        "result": {
            "keep_counts_by_layer": v.keep_counts,
            "core_experts_by_layer": v.cores,
            "keep_experts_by_layer": v.kept,
        },
        "reproducibility": {
            "code": dict(code),
            "calibration_rows_sha256": sample.get("rows_sha256"),
            "base_weights": dict(weights),
            "profile_device": meta.get("device"),
            "profile_dtype": meta.get("dtype"),
        },
    }


def _get(recipe: Mapping[str, Any], dotted: str) -> Any:
    node: Any = recipe
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


# build_pruned parameter <- dotted recipe paths (first one present wins).
_PARAM_PATHS: dict[str, tuple[str, ...]] = {
    "model_path": ("model.base_model_path", "model.base_model_id"),
    "calib_packs_repo": ("profiling_data.dataset_repo",),
    "calib_pack_files": ("profiling_data.pack_files",),
    "calib_pack_sample_strategy": ("profiling_data.sampling.strategy",),
    "calib_pack_weights_csv": (
        "profiling_data.sampling.weights_csv",
        "profiling_data.sampling.pack_weights",
    ),
    "num_rows": ("profiling_data.sampling.num_rows",),
    "seed": ("profiling_data.sampling.seed",),
    "max_seq_length": ("profiling_data.max_seq_length",),
    "batch_size": ("profiling_data.batch_size",),
    "max_tokens_per_row": ("profiling_data.token_sampling.max_tokens_per_row",),
    "min_keep_per_layer": ("selection_constraints.min_keep_per_layer",),
    "max_keep_per_layer": ("selection_constraints.max_keep_per_layer",),
    "core_pos_top_m": ("selection_constraints.core_experts.core_pos_top_m",),
    "core_count_top_m": ("selection_constraints.core_experts.core_count_top_m",),
    "keep_n_multiple_of": ("selection_constraints.keep_n_multiple_of",),
    "score_key": ("scoring.score_key",),
    "eaft_cc_quantile": ("scoring.cc_quantile",),
    "eaft_weight_good": ("scoring.weights.w_good",),
    "eaft_weight_cc": ("scoring.weights.w_conflict",),
    "eaft_weight_uncertain": ("scoring.weights.w_uncertain",),
    "baseline_eval_rows": ("evaluation.baselines.eval_rows",),
    "baseline_random_seeds": ("evaluation.baselines.random_seeds",),
    "from_scores": ("from_scores",),
}


def _check_fixed(recipe: Mapping[str, Any]) -> None:
    """Recipe values the build cannot change are refused, never ignored."""
    method = _get(recipe, "scoring.method")
    if method not in (None, "eaftreap"):
        raise ParameterError(f"recipe scoring.method={method!r}: this build scores 'eaftreap' only")
    for dotted in ("scoring.entropy_topk", "scoring.entropy_top_k"):
        value = _get(recipe, dotted)
        if value not in (None, ENTROPY_TOP_K):
            raise ParameterError(
                f"recipe {dotted}={value!r}: the profile's entropy uses the top {ENTROPY_TOP_K} "
                "logits (EAFT paper), no other value"
            )


def build_params_from_recipe(recipe: Mapping[str, Any]) -> dict[str, Any]:
    """``build_pruned`` keyword arguments from a resolved ``reap_recipe`` mapping."""
    if recipe.get("kind") != KIND:
        raise ParameterError(f"recipe kind is {recipe.get('kind')!r}, not {KIND!r}")
    if recipe.get("schema_version") != SCHEMA_VERSION:
        raise ParameterError(
            f"reap_recipe schema_version={recipe.get('schema_version')!r}; this code reads "
            f"{SCHEMA_VERSION}"
        )
    _check_fixed(recipe)
    params: dict[str, Any] = {}
    for name, paths in _PARAM_PATHS.items():
        for dotted in paths:
            value = _get(recipe, dotted)
            if value is not None:
                params[name] = value
                break
    if isinstance(params.get("calib_pack_weights_csv"), list):
        params["calib_pack_weights_csv"] = ",".join(
            str(w) for w in params["calib_pack_weights_csv"]
        )
    keep_frac = _get(recipe, "model.keep_frac_requested")
    if keep_frac is None:
        raise ParameterError("recipe has no model.keep_frac_requested")
    layout = _get(recipe, "model.layout")
    if layout is None:  # hand-written recipes say it this way
        uniform = _get(recipe, "model.uniform_keep_n_across_layers")
        layout = "uniform" if uniform else "per-layer"
    params["layout"] = layout
    keepfrac_naming = _get(recipe, "model.variant_naming") == "keepfrac"
    params["keep_frac"] = [float(keep_frac)] if keepfrac_naming else float(keep_frac)
    return params


def build_from_recipe(
    recipe: Mapping[str, Any],
    *,
    recipe_dir: str | Path | None = None,
    check_inputs: bool = True,
    **overrides: Any,
) -> tuple[BuildResult, bool | None]:
    """Build what ``recipe`` describes; returns the result and whether the kept experts match.

    ``overrides`` are ``build_pruned`` arguments that win over the recipe (``model_path`` where
    the base lives on this machine, ``artifacts_dir``, ``out_dir``, ``reports_dir``, ...). With
    ``check_inputs`` the build refuses calibration rows or base weights whose sha256 differs
    from the recipe's, before any forward.

    A recipe with a top-level ``from_scores: FILE`` (relative to ``recipe_dir``, the recipe
    file's folder) re-cuts from that ``reap-scores.yaml`` with no forward, e.g. a child that
    ``extends`` a shipped recipe and changes ``model.keep_frac_requested``.

    The match is None when the recipe records no kept experts for this variant (its
    ``result`` belongs to another ``pruned_model_label``, e.g. inherited through ``extends``).
    """
    from versa_kernels.eaftreap.build import BuildResult, build_pruned

    params = {**build_params_from_recipe(recipe), **overrides}
    scores = params.get("from_scores")
    if scores and recipe_dir is not None and not Path(scores).is_absolute():
        params["from_scores"] = str(Path(recipe_dir) / scores)
    if check_inputs:
        if not params.get("from_scores"):  # a re-cut reads no rows
            rows = _get(recipe, "profiling_data.sampling.rows_sha256") or ""
            params.setdefault("expect_rows_sha256", rows)
        digest = _get(recipe, "reproducibility.base_weights.digest") or ""
        params.setdefault("expect_weights_sha256", digest)
    result = build_pruned(**params)
    if not isinstance(result, BuildResult):  # only a torchrun rank (dist=...) returns a dict
        raise TypeError("build_from_recipe runs in the notebook's process, not inside a rank")
    expected = _get(recipe, "result.keep_experts_by_layer")
    variant = result.variants[0]
    if expected is None or _get(recipe, "model.pruned_model_label") != variant.name:
        return result, None
    same = [[int(e) for e in ids] for ids in expected] == variant.kept
    if not same:
        log.warning("kept experts of %s differ from its recipe's", variant.name)
    return result, same
