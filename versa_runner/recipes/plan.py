"""What running a recipe means: the ordered steps of one playbook job (`recipes.driver` runs them).

- `playbook_plan`: the seed playbook (seeds/000): validate, build(s), eaft_single on base and on
  each pruned model over the same blocks (plus base on disjoint blocks of the same size for the
  noise floor), the gate summary of each pair, decode_bench on base and each pruned model, and
  base vs pruned decode side by side.
- `reap_recipe_plan`: a pruning recipe builds (through the build task and its flags, including
  `from_scores` and the baseline comparison).
- `eval_recipe_plan`: every model x run-matrix entry of an eval recipe through the collector on
  the same blocks, then the gate summary per entry (`comparison: noise` for base vs base).

Every task step's parameters are validated here, on the host, with the task's own declaration
(`tasks.parse_task_args`), before anything is uploaded: a recipe value a task cannot honour is
an error naming the recipe key, never ignored.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from versa_runner import tasks
from versa_runner.errors import ConfigError, UsageError
from versa_runner.recipes.driver import PLAN_SCHEMA_VERSION
from versa_runner.recipes.resolve import collector_runs, merge_recipes

PRUNED_MODELS_DIR = "artifacts/playbook_models/{run_id}"
"""Where a playbook's builds write their checkpoints (one folder per run: never overwritten)."""
EAFT_SUPPORTED = {"entropy_topk": 20, "cc_quantile": 0.15, "prob_scale": "linear"}
"""The collector's fixed EAFT settings (eaftreap_spec §6); a recipe asking for others is refused."""

__all__ = ["eval_recipe_plan", "playbook_plan", "reap_recipe_plan", "task_step"]


def _flag_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def task_step(
    name: str, task_name: str, values: Mapping[str, Any], *, where: str
) -> dict[str, Any]:
    """One task step with its parameters typed and validated by the task's declaration.

    Values that refer to earlier steps (`{"$output": ...}`, `{"$manifest": ...}`) are checked
    for presence only; the driver fills them in on the target.
    """
    task = tasks.get_task(task_name)
    argv: list[str] = []
    deferred: dict[str, Any] = {}
    for key, value in values.items():
        param = task.param("--" + key.replace("_", "-"))
        if param is None:
            flags = ", ".join(p.name for p in task.params)
            raise ConfigError(f"{where}: task {task_name} has no parameter {key!r}",
                              hint=f"its parameters: {flags}")  # fmt: skip
        if isinstance(value, Mapping):
            deferred[param.name] = dict(value)
            if param.required or param.kind != "str":
                argv += [param.flag, "placeholder"]
            continue
        argv += [f"{param.flag}={_flag_text(value)}"]
    try:
        params = tasks.parse_task_args(task, argv)
    except UsageError as exc:
        raise UsageError(f"{where}: {exc}", hint=exc.hint) from exc
    params.update(deferred)
    return {"name": name, "task": task.name, "notebook": f"{task.notebook}.ipynb", "params": params}


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


# ---- the playbook ------------------------------------------------------------------------------


