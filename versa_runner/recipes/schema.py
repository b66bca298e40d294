"""Recipe kinds, their schema versions and the keys each may hold (eaftreap_spec §9).

A recipe file names its `kind` (or inherits it through `extends`) and a `schema_version`.
Every key of every file is checked against its kind's schema *before* anything runs: an unknown
key is an error naming the key (as a dotted path) and the file, so a typo such as
`collector_overides` can never be silently ignored. `OPEN` marks sections that are free-form
records (provenance, notes, results) rather than settings.

Kinds:
- `reap_recipe`: how a pruned checkpoint is (or was) built; `recipe run` builds it.
- `reap_scores`: a scores snapshot; a build re-cuts from it with `from_scores` (no forward).
- `eval_base`: packs, EAFT settings and collector defaults that evaluation recipes extend.
- `eval_recipe`: models x runs of the collector on the same blocks, then the gate summary.
- `playbook`: the seed playbook as one job (validate, build, parity, gate, decode).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from versa_runner.errors import ConfigError

OPEN: dict[str, Any] = {}  # a free-form section: any keys
"""Sentinel schema: a section whose keys are not settings (notes, provenance, results)."""
ANY = None  # a leaf: any value

STATUSES = ("ready", "planned")
"""`planned`: valid and resolvable, but refused by `recipe run` (e.g. needs a 120b checkpoint)."""

_COMMON = {
    "schema_version": ANY, "kind": ANY, "extends": ANY, "name": ANY, "description": ANY,
    "status": ANY, "notes": ANY, "execution": OPEN, "execution_notes": ANY,
    "expected_outputs": OPEN, "source": OPEN,
}  # fmt: skip

COLLECTOR_KEYS = {
    "top_k": ANY, "sample_points": ANY, "batch_size": ANY, "num_blocks": ANY,
    "seq_lens_csv": ANY, "entropy_top_k": ANY, "block_offset": ANY, "gpus": ANY,
}  # fmt: skip
"""Collector settings: the `eaft_single` task's flags (snake_case) a recipe may set."""

_ENGINE = {"env": OPEN}
_SIDE = {
    "label": ANY, "model_id": ANY, "model_path": ANY, "collector_overrides": COLLECTOR_KEYS,
    "model_path_from_manifest": {"manifest_json": ANY, "field": ANY},
}  # fmt: skip
_EVAL_BASE = {
    **_COMMON,
    "paths": OPEN,
    "calib_packs": {"dataset_repo": ANY, "text_column": ANY, "pack_files": ANY,
                    "derived_union_name": ANY},
    "eaft": {"entropy_topk": ANY, "cc_quantile": ANY, "prob_scale": ANY, "logp_min": ANY,
             "logp_max": ANY},
    "collector_defaults": COLLECTOR_KEYS,
    "engine_defaults": _ENGINE,
    "gates_json": ANY,
}  # fmt: skip
_EVAL_RECIPE = {
    **_EVAL_BASE,
    "comparison": ANY,
    "noise": {"enabled": ANY},
    "pair": {"left": _SIDE, "right": _SIDE},
    "collector_overrides": COLLECTOR_KEYS,
    "engine_overrides": _ENGINE,
    "run_matrix": [{"name": ANY, "collector_overrides": COLLECTOR_KEYS,
                    "engine_overrides": _ENGINE, "notes": ANY}],
}  # fmt: skip
_REAP_RECIPE = {
    **_COMMON,
    "from_scores": ANY,
    "task": ANY,
    "model": {
        "base_model_id": ANY, "base_model_path": ANY, "pruned_model_label": ANY,
        "keep_frac_requested": ANY, "keep_frac_actual": ANY, "keep_n": ANY, "num_experts": ANY,
        "num_layers": ANY, "uniform_keep_n_across_layers": ANY, "top_k_unchanged": ANY,
        "notes": ANY, "layout": ANY, "variant_naming": ANY, "out_dir": ANY,
    },
    "scoring": {
        "method": ANY, "top_k": ANY, "entropy_topk": ANY, "entropy_top_k": ANY,
        "cc_quantile": ANY, "uncertain_quantile": ANY, "score_key": ANY,
        "score_definition": ANY, "label_position": ANY,
        "weights": {"w_good": ANY, "w_uncertain": ANY, "w_conflict": ANY},
    },
    "profiling_data": {
        "dataset_repo": ANY, "pack_files": ANY, "max_seq_length": ANY, "batch_size": ANY,
        "sampling": {"strategy": ANY, "num_rows": ANY, "seed": ANY, "weights_csv": ANY,
                     "pack_weights": ANY, "prompt_hash": ANY, "rows_sha256": ANY},
        "packing": OPEN, "token_sampling": OPEN,
    },
    "selection_constraints": {
        "keep_n_multiple_of": ANY, "min_keep_per_layer": ANY, "max_keep_per_layer": ANY,
        "core_experts": {"core_pos_top_m": ANY, "core_count_top_m": ANY},
    },
    "structural_rewrite": OPEN,
    "evaluation": {"gates_json": ANY, "canonical_eval_regime": OPEN,
                   "baselines": {"methods": ANY, "eval_rows": ANY, "random_seeds": ANY}},
    "result": OPEN,
    "reproducibility": OPEN,
    "cost_probe": OPEN,
}  # fmt: skip
_REAP_SCORES = {
    **_COMMON,
    "method": ANY, "score_key": ANY, "score_definition": ANY, "definition": ANY,
    "inputs": OPEN, "profiling": OPEN, "profile_meta": OPEN, "sample": OPEN, "summary": OPEN,
    "ranking_by_layer": ANY, "layer_scores": ANY,
}  # fmt: skip
_PLAYBOOK = {
    **_COMMON,
    "model": {"model_id": ANY, "model_path": ANY},
    "calib_packs": {"dataset_repo": ANY, "pack_files": ANY},
    "validate": {"enabled": ANY, "trials": ANY},
    "builds": [{"name": ANY, "task": ANY, "from_scores_of": ANY, "params": OPEN}],
    "collector": COLLECTOR_KEYS,
    "noise": {"enabled": ANY},
    "decode": {"enabled": ANY, "prompt_len": ANY, "max_new_tokens": ANY, "batch_sizes": ANY,
               "repeats": ANY, "warmup": ANY, "engine": ANY},
    "gates_json": ANY,
}  # fmt: skip

