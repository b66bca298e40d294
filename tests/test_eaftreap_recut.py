"""Recipes and re-cuts (issue 12) and a resume key that covers the weights (issue 14).

One profiled build of the tiny fixture (4 layers x 8 experts) is shared; each test then re-cuts,
rebuilds or re-profiles in its own folders. Model loads and forwards are counted through the
real classes (a wrapper that calls through), so "no forward" is measured, not assumed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml
from versa_kernels.errors import DataError, ParameterError

ROWS = 6
COMMON = dict(
    num_rows=ROWS, max_seq_length=96, keep_frac=0.75, min_keep_per_layer=4, max_keep_per_layer=8,
    core_pos_top_m=1, keep_n_multiple_of=1, save_every_batches=1,
)  # fmt: skip
"""CPU-sized build: 6 rows of at most 96 tokens, batch 1 (6 batches per pass)."""


@pytest.fixture(scope="module")
def fx(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from versa_kernels.fixtures import make_calib_packs, make_tiny_checkpoint

    root = tmp_path_factory.mktemp("recut")
    ckpt = make_tiny_checkpoint(root / "base")
    return {"root": root, "model": ckpt, "packs": [str(p) for p in make_calib_packs(root / "p")]}


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts model loads and forwards (the real methods still run)."""
    from versa_kernels.gptoss.model import GptOssModel

    counts = {"load": 0, "forward": 0}
    load, forward = GptOssModel.from_checkpoint.__func__, GptOssModel.forward

    def counted_load(cls: type, *a: Any, **kw: Any) -> Any:
        counts["load"] += 1
        return load(cls, *a, **kw)

    def counted_forward(self: Any, *a: Any, **kw: Any) -> Any:
        counts["forward"] += 1
        return forward(self, *a, **kw)

    monkeypatch.setattr(GptOssModel, "from_checkpoint", classmethod(counted_load))
    monkeypatch.setattr(GptOssModel, "forward", counted_forward)
    return counts


def _build(fx: dict, where: Path, **kw: Any) -> Any:
    from versa_kernels.eaftreap.build import build_pruned

    params = dict(
        model_path=str(fx["model"]), calib_pack_files=fx["packs"], artifacts_dir=str(where / "art"),
        reports_dir=str(where / "reports"), **COMMON,
    )  # fmt: skip
    return build_pruned(**{**params, **kw})


def _recut(fx: dict, scores: Path, where: Path, **kw: Any) -> Any:
    from versa_kernels.eaftreap.build import build_pruned

    params = {k: v for k, v in COMMON.items() if k not in ("num_rows", "max_seq_length")}
    params.update(
        model_path=str(fx["model"]), from_scores=str(scores), artifacts_dir=str(where / "art"),
        reports_dir=str(where / "reports"),
    )  # fmt: skip
    return build_pruned(**{**params, **kw})


@pytest.fixture(scope="module")
def built(fx: dict) -> Any:
    return _build(fx, fx["root"] / "first")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_build_ships_recipe_and_scores_inside_the_checkpoint(fx, built) -> None:
    from versa_kernels.eaftreap.fingerprint import weights_fingerprint

    v = built.variants[0]
    for name in ("reap-recipe.yaml", "reap-scores.yaml"):
        assert (v.out_dir / name).read_bytes() == (v.record_dir / name).read_bytes()
    recipe = yaml.safe_load((v.out_dir / "reap-recipe.yaml").read_text())
    scores = yaml.safe_load((v.out_dir / "reap-scores.yaml").read_text())
    assert (recipe["kind"], recipe["schema_version"]) == ("reap_recipe", 1)
    assert (scores["kind"], scores["schema_version"]) == ("reap_scores", 2)
    assert recipe["result"]["keep_experts_by_layer"] == v.kept
    assert len(scores["ranking_by_layer"]) == 4 and all(
        sorted(r) == list(range(8)) for r in scores["ranking_by_layer"]
    )
    assert {"pos_gate_norm_sum", "eaft_gate_norm_sum", "count"} <= set(
        scores["layer_scores"][0]["experts"][0]
    )
    repro = recipe["reproducibility"]
    assert repro["calibration_rows_sha256"] == built.sample["rows_sha256"]
    assert len(repro["calibration_rows_sha256"]) == 64
    assert repro["code"]["package_version"] == "0.1.0"
    assert len(repro["code"]["versa_kernels_sources_sha256"]) == 64
    assert repro["base_weights"]["digest"] == weights_fingerprint(fx["model"]).digest
    assert {f["name"] for f in repro["base_weights"]["files"]} >= {"config.json"}