def playbook_plan(recipe: Mapping[str, Any], *, where: str) -> dict[str, Any]:
    """The seed playbook's steps from a resolved `playbook` recipe (or `versa-run playbook`)."""
    name = _safe(str(recipe.get("name") or "playbook"))
    model = recipe.get("model") or {}
    if not model.get("model_path"):
        raise ConfigError(f"{where}: model.model_path is required (the base checkpoint)")
    base_id = str(model.get("model_id") or Path(str(model["model_path"])).name)
    packs = recipe.get("calib_packs") or {}
    pack_values = {k: v for k, v in (("calib_packs_repo", packs.get("dataset_repo")),
                                     ("calib_pack_files", packs.get("pack_files"))) if v}  # fmt: skip
    steps: list[dict[str, Any]] = []
    validate = recipe.get("validate") or {}
    if validate.get("enabled", True):
        trials = {"trials": validate["trials"]} if "trials" in validate else {}
        steps.append(task_step("validate", "validate_expert_math_toy", trials, where=where))
    builds = list(recipe.get("builds") or [])
    if not builds:
        raise ConfigError(f"{where}: builds is empty; a playbook builds at least one pruned model")
    built: dict[str, str] = {}
    for build in builds:
        label = _safe(str(build.get("name") or ""))
        if not label or label in built:
            raise ConfigError(f"{where}: every build needs a unique name (got {label!r})")
        values = {"model_path": model["model_path"], **pack_values, **(build.get("params") or {})}
        values["out_dir"] = f"{PRUNED_MODELS_DIR}/{label}"
        source = build.get("from_scores_of")
        if source:
            if source not in built:
                raise ConfigError(f"{where}: build {label!r} re-cuts from {source!r}, which is "
                                  "not an earlier build of this playbook")  # fmt: skip
            values["from_scores"] = f"{built[source]}/reap-scores.yaml"
        task_name = str(build.get("task") or "build_pruned_20b_eaftreap_budgeted")
        steps.append(task_step(f"build_{label}", task_name, values, where=f"{where} build {label}"))
        built[label] = values["out_dir"]
    collector = {**pack_values, **(recipe.get("collector") or {})}
    num_blocks = int(collector.get("num_blocks", 256))

    def eaft(step: str, model_id: str, path: Any, **extra: Any) -> dict[str, Any]:
        values = {**collector, "model_id": model_id, "model_path": path, **extra}
        return task_step(step, "eaft_single", values, where=f"{where} {step}")

    steps.append(eaft("eaft_base", base_id, model["model_path"]))
    noise = (recipe.get("noise") or {}).get("enabled", True)
    if noise:  # the same base on the next num_blocks blocks: disjoint, same sizes
        steps.append(eaft("eaft_base_noise", f"{base_id}-disjoint", model["model_path"],
                          block_offset=num_blocks))  # fmt: skip
    for label in built:
        steps.append(eaft(f"eaft_{label}", f"{base_id}-{label}", {"$output": f"build_{label}"}))
    gates = {"gates_json": recipe["gates_json"]} if recipe.get("gates_json") else {}
    noise_pair = [{"$output": "eaft_base"}, {"$output": "eaft_base_noise"}] if noise else None
    if noise:
        steps.append({"name": "gate_noise", "summarize": {
            "left": {"$output": "eaft_base"}, "right": {"$output": "eaft_base_noise"},
            "out_md": f"reports/{name}_noise_base_vs_base.md", "comparison": "noise", **gates}})  # fmt: skip
    for label in built:
        steps.append({"name": f"gate_{label}", "summarize": {
            "left": {"$output": "eaft_base"}, "right": {"$output": f"eaft_{label}"},
            "out_md": f"reports/{name}_{label}_parity_summary.md", "noise": noise_pair, **gates}})  # fmt: skip
    decode = recipe.get("decode") or {}
    if decode.get("enabled", True):
        bench = {k: v for k, v in decode.items() if k != "enabled"}
        steps.append(task_step("decode_base", "decode_bench",
                               {**bench, "name": f"{name}_base", "model_path": model["model_path"]},
                               where=f"{where} decode"))  # fmt: skip
        for label in built:
            steps.append(task_step(f"decode_{label}", "decode_bench",
                                   {**bench, "name": f"{name}_{label}",
                                    "model_path": {"$output": f"build_{label}"}},
                                   where=f"{where} decode"))  # fmt: skip
            steps.append({"name": f"decode_compare_{label}", "summarize_decode": {
                "base": {"$output": "decode_base"}, "pruned": {"$output": f"decode_{label}"},
                "out_md": f"reports/{name}_decode_base_vs_{label}.md"}})  # fmt: skip
    return {"schema_version": PLAN_SCHEMA_VERSION, "name": name, "steps": steps}


# ---- pruning recipes -------------------------------------------------------------------------