KINDS: dict[str, tuple[tuple[int, ...], dict[str, Any]]] = {
    "reap_recipe": ((1,), _REAP_RECIPE),
    "reap_scores": ((1, 2), _REAP_SCORES),
    "eval_base": ((1,), _EVAL_BASE),
    "eval_recipe": ((1,), _EVAL_RECIPE),
    "playbook": ((1,), _PLAYBOOK),
}
"""kind -> (schema versions this code reads, allowed keys)."""

__all__ = ["COLLECTOR_KEYS", "KINDS", "STATUSES", "check_keys", "check_kind"]


def check_kind(recipe: Mapping[str, Any], *, where: str) -> str:
    """The recipe's kind after checking it and its schema_version; ConfigError otherwise."""
    kind = recipe.get("kind")
    if kind not in KINDS:
        raise ConfigError(
            f"recipe {where}: kind {kind!r} is not one of {', '.join(KINDS)}",
            hint="Set `kind:` in the recipe or in a file it extends.",
        )
    versions, _ = KINDS[kind]
    version = recipe.get("schema_version")
    if version not in versions:
        raise ConfigError(
            f"recipe {where}: {kind} schema_version {version!r} is not supported "
            f"(this code reads {', '.join(map(str, versions))})",
            hint="Set `schema_version:` to a supported version.",
        )
    status = recipe.get("status", "ready")
    if status not in STATUSES:
        raise ConfigError(f"recipe {where}: status {status!r} is not one of {', '.join(STATUSES)}")
    return str(kind)


def check_keys(data: Mapping[str, Any], kind: str, *, where: str) -> None:
    """Refuse any key `kind`'s schema does not name (the error names the dotted key and file)."""
    if kind not in KINDS:
        raise ConfigError(f"recipe {where}: kind {kind!r} is not one of {', '.join(KINDS)}")
    _check(data, KINDS[kind][1], path="", where=where, kind=kind)


def _check(node: Any, schema: Any, *, path: str, where: str, kind: str) -> None:
    if schema is ANY or schema is OPEN:
        return
    if isinstance(schema, list):  # a list of entries, each of schema[0]
        if isinstance(node, list):
            for i, item in enumerate(node):
                _check(item, schema[0], path=f"{path}[{i}]", where=where, kind=kind)
        return
    if not isinstance(node, Mapping):
        return  # a scalar where a section was expected is the consumer's error to word
    for key, value in node.items():
        dotted = f"{path}.{key}" if path else str(key)
        if key not in schema:
            known = ", ".join(sorted(schema))
            raise ConfigError(
                f"recipe {where}: unknown key {dotted!r} for kind {kind}",
                hint=f"Allowed here: {known}.",
            )
        _check(value, schema[key], path=dotted, where=where, kind=kind)
