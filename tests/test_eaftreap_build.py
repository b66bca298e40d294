"""build_pruned end to end: the playbook's step-1 command through versa-run, and early refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from versa_kernels.errors import ParameterError

PLAYBOOK_FLAGS = [
    "--task", "build_pruned_20b_eaftreap_budgeted",
    "--calib-packs-repo", "radna0/harmony-qwen3-calib-packs-v2-20260113",
    "--calib-pack-sample-strategy", "per_file",
    "--batch-size", "1",
    "--keep-frac", "0.75",
    "--min-keep-per-layer", "16", "--max-keep-per-layer", "32",
    "--core-pos-top-m", "4", "--core-count-top-m", "0",
]  # fmt: skip
"""Seed playbook step 1 as written; only the paths and the CPU-sized row count differ."""


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    from versa_kernels.fixtures import make_calib_packs, make_tiny_checkpoint

    root = tmp_path_factory.mktemp("build")
    # 32 experts per layer like gpt-oss-20b, so the playbook's 16..32 bounds apply as written.
    ckpt = make_tiny_checkpoint(root / "base", layers=2, experts=32, top_k=4)
    return ckpt, make_calib_packs(root / "packs", rows=12)


@pytest.mark.slow
def test_playbook_step1_runs_through_versa_run(inputs, tmp_path: Path) -> None:
    ckpt, packs = inputs
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # the hub is not reachable: local pack paths
    cmd = [
        sys.executable, "-m", "versa_runner.cli", "--output-dir", str(tmp_path),
        *PLAYBOOK_FLAGS, "--no-detach", "--model-path", str(ckpt),
        "--calib-pack-files", ",".join(str(p) for p in packs),
        "--num-rows", "9", "--max-seq-length", "128",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    art = tmp_path / "artifacts" / "20b_pruned_models_eaftreap_budgeted"
    manifest = json.loads((art / "manifest.json").read_text())
    counts = json.loads((art / "keep_counts_by_layer.json").read_text())
    cores = json.loads((art / "core_experts_by_layer.json").read_text())
    kept = json.loads((art / "keep_experts_by_layer.json").read_text())
    assert sum(counts) == round(0.75 * 2 * 32) and all(16 <= c <= 32 for c in counts)
    assert manifest["layout"] == "per-layer" and manifest["keep_counts_by_layer"] == counts
    assert manifest["calib"]["rows_used"] == 9 and len(manifest["calib"]["rows_sha256"]) == 64
    for core, ids in zip(cores, kept, strict=True):
        assert len(core) == 4 and set(core) <= set(ids) and ids == sorted(ids)
    out = Path(manifest["out_dir"])
    assert out.is_absolute() and (out / "expert_mapping.json").is_file()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_experts_per_tok"] == 4 and cfg["num_local_experts"] % 4 == 0
    for name in ("scores.parquet", "reap-scores.yaml", "reap-recipe.yaml"):
        assert (art / name).stat().st_size > 0
    import yaml

    recipe = yaml.safe_load((art / "reap-recipe.yaml").read_text())
    assert recipe["kind"] == "reap_recipe" and recipe["schema_version"] == 1
    scores = yaml.safe_load((art / "reap-scores.yaml").read_text())
    assert scores["kind"] == "reap_scores" and len(scores["ranking_by_layer"]) == 2
    # The checkpoint ships both YAMLs; its variant has its own folder named in the index.
    for name in ("reap-recipe.yaml", "reap-scores.yaml"):
        assert (out / name).read_bytes() == (art / manifest["variant_name"] / name).read_bytes()
    assert manifest["variants"] == {manifest["variant_name"]: str(out)}
    executed = next((tmp_path / "reports" / "notebooks").glob("*build_pruned*.ipynb"))
    assert '"image/png"' in executed.read_text()  # allocation plots shown inline
    assert any((tmp_path / "reports").glob("build_pruned_*_allocation.png"))


def test_infeasible_flags_fail_before_any_work(inputs, tmp_path: Path, monkeypatch) -> None:
    from versa_kernels.eaftreap.build import build_pruned

    ckpt, packs = inputs
    monkeypatch.chdir(tmp_path)
    common = dict(model_path=str(ckpt), calib_pack_files=[str(p) for p in packs], num_rows=4)
    cases = [
        (dict(min_keep_per_layer=20, max_keep_per_layer=16), "larger than max_keep_per_layer"),
        (dict(min_keep_per_layer=28), r"budget round\(keep_frac\*L\*E\)=48 is outside"),
        (dict(min_keep_per_layer=2), "below the router top_k=4"),
        (dict(core_pos_top_m=10, min_keep_per_layer=8), "safety core up to"),
        (dict(layout="uniform", keep_frac=0.25, min_keep_per_layer=16), "uniform keep_n=8"),
        (dict(score_key="loudness"), "score_key='loudness' is not one of"),
        (dict(out_dir=str(ckpt)), "overlaps the base checkpoint"),
    ]
    for overrides, message in cases:
        with pytest.raises(ParameterError, match=message):
            build_pruned(**{**common, **overrides})
    assert not (tmp_path / "artifacts").exists()  # nothing profiled, nothing written


def test_baseline_comparison_is_a_build_parameter(inputs, tmp_path: Path) -> None:
    import yaml
    from versa_kernels.eaftreap.build import build_pruned

    ckpt, packs = inputs
    result = build_pruned(
        model_path=str(ckpt), calib_pack_files=[str(p) for p in packs], num_rows=4,
        max_seq_length=96, keep_frac=0.75, min_keep_per_layer=16, max_keep_per_layer=32,
        baseline_eval_rows=3, baseline_random_seeds=2, artifacts_dir=str(tmp_path / "art"),
        reports_dir=str(tmp_path / "reports"),
    )  # fmt: skip
    v = result.variants[0]
    b = v.baselines
    assert b is not None and b["eval_rows"] == 3 and b["random_seeds"] == 2
    assert len(b["random_ppl"]) == 2 and len(set(b["random_ppl"])) == 2  # two different prunes
    assert "random (mean of 2)" in result.report_path.read_text()
    recipe = yaml.safe_load((v.out_dir / "reap-recipe.yaml").read_text())
    baselines = {"methods": ["frequency", "random"], "eval_rows": 3, "random_seeds": 2}
    assert recipe["evaluation"] == {"baselines": baselines}
    from versa_kernels.eaftreap.recipe import build_params_from_recipe

    params = build_params_from_recipe(recipe)
    assert (params["baseline_eval_rows"], params["baseline_random_seeds"]) == (3, 2)