def test_recut_from_scores_runs_no_forward_and_reproduces_the_cut(fx, built, calls, tmp_path):
    scores = built.variants[0].out_dir / "reap-scores.yaml"
    same = _recut(fx, scores, tmp_path / "same")  # same keep_frac, fresh folder
    assert same.variants[0].kept == built.variants[0].kept
    half = _recut(fx, scores, tmp_path / "half", keep_frac=0.5)
    assert calls == {"load": 0, "forward": 0}
    assert half.variants[0].kept != built.variants[0].kept
    assert sum(half.variants[0].keep_counts) == 16
    report = half.report_path.read_text()
    assert "cut from scores" in report and str(scores.resolve()) in report
    assert _sha(scores) in report and "tok/s" not in report
    manifest = json.loads((half.variants[0].record_dir / "manifest.json").read_text())
    assert manifest["cut_from"] == {
        "kind": "reap_scores", "path": str(scores.resolve()), "sha256": _sha(scores),
    }  # fmt: skip
    # The re-cut ships the very scores it was cut from, and a recipe that names them.
    assert _sha(half.out_dir / "reap-scores.yaml") == _sha(scores)
    recipe = yaml.safe_load((half.out_dir / "reap-recipe.yaml").read_text())
    assert recipe["source"]["cut_from"]["sha256"] == _sha(scores)


def test_variants_never_overwrite_each_other_and_the_index_names_them_all(fx, built, tmp_path):
    where = tmp_path / "w"
    first = _build(fx, where)
    folder = first.variants[0].record_dir
    before = {p.name: _sha(p) for p in folder.iterdir() if p.is_file()}
    recut = _recut(fx, first.variants[0].out_dir / "reap-scores.yaml", where, keep_frac=0.5)
    after = {p.name: _sha(p) for p in folder.iterdir() if p.is_file()}
    assert before == after and len(before) == 8
    index = json.loads((where / "art" / "manifest.json").read_text())
    names = {first.variants[0].name, recut.variants[0].name}
    assert set(index["variants"]) == names and len(names) == 2
    # Back-compatible top level: the primary (profiled) build, not the later re-cut.
    assert index["out_dir"] == str(first.out_dir) == index["variants"][first.variants[0].name]
    assert index["primary_variant"] == first.variants[0].name
    assert index["variant_records"][recut.variants[0].name]["cut_from"]["kind"] == "reap_scores"
    top = json.loads((where / "art" / "keep_experts_by_layer.json").read_text())
    assert top == first.variants[0].kept
    # The same variant again needs overwrite, even with its checkpoint going elsewhere.
    again = dict(keep_frac=0.5, out_dir=str(tmp_path / "elsewhere"))
    with pytest.raises(ParameterError, match="variant .*0.50.* was already built in"):
        _recut(fx, first.variants[0].out_dir / "reap-scores.yaml", where, **again)


