"""The recipes shipped in recipes/: every named one of seed 003 is there and resolves, each
runnable one turns into a plan whose steps the tasks accept, and the CLI resolves them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from versa_runner.cli.main import main
from versa_runner.errors import ConfigError, UsageError
from versa_runner.recipes import load_recipe
from versa_runner.recipes.driver import resolve_refs, step_output
from versa_runner.recipes.plan import plan_for

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
SHIPPED = sorted(RECIPES.rglob("*.yaml"))
SEED_003 = (  # "Current recipes" of the seed document, by name
    "reap-recipe_20b_eaftreap_keepfrac075_keep24_uniform.yaml",
    "reap-recipe_20b_eaftreap_keepfrac060_keep20.yaml",
    "reap-recipe_120b_eaftreap_keepfrac075_planned.yaml",
    "reap-scores_20b_eaftreap_keepfrac075_keep24_uniform.yaml",
    "reap-scores_20b_eaftreap_keepfrac075_budgeted.yaml",
    "reap-scores_20b_eaftreap_keepfrac060_keep19.yaml",
    "eval-base.yaml",
    "eval-20b_base_vs_base_noise_bigblocks.yaml",
    "eval-20b_noop_rewrite_lossless_bigblocks.yaml",
    "eval-20b_eaftreap075_bigblocks_keep24_uniform.yaml",
    "eval-20b_eaftreap075_longseq_tokenbudget1m_keep24_uniform.yaml",
    "eval-20b_eaftreap060_bigblocks_keep20_uniform.yaml",
    "eval-20b_eaftreap060_longseq_tokenbudget1m_keep20_uniform.yaml",
    "eval-20b_eaftreap075_extreme_ctx65k_131k.yaml",
    "eval-120b_base_bigblocks.yaml",
    "eval-120b_base_longseq_tokenbudget1m.yaml",
    "costprobe-120b_partial_prune_layer0_keepfrac075.yaml",
)


def test_every_named_recipe_of_seed_003_ships():
    assert sorted(set(SEED_003) - {p.name for p in SHIPPED}) == []


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(RECIPES)))
def test_shipped_recipe_resolves_and_runnable_ones_plan(path):
    recipe = load_recipe(path)
    assert "extends" not in recipe and recipe["kind"] and recipe["schema_version"]
    if "120b" in path.name:
        assert recipe.get("status") == "planned"  # planned, but valid
    if recipe.get("status") == "planned" or recipe["kind"] in ("eval_base", "reap_scores"):
        with pytest.raises(ConfigError, match="planned|does not run on its own"):
            plan_for(recipe, path=path)
        return
    plan = plan_for(recipe, path=path)
    assert plan["steps"]
    for step in plan["steps"]:
        if "task" in step:
            assert (RECIPES.parent / "notebooks" / step["notebook"]).is_file()


def test_eval_recipes_pair_every_matrix_entry_on_the_same_blocks():
    path = RECIPES / "eval-20b_eaftreap075_longseq_tokenbudget1m_keep24_uniform.yaml"
    plan = plan_for(load_recipe(path), path=path)
    eaft = {s["name"]: s["params"] for s in plan["steps"] if s.get("task") == "eaft_single"}
    for run in ("seq4096_blocks256_bs4", "seq8192_blocks128_bs2", "seq16384_blocks64_bs1"):
        left, right = eaft[f"eaft_{run}_left"], eaft[f"eaft_{run}_right"]
        same = ("seq_lens_csv", "num_blocks", "batch_size", "calib_pack_files", "block_offset")
        assert all(left[k] == right[k] for k in same)
        assert right["model_path"] == {"$manifest": {
            "manifest_json": "artifacts/20b_pruned_models_eaftreap_keepfrac/manifest.json",
            "field": "variants.calib_union_keep24of32_k75_eaftreap"}}  # fmt: skip
    assert eaft["eaft_seq4096_blocks256_bs4_left"]["num_blocks"] == 256
    assert plan["env"]["MEM_FRACTION_STATIC"] == "0.86"  # engine env: the job's, never dropped
    assert plan["env"]["SGLANG_DISABLE_FLASHINFER_AUTOTUNE"] == "1"
    noise = RECIPES / "eval-20b_base_vs_base_noise_bigblocks.yaml"
    steps = {s["name"]: s for s in plan_for(load_recipe(noise), path=noise)["steps"]}
    assert steps["eaft_right"]["params"]["block_offset"] == 512  # disjoint, same size
    assert steps["eaft_right"]["params"]["num_blocks"] == steps["eaft_left"]["params"]["num_blocks"]
    assert steps["gate"]["summarize"]["comparison"] == "noise"


def test_an_eval_recipe_with_noise_enabled_measures_it_in_the_same_job():
    path = RECIPES / "tiny" / "eval-tiny_budgeted050_vs_base.yaml"
    steps = {s["name"]: s for s in plan_for(load_recipe(path), path=path)["steps"]}
    left, noise = steps["eaft_left"]["params"], steps["eaft_left_noise"]["params"]
    assert (
        noise["block_offset"] == left["num_blocks"] == 8
        and noise["model_path"] == left["model_path"]
    )
    assert steps["gate"]["summarize"]["noise"] == [{"$output": "eaft_left"},
                                                   {"$output": "eaft_left_noise"}]  # fmt: skip


def test_reap_recipe_builds_through_the_task_with_its_flags():
    path = RECIPES / "reap-recipe_20b_eaftreap_keepfrac060_keep20.yaml"
    [step] = plan_for(load_recipe(path), path=path)["steps"]
    assert step["task"] == "build_pruned_20b_eaftreap_keepfrac"
    p = step["params"]
    assert p["keep_frac"] == [0.6] and p["layout"] == "uniform" and p["num_rows"] == 2000
    assert p["model_path"] == "/kaggle/input/gpt-oss-20b/transformers/default/1"
    assert p["baseline_random_seeds"] == 5 and p["from_scores"] == ""
    override = plan_for(load_recipe(path), path=path, model_path="/m")["steps"][0]["params"]
    assert override["model_path"] == "/m"


def test_recipe_values_a_task_cannot_honour_are_refused(tmp_path):
    base = RECIPES / "eval-base.yaml"
    bad = tmp_path / "eval-bad.yaml"
    bad.write_text(yaml.safe_dump({
        "schema_version": 1, "kind": "eval_recipe", "extends": str(base),
        "pair": {"left": {"model_id": "m", "model_path": "/m"}},
        "collector_overrides": {"top_k": 0}}))  # fmt: skip
    with pytest.raises(UsageError, match="--top-k: expected an integer in"):
        plan_for(load_recipe(bad), path=bad)
    bad.write_text(yaml.safe_dump({
        "schema_version": 1, "kind": "eval_recipe", "extends": str(base),
        "eaft": {"prob_scale": "log"}, "pair": {"left": {"model_id": "m", "model_path": "/m"}}}))  # fmt: skip
    with pytest.raises(ConfigError, match="eaft.prob_scale='log'"):
        plan_for(load_recipe(bad), path=bad)


def test_model_path_from_manifest_is_read_from_the_named_build(tmp_path):
    manifest = tmp_path / "artifacts" / "b" / "manifest.json"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({"out_dir": "/x", "variants": {"v1": "/ckpt/v1"}}))
    ref = {"$manifest": {"manifest_json": "artifacts/b/manifest.json", "field": "variants.v1"}}
    assert resolve_refs({"model_path": ref}, outputs={}, cwd=tmp_path) == {"model_path": "/ckpt/v1"}
    missing = {"$manifest": {"manifest_json": "artifacts/b/manifest.json", "field": "variants.v2"}}
    with pytest.raises(RuntimeError, match="no field 'variants.v2'"):
        resolve_refs(missing, outputs={}, cwd=tmp_path)
    step = {"name": "e", "task": "eaft_single", "params": {"model_id": "openai/gpt-oss-20b"}}
    assert step_output(step, "R") == "artifacts/eaft_models/R_e/openai__gpt-oss-20b.json"


def test_cli_recipe_resolve_prints_the_merged_recipe(capsys):
    path = RECIPES / "reap-recipe_20b_eaftreap_keepfrac060_keep20.yaml"
    assert main(["recipe", "resolve", str(path)]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == load_recipe(path)
    assert main(["recipe", "run", str(RECIPES / "eval-120b_base_bigblocks.yaml")]) == 2
    assert "marked planned" in capsys.readouterr().err
    assert (
        main(["recipe", "run", str(RECIPES / "tiny" / "playbook-tiny_demo.yaml"), "--show-plan"])
        == 0
    )
    plan = json.loads(capsys.readouterr().out)
    assert [s["name"] for s in plan["steps"]][:4] == [
        "validate",
        "build_light",
        "build_heavy",
        "eaft_base",
    ]