def reap_recipe_plan(
    recipe: Mapping[str, Any], *, where: str, recipe_dir: Path, model_path: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """One build step from a resolved `reap_recipe` (`build_params_from_recipe`: the same flags
    a user would type; `from_scores` is relative to the recipe's folder). A recipe that records
    the kept experts it produced (every shipped `reap-recipe.yaml` does) gets a second step
    that checks the rebuild kept exactly those."""
    # GPU-side package, imported by name (it loads neither torch nor numpy for this mapper).
    mapper = importlib.import_module("versa_kernels.eaftreap.recipe")
    kernel_error = importlib.import_module("versa_kernels.errors").KernelError

    try:
        values = mapper.build_params_from_recipe(recipe)
    except kernel_error as exc:
        raise ConfigError(f"{where}: {exc}", hint=getattr(exc, "hint", None)) from exc
    if model_path:
        values["model_path"] = model_path
    scores = values.get("from_scores")
    if scores and not Path(str(scores)).is_absolute():
        values["from_scores"] = str((recipe_dir / str(scores)).resolve())
    out_dir = (recipe.get("model") or {}).get("out_dir")
    if out_dir:
        values["out_dir"] = out_dir
    keepfrac = isinstance(values.get("keep_frac"), list)
    task_name = str(recipe.get("task") or ("build_pruned_20b_eaftreap_keepfrac" if keepfrac
                                           else "build_pruned_20b_eaftreap_budgeted"))  # fmt: skip
    if overwrite:
        values["overwrite"] = True
    name = _safe(str(recipe.get("name") or "reap_recipe"))
    steps = [task_step(f"build_{name}", task_name, values, where=where)]
    label = (recipe.get("model") or {}).get("pruned_model_label")
    kept = (recipe.get("result") or {}).get("keep_experts_by_layer")
    if label and kept:
        kind = "keepfrac" if task_name.endswith("keepfrac") else "budgeted"
        steps.append({"name": "check_kept_experts", "check_kept": {
            "manifest_json": f"artifacts/20b_pruned_models_eaftreap_{kind}/manifest.json",
            "variant": label, "expected": kept}})  # fmt: skip
    return {"schema_version": PLAN_SCHEMA_VERSION, "name": name, "steps": steps}


# ---- evaluation recipes ----------------------------------------------------------------------


def _side_path(side: Mapping[str, Any], *, where: str) -> Any:
    ref = side.get("model_path_from_manifest")
    if ref:
        if not ref.get("manifest_json") or not ref.get("field"):
            raise ConfigError(f"{where}: model_path_from_manifest needs manifest_json and field")
        return {"$manifest": {"manifest_json": ref["manifest_json"], "field": ref["field"]}}
    if side.get("model_path"):
        return side["model_path"]
    raise ConfigError(f"{where}: needs model_path or model_path_from_manifest")


def _check_eaft(recipe: Mapping[str, Any], *, where: str) -> None:
    eaft = recipe.get("eaft") or {}
    for key, supported in EAFT_SUPPORTED.items():
        if key in eaft and eaft[key] != supported:
            raise ConfigError(f"{where}: eaft.{key}={eaft[key]!r}; the collector uses {supported!r}",
                              hint=f"Remove eaft.{key} or set it to {supported!r}.")  # fmt: skip


def eval_recipe_plan(recipe: Mapping[str, Any], *, where: str) -> dict[str, Any]:
    """Collector runs for every model x matrix entry (same blocks), then the gate summaries."""
    _check_eaft(recipe, where=where)
    pair = recipe.get("pair") or {}
    sides = [(s, pair[s]) for s in ("left", "right") if s in pair]
    if not sides:
        raise ConfigError(f"{where}: pair.left (and usually pair.right) is required")
    packs = recipe.get("calib_packs") or {}
    pack_values = {k: v for k, v in (("calib_packs_repo", packs.get("dataset_repo")),
                                     ("calib_pack_files", packs.get("pack_files"))) if v}  # fmt: skip
    comparison = str(recipe.get("comparison", "parity"))
    if comparison not in ("parity", "noise"):
        raise ConfigError(f"{where}: comparison {comparison!r} is not one of parity, noise")
    name = _safe(str(recipe.get("name") or "eval"))
    gates = recipe.get("gates_json")  # a path on the target; default: the packaged v1 file
    steps: list[dict[str, Any]] = []
    single = "run_matrix" not in recipe
    # noise.enabled: the left model again on the next num_blocks blocks, so each gate row shows
    # its measured noise (what the separate base-vs-base recipe measures, inside this job).
    with_noise = bool((recipe.get("noise") or {}).get("enabled")) and comparison == "parity"
    for run_name, params in collector_runs(recipe):
        run = "" if single else _safe(run_name) + "_"
        for side, spec in sides:
            values = merge_recipes({**pack_values, **params}, spec.get("collector_overrides") or {})
            values["model_id"] = str(spec.get("model_id") or spec.get("label") or side)
            if side == "right" and values["model_id"] == steps[-1]["params"]["model_id"]:
                values["model_id"] += "-right"  # two runs of one model keep two JSONs
            values["model_path"] = _side_path(spec, where=f"{where} pair.{side}")
            steps.append(task_step(f"eaft_{run}{side}", "eaft_single", values,
                                   where=f"{where} run {run_name} pair.{side}"))  # fmt: skip
            if side == "left" and with_noise:
                offset = int(values.get("num_blocks", 256)) + int(values.get("block_offset", 0))
                noisy = {
                    **values,
                    "model_id": f"{values['model_id']}-disjoint",
                    "block_offset": offset,
                }
                steps.append(task_step(f"eaft_{run}left_noise", "eaft_single", noisy,
                                       where=f"{where} run {run_name} noise"))  # fmt: skip
        if len(sides) == 2:
            noise = ([{"$output": f"eaft_{run}left"}, {"$output": f"eaft_{run}left_noise"}]
                     if with_noise else None)  # fmt: skip
            steps.append({"name": f"gate_{run}".rstrip("_"), "summarize": {
                "left": {"$output": f"eaft_{run}left"}, "right": {"$output": f"eaft_{run}right"},
                "out_md": f"reports/{name}_{run}".rstrip("_") + ".md", "allow_informational": True,
                "comparison": comparison, "noise": noise,
                **({"gates_json": gates} if gates else {})}})  # fmt: skip
    return {"schema_version": PLAN_SCHEMA_VERSION, "name": name, "steps": steps,
            "env": _engine_env(recipe)}  # fmt: skip


def _engine_env(recipe: Mapping[str, Any]) -> dict[str, str]:
    """Engine variables of the recipe, its overrides and every matrix entry, as the job's env.

    The job is one process tree, so they apply to every step (later entries win); they matter
    to serving engines (SGLang, vLLM) and are inert for the project's own forward.
    """
    env: dict[str, str] = {}
    sources = [recipe.get("engine_defaults"), recipe.get("engine_overrides")]
    sources += [r.get("engine_overrides") for r in recipe.get("run_matrix") or []]
    for source in sources:
        env.update({str(k): str(v) for k, v in ((source or {}).get("env") or {}).items()})
    return env


def plan_for(
    recipe: Mapping[str, Any], *, path: Path, model_path: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """The plan of any runnable recipe kind (planned recipes and score snapshots are refused)."""
    where = f"recipe {path}"
    if recipe.get("status") == "planned":
        raise ConfigError(f"{where} is marked planned (status: planned); it resolves but does not run",
                          hint="Copy it, set status: ready and the paths of your target.")  # fmt: skip
    kind = recipe.get("kind")
    if kind == "playbook":
        return playbook_plan(recipe, where=where)
    if kind == "reap_recipe":
        return reap_recipe_plan(recipe, where=where, recipe_dir=path.parent,
                                model_path=model_path, overwrite=overwrite)  # fmt: skip
    if kind == "eval_recipe":
        return eval_recipe_plan(recipe, where=where)
    raise ConfigError(f"{where}: a {kind} recipe does not run on its own",
                      hint="reap_scores are used through a reap_recipe's from_scores; eval_base "
                      "through an eval_recipe that extends it.")  # fmt: skip


def step_names(plan: Mapping[str, Any]) -> Sequence[str]:
    """The plan's step names in order (for printing)."""
    return [str(s["name"]) for s in plan["steps"]]
