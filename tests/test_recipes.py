"""Recipe `extends` resolution: order, deep merge, diamonds, cycles and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from versa_runner.errors import ConfigError
from versa_runner.recipes import collector_runs, dump_recipe, load_recipe, merge_recipes


def _w(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(obj if isinstance(obj, str) else yaml.safe_dump(obj, sort_keys=False))
    return path


EVAL_BASE = {
    "schema_version": 1,
    "kind": "eval_base",
    "name": "eaft_calib_packs_base",
    "eaft": {"entropy_topk": 20, "cc_quantile": 0.15, "prob_scale": "linear"},
    "collector_defaults": {
        "top_k": 4,
        "sample_points": 200000,
        "num_blocks": 512,
        "seq_lens_csv": "1024,2048",
    },
    "calib_packs": {"pack_files": ["a.parquet", "b.parquet", "c.parquet"]},
}


def test_child_overrides_parent_deeply_and_replaces_lists(tmp_path):
    _w(tmp_path / "base" / "eval-base.yaml", EVAL_BASE)
    child = _w(
        tmp_path / "recipes" / "eval-x.yaml",
        {
            "schema_version": 1,
            "kind": "eval_recipe",
            "extends": "../base/eval-base.yaml",  # relative to the child's directory
            "name": "x",
            "eaft": {"prob_scale": "log"},
            "calib_packs": {"pack_files": ["only.parquet"]},
        },
    )
    r = load_recipe(child)
    assert "extends" not in r
    assert r["kind"] == "eval_recipe" and r["name"] == "x"
    assert r["eaft"] == {"entropy_topk": 20, "cc_quantile": 0.15, "prob_scale": "log"}
    assert r["calib_packs"]["pack_files"] == ["only.parquet"]
    assert list(r)[:3] == ["schema_version", "kind", "name"]  # parent order kept
    assert yaml.safe_load(dump_recipe(r)) == r


def test_multiple_parents_merge_left_to_right_and_diamond_is_not_a_cycle(tmp_path):
    _w(tmp_path / "base.yaml", {"schema_version": 1, "kind": "eval_base", "name": "b",
                                "collector_defaults": {"top_k": 4}})  # fmt: skip
    _w(tmp_path / "left.yaml", {"extends": "base.yaml", "name": "l",
                                "collector_defaults": {"num_blocks": 2}})  # fmt: skip
    _w(tmp_path / "right.yaml", {"extends": "base.yaml", "name": "r",
                                 "collector_defaults": {"batch_size": 3}})  # fmt: skip
    top = _w(tmp_path / "top.yaml", {"extends": ["left.yaml", "right.yaml"],
                                     "kind": "eval_recipe", "comparison": "noise"})  # fmt: skip
    assert load_recipe(top) == {
        "schema_version": 1, "kind": "eval_recipe", "name": "r", "comparison": "noise",
        "collector_defaults": {"top_k": 4, "num_blocks": 2, "batch_size": 3},
    }  # fmt: skip


def test_cycle_is_named(tmp_path):
    _w(tmp_path / "a.yaml", {"extends": "b.yaml", "kind": "eval_base", "schema_version": 1})
    _w(tmp_path / "b.yaml", {"extends": "a.yaml", "kind": "eval_base", "schema_version": 1})
    with pytest.raises(ConfigError, match=r"a.yaml -> b.yaml -> a.yaml") as info:
        load_recipe(tmp_path / "a.yaml")
    assert info.value.hint
    _w(tmp_path / "self.yaml", {"extends": "self.yaml", "kind": "eval_base"})
    with pytest.raises(ConfigError, match="extends itself"):
        load_recipe(tmp_path / "self.yaml")


@pytest.mark.parametrize(
    "content,message",
    [
        ("- a\n- b\n", "top level must be a mapping"),
        ("a: [1,\n", "not readable YAML"),
        ({"extends": 3}, "'extends' must be a path"),
        ({"extends": "missing.yaml"}, "missing.yaml not found"),
        ({"schema_version": 1, "name": "x"}, "no `kind`"),
        ({"schema_version": 1, "kind": "eval_thing"}, "kind 'eval_thing' is not one of"),
        ({"schema_version": 9, "kind": "eval_base"}, "eval_base schema_version 9 is not supported"),
        ({"schema_version": 1, "kind": "eval_base", "status": "someday"}, "status 'someday'"),
    ],
)
def test_bad_recipes_give_clear_errors(tmp_path, content, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe(_w(tmp_path / "r.yaml", content))


def test_merge_does_not_mutate_inputs():
    base = {"m": {"x": [1]}}
    out = merge_recipes(base, {"m": {"y": 1}})
    out["m"]["x"].append(2)
    assert base == {"m": {"x": [1]}}


def test_unknown_key_is_named_with_its_file(tmp_path):
    _w(tmp_path / "eval-base.yaml", EVAL_BASE)
    typo = _w(tmp_path / "sub" / "eval-x.yaml", {"extends": "../eval-base.yaml",
                                                 "kind": "eval_recipe", "collector_overides": {}})  # fmt: skip
    with pytest.raises(ConfigError, match=r"eval-x.yaml: unknown key 'collector_overides'"):
        load_recipe(typo)
    nested = _w(tmp_path / "eval-y.yaml", {"extends": "eval-base.yaml", "kind": "eval_recipe",
                                           "pair": {"left": {"modle_path": "/m"}}})  # fmt: skip
    with pytest.raises(
        ConfigError, match=r"eval-y.yaml: unknown key 'pair.left.modle_path'"
    ) as info:
        load_recipe(nested)
    assert "model_path" in info.value.hint  # the allowed keys are listed
    in_matrix = _w(tmp_path / "eval-z.yaml", {"extends": "eval-base.yaml", "kind": "eval_recipe",
                                              "run_matrix": [{"name": "a", "collector_overrides": {"seq": 1}}]})  # fmt: skip
    with pytest.raises(ConfigError, match=r"'run_matrix\[0\].collector_overrides.seq'"):
        load_recipe(in_matrix)
    bad_parent = _w(tmp_path / "p.yaml", {"kind": "eval_base", "schema_version": 1, "bogus": 1})
    child = _w(tmp_path / "c.yaml", {"extends": "p.yaml", "kind": "eval_recipe"})
    with pytest.raises(ConfigError, match=r"p.yaml: unknown key 'bogus'"):
        load_recipe(child)  # the parent's own file is named, not the child's
    assert bad_parent.exists()


def test_collector_runs_apply_overrides_and_matrix(tmp_path):
    _w(tmp_path / "eval-base.yaml", EVAL_BASE)
    single = _w(
        tmp_path / "s.yaml",
        {"extends": "eval-base.yaml", "kind": "eval_recipe", "name": "s",
         "collector_overrides": {"num_blocks": 64}},
    )  # fmt: skip
    [(name, params)] = collector_runs(load_recipe(single))
    assert name == "s" and params["num_blocks"] == 64 and params["top_k"] == 4
    matrix = _w(
        tmp_path / "m.yaml",
        {
            "extends": "eval-base.yaml",
            "kind": "eval_recipe",
            "run_matrix": [
                {
                    "name": "seq4096",
                    "collector_overrides": {"seq_lens_csv": "4096", "batch_size": 4},
                },
                {"name": "seq8192", "collector_overrides": {"seq_lens_csv": "8192"}},
            ],
        },
    )
    runs = dict(collector_runs(load_recipe(matrix)))
    assert runs["seq4096"]["seq_lens_csv"] == "4096" and runs["seq4096"]["batch_size"] == 4
    assert runs["seq8192"]["num_blocks"] == 512
    with pytest.raises(ConfigError, match="run_matrix"):
        collector_runs({"run_matrix": [{"collector_overrides": {}}]})