def test_index_updates_merge_when_builds_finish_together(tmp_path: Path) -> None:
    from versa_kernels.eaftreap.variant_index import register_build

    art = tmp_path / "art"

    def finish(i: int) -> None:
        name = f"variant{i}"
        register_build(
            art, records={name: {"out_dir": f"/ckpt/{i}"}}, primary=i == 0,
            build_manifest={"variant_name": name, "out_dir": f"/ckpt/{i}"},
            primary_files={"keep_experts_by_layer.json": [[i]]},
        )  # fmt: skip

    threads = [threading.Thread(target=finish, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    index = json.loads((art / "manifest.json").read_text())
    assert index["variants"] == {f"variant{i}": f"/ckpt/{i}" for i in range(8)}
    primary = index["primary_variant"]
    assert index["out_dir"] == index["variants"][primary]
    assert [r["primary"] for r in index["variant_records"].values()].count(True) == 1
    kept = json.loads((art / "keep_experts_by_layer.json").read_text())
    assert kept == [[int(primary.removeprefix("variant"))]]


def test_shipped_recipe_rebuilds_the_same_experts(fx, built, calls, tmp_path) -> None:
    from versa_kernels.eaftreap.recipe import build_from_recipe

    recipe = yaml.safe_load((built.out_dir / "reap-recipe.yaml").read_text())
    result, same = build_from_recipe(
        recipe, artifacts_dir=str(tmp_path / "art"), reports_dir=str(tmp_path / "reports")
    )
    assert same and result.variants[0].kept == built.variants[0].kept
    assert result.variants[0].name == built.variants[0].name
    assert calls["forward"] > 0 and result.profile_meta["resumed_from_batch"] == 0  # profiled
    # The recipe of a re-cut variant describes the profile behind its scores: it rebuilds too.
    half = _recut(fx, built.out_dir / "reap-scores.yaml", tmp_path / "half", keep_frac=0.5)
    recipe = yaml.safe_load((half.out_dir / "reap-recipe.yaml").read_text())
    again, same = build_from_recipe(
        recipe, artifacts_dir=str(tmp_path / "art2"), reports_dir=str(tmp_path / "reports")
    )
    assert same and again.variants[0].kept == half.variants[0].kept


def test_recipe_with_other_rows_is_refused_before_any_forward(built, calls, tmp_path) -> None:
    from versa_kernels.eaftreap.recipe import build_from_recipe

    recipe = yaml.safe_load((built.out_dir / "reap-recipe.yaml").read_text())
    recipe["profiling_data"]["sampling"]["seed"] = 1  # other rows than the recipe recorded
    with pytest.raises(DataError, match="calibration rows sha256 .* differs"):
        build_from_recipe(recipe, artifacts_dir=str(tmp_path / "art"))
    recipe = yaml.safe_load((built.out_dir / "reap-recipe.yaml").read_text())
    recipe["reproducibility"]["base_weights"]["digest"] = "0" * 64
    with pytest.raises(ParameterError, match="expect_weights_sha256"):
        build_from_recipe(recipe, artifacts_dir=str(tmp_path / "art"))
    assert calls == {"load": 0, "forward": 0}


def _set_router_bias(model: Path, layer: int, expert: int, value: float) -> Path:
    """Overwrite one router bias in place: same shard path, inode and size."""
    import torch

    name = f"model.layers.{layer}.mlp.router.bias"
    index = json.loads((model / "model.safetensors.index.json").read_text())
    shard = model / index["weight_map"][name]
    size = shard.stat().st_size
    with open(shard, "r+b") as fh:
        header_len = int.from_bytes(fh.read(8), "little")
        entry = json.loads(fh.read(header_len))[name]
        dtype = {"BF16": torch.bfloat16, "F32": torch.float32, "F16": torch.float16}[entry["dtype"]]
        raw = torch.tensor([value], dtype=dtype).view(torch.uint8).numpy().tobytes()
        fh.seek(8 + header_len + entry["data_offsets"][0] + expert * len(raw))
        fh.write(raw)
    assert shard.stat().st_size == size
    return shard


def test_changed_weights_never_resume_a_stale_profile(fx, calls, tmp_path) -> None:
    model = tmp_path / "base"
    shutil.copytree(fx["model"], model)
    fx_local = {**fx, "model": model}
    first = _build(fx_local, tmp_path)
    nb = ROWS  # batch size 1
    assert first.profile_meta["resumed_from_batch"] == 0 and first.profile_meta["cut_from"] is None
    # Untouched weights: the finished profile resumes, no forward, and the report says so.
    loads = calls["load"]
    again = _build(fx_local, tmp_path, overwrite=True)
    assert calls["load"] == loads
    assert again.profile_meta["resumed_from_batch"] >= 2 * nb  # both passes were done
    assert again.variants[0].kept == first.variants[0].kept
    report = again.report_path.read_text()
    assert "cut from the finished profile state" in report and "tok/s" not in report
    index = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert index["primary_variant"] == first.variants[0].name  # a re-cut keeps the primary
    # One router bias changed under the same path: a fresh profile, other kept experts.
    layer0 = first.variants[0].kept[0]
    dropped = next(e for e in range(8) if e not in layer0)
    _set_router_bias(model, 0, dropped, 30.0)  # routed for every token from now on
    fresh = _build(fx_local, tmp_path, overwrite=True)
    assert calls["load"] == loads + 1
    assert fresh.profile_meta["resumed_from_batch"] == 0 and fresh.profile_meta["tokens_per_s"] > 0
    assert fresh.profile_meta["base_weights_sha256"] != first.profile_meta["base_weights_sha256"]
    assert dropped in fresh.variants[0].kept[0]


def test_weight_digests_are_cached_by_size_mtime_and_inode(fx, tmp_path) -> None:
    import os

    from versa_kernels.eaftreap.fingerprint import weights_fingerprint

    model = tmp_path / "base"
    shutil.copytree(fx["model"], model)
    cache = tmp_path / "cache.json"
    first = weights_fingerprint(model, cache_path=cache)
    assert first.hashed_bytes == sum(f["size"] for f in first.files) > 0
    again = weights_fingerprint(model, cache_path=cache)
    assert again.hashed_bytes == 0 and again == first
    shard = sorted(model.glob("*.safetensors"))[0]
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # touched, same bytes
    touched = weights_fingerprint(model, cache_path=cache)
    assert touched.hashed_bytes == st.st_size and touched.digest == first.digest
    _set_router_bias(model, 0, 0, 3.0)
    changed = weights_fingerprint(model, cache_path=cache)
    assert changed.digest != first.digest


def test_schema1_scores_recut_by_their_own_score_only(fx, built, tmp_path) -> None:
    doc = yaml.safe_load((built.out_dir / "reap-scores.yaml").read_text())
    sums = ("gate_sum", "norm_sum", "gate_norm_sum", "eaft_gate_norm_sum", "pos_gate_norm_sum")
    for layer in doc["layer_scores"]:
        for entry in layer["experts"]:
            for key in (*sums, "neg_gate_norm_sum"):
                entry.pop(key)
    doc["schema_version"] = 1
    doc.pop("profiling")
    old = tmp_path / "reap-scores-v1.yaml"
    old.write_text(yaml.safe_dump(doc, sort_keys=False))
    with pytest.raises(ParameterError, match="core_pos_top_m=1: .* has no pos_gate_norm_sum"):
        _recut(fx, old, tmp_path / "a")
    with pytest.raises(ParameterError, match="holds scores for 'eaft_gate_norm_sum' only"):
        _recut(fx, old, tmp_path / "b", core_pos_top_m=0, score_key="gate_norm_sum")
    v1 = _recut(fx, old, tmp_path / "c", core_pos_top_m=0)
    v2 = _recut(fx, built.out_dir / "reap-scores.yaml", tmp_path / "d", core_pos_top_m=0)
    assert v1.variants[0].kept == v2.variants[0].kept


def test_bad_recut_and_baseline_parameters_fail_before_any_work(fx, built, tmp_path) -> None:
    scores = built.out_dir / "reap-scores.yaml"
    wrong_kind = tmp_path / "recipe.yaml"
    shutil.copyfile(built.out_dir / "reap-recipe.yaml", wrong_kind)
    cases = [
        (dict(baseline_random_seeds=0), r"baseline_random_seeds=0 must be an integer in 1\.\.100"),
        (dict(baseline_eval_rows=-1), r"baseline_eval_rows=-1 must be an integer in 0\.\."),
        (dict(keep_frac=float("nan")), "keep_frac=nan must be a finite number"),
        (dict(eaft_weight_cc=float("inf")), "eaft_weight_cc=inf must be a finite number"),
        (dict(from_scores=str(scores), baseline_eval_rows=5), "baseline_eval_rows=5 with from_s"),
        (dict(from_scores=str(tmp_path / "none.yaml")), "from_scores=.* is not a file"),
        (dict(expect_rows_sha256="abc"), "expect_rows_sha256='abc' must be empty or 64"),
        (dict(calib_pack_files=[]), "calib_pack_files is empty"),
        (dict(out_dir=str(tmp_path / "art")), "holds the variant's artifacts folder"),
    ]
    for overrides, message in cases:
        with pytest.raises(ParameterError, match=message):
            _build(fx, tmp_path, **overrides)
    with pytest.raises(DataError, match="kind is 'reap_recipe', not 'reap_scores'"):
        _build(fx, tmp_path, from_scores=str(wrong_kind))
    assert not (tmp_path / "art").exists()  # nothing hashed, profiled or written


def test_an_old_single_build_manifest_becomes_an_index_entry(tmp_path: Path) -> None:
    from versa_kernels.eaftreap.variant_index import register_build

    art = tmp_path / "art"
    art.mkdir()
    old = {"schema_version": 1, "variant_name": "old", "out_dir": "/ckpt/old",
           "variants": {"old": {"out_dir": "/ckpt/old"}}}  # fmt: skip
    (art / "manifest.json").write_text(json.dumps(old))
    register_build(
        art, records={"recut": {"out_dir": "/ckpt/recut"}}, primary=False,
        build_manifest={"variant_name": "recut", "out_dir": "/ckpt/recut"}, primary_files={},
    )  # fmt: skip
    index = json.loads((art / "manifest.json").read_text())
    assert index["variants"] == {"old": "/ckpt/old", "recut": "/ckpt/recut"}
    assert index["out_dir"] == "/ckpt/old" and index["schema_version"] == 2


def test_keepfrac_task_variants_each_get_a_folder_and_rebuild_from_their_recipe(
    fx, built, tmp_path
) -> None:
    from versa_kernels.eaftreap.recipe import build_from_recipe, build_params_from_recipe

    scores = built.out_dir / "reap-scores.yaml"
    kw = dict(keep_frac=[0.75, 0.5], layout="uniform", min_keep_per_layer=None)
    res = _recut(fx, scores, tmp_path / "k", **kw)
    names = [v.name for v in res.variants]
    assert names == ["calib_union_keep6of8_k75_eaftreap", "calib_union_keep4of8_k50_eaftreap"]
    index = json.loads((tmp_path / "k" / "art" / "manifest.json").read_text())
    assert sorted(index["variants"]) == sorted(names)
    top = json.loads((tmp_path / "k" / "art" / "keep_experts_by_layer.json").read_text())
    assert top == {v.name: v.kept for v in res.variants}  # several variants: one entry each
    for v in res.variants:
        assert json.loads((v.record_dir / "keep_experts_by_layer.json").read_text()) == v.kept
        recipe = yaml.safe_load((v.out_dir / "reap-recipe.yaml").read_text())
        assert build_params_from_recipe(recipe)["keep_frac"] == [v.keep_frac]
    recipe = yaml.safe_load((res.variants[1].out_dir / "reap-recipe.yaml").read_text())
    again, same = build_from_recipe(
        recipe, artifacts_dir=str(tmp_path / "again"), reports_dir=str(tmp_path / "reports")
    )
    assert same and again.variants[0].name == res.variants[1].name
    recipe["scoring"]["entropy_topk"] = 32
    with pytest.raises(ParameterError, match="entropy_topk=32"):
        build_params_from_recipe(recipe)


def test_a_recipe_extending_a_shipped_one_recuts_from_scores(fx, built, calls, tmp_path) -> None:
    from versa_kernels.eaftreap.recipe import build_from_recipe

    shipped = yaml.safe_load((built.out_dir / "reap-recipe.yaml").read_text())
    child = {**shipped, "from_scores": "reap-scores.yaml"}  # what `extends` resolves to
    child["model"] = {**shipped["model"], "keep_frac_requested": 0.5}
    result, same = build_from_recipe(
        child, recipe_dir=built.out_dir, artifacts_dir=str(tmp_path / "art"),
        reports_dir=str(tmp_path / "reports"),
    )  # fmt: skip
    assert same is None  # the inherited result belongs to the 0.75 variant
    assert calls == {"load": 0, "forward": 0}
    assert result.profile_meta["cut_from"]["path"] == str(built.out_dir / "reap-scores.yaml")
    assert sum(result.variants[0].keep_counts) == 16


def test_two_builds_finishing_at_once_both_land_in_the_index(fx, built, tmp_path) -> None:
    import os
    import subprocess
    import sys

    scores = built.out_dir / "reap-scores.yaml"
    art, reports = tmp_path / "art", tmp_path / "reports"
    script = (
        "import sys\n"
        "from versa_kernels.eaftreap.build import build_pruned\n"
        f"build_pruned(model_path={str(fx['model'])!r}, from_scores={str(scores)!r},\n"
        "    keep_frac=float(sys.argv[1]), min_keep_per_layer=4, max_keep_per_layer=8,\n"
        "    core_pos_top_m=1, keep_n_multiple_of=1,\n"
        f"    artifacts_dir={str(art)!r}, reports_dir={str(reports)!r})\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen([sys.executable, "-c", script, kf], env=env, stderr=subprocess.PIPE)
        for kf in ("0.5", "0.625", "0.875")
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-2000:]
    index = json.loads((art / "manifest.json").read_text())
    assert len(index["variants"]) == 3
    for name, out_dir in index["variants"].items():
        record = json.loads((art / name / "manifest.json").read_text())
        assert record["out_dir"] == out_dir and Path(out_dir, "reap-recipe.yaml").is_file()
    assert index["out_dir"] in index["variants"].values()  # the first to finish became primary


def test_the_recipe_mapper_imports_without_torch() -> None:
    import subprocess
    import sys

    probe = "import sys, versa_kernels.eaftreap.recipe; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"  # the host may call build_params_from_recipe
