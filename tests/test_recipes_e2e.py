"""Every tiny-scale recipe end to end on the local target, through `versa-run` as a user types
it: the demo playbook, the tiny build, the noise floor, the pair read from the build's manifest;
and a playbook that fails stops at that step, detached and re-attached like any run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from versa_runner.recipes.demo import prepare_demo_inputs

pytestmark = pytest.mark.slow
TINY = Path(__file__).resolve().parents[1] / "recipes" / "tiny"
DEMO_BUDGET_S = 180  # the bound on 2 cores


def _versa(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "versa_runner", *args, "--output-dir", str(cwd)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=900)  # fmt: skip


def _record(out: Path) -> dict:
    [path] = [p for p in (out / "reports").glob("playbook_*.json") if "_plan" not in p.name][-1:]
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def demo(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, subprocess.CompletedProcess[str], float]:
    out = tmp_path_factory.mktemp("demo")
    load = os.getloadavg()[0]
    started = time.monotonic()
    done = _versa("demo", cwd=out)
    # The bound is for 2 free cores. On a shared box (CI, several agents) the budget scales with
    # the contention seen at the start: 78 s idle vs 276 s at load 9.6 on 2 cores (measured).
    contention = max(1.0, max(load, os.getloadavg()[0]) / (os.cpu_count() or 1))
    return out, done, (time.monotonic() - started) / contention


def test_demo_runs_the_playbook_and_tells_the_story(demo):
    out, done, elapsed_s = demo
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert elapsed_s < DEMO_BUDGET_S, f"demo took {elapsed_s:.0f} s (scaled to free cores)"
    text = done.stdout
    assert "noise floor (base vs base, disjoint blocks)" in text
    assert "gate near-lossless-v1, value (noise level) per check" in text
    assert "light (keep 0.75) vs heavy (keep 0.25) prune at this scale:" in text
    record = _record(out)
    assert record["state"] == "succeeded"
    names = [s["name"] for s in record["steps"]]
    assert names[:4] == ["validate", "build_light", "build_heavy", "eaft_base"]
    for step in record["steps"]:
        assert step["state"] == "done"
        if "notebook" in step:  # every step's executed notebook is kept
            assert (out / step["notebook"]).is_file()
    for report in record["reports"]:
        assert (out / report).is_file() and str(out / report) in text  # every path printed
    recipe = (
        out / f"artifacts/playbook_models/{record['run_id']}/heavy/reap-recipe.yaml"
    ).read_text()
    assert "cut_from:" in recipe and "reap-scores.yaml" in recipe  # re-cut, no forward
    gates = {s["name"]: s["gate"] for s in record["steps"] if "gate" in s}
    assert gates["gate_noise"]["noise"] and gates["gate_light"]["noise"][0]["measured"] is not None


def test_tiny_recipes_build_then_pair_from_manifest_then_noise(demo):
    out, _, _ = demo  # models/base and packs/ are there
    build = _versa(
        "recipe", "run", str(TINY / "reap-recipe_tiny_budgeted050.yaml"), "--no-detach", cwd=out
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-2000:]
    manifest = json.loads(
        (out / "artifacts/20b_pruned_models_eaftreap_budgeted/manifest.json").read_text()
    )
    pruned = Path(manifest["out_dir"])
    assert (pruned / "reap-recipe.yaml").is_file() and (pruned / "reap-scores.yaml").is_file()
    pair = _versa(
        "recipe", "run", str(TINY / "eval-tiny_budgeted050_vs_base.yaml"), "--no-detach", cwd=out
    )
    assert pair.returncode == 0, pair.stdout[-3000:] + pair.stderr[-2000:]
    eaft = json.loads(
        next((out / "artifacts/eaft_models").glob("*_eaft_right/tiny-budgeted050.json")).read_text()
    )
    assert Path(eaft["meta"]["model_path"]).resolve() == pruned.resolve()  # read from the manifest
    summary = (out / "reports/eaft_tiny_budgeted050_vs_base.md").read_text()
    assert "## Gate Result:" in summary and "## Gate beside its noise" in summary
    assert "disjoint blocks of the same size (tiny-base-disjoint.json)" in summary  # measured
    noise = _versa(
        "recipe", "run", str(TINY / "eval-tiny_base_vs_base_noise.yaml"), "--no-detach", cwd=out
    )
    assert noise.returncode == 0, noise.stdout[-3000:] + noise.stderr[-2000:]
    floor = (out / "reports/eaft_tiny_base_vs_base_noise.md").read_text()
    assert floor.startswith("# Noise floor") and "| threshold below noise |" in floor
    right = json.loads(
        next(
            (out / "artifacts/eaft_models").glob("*_eaft_right/tiny-base-disjoint.json")
        ).read_text()
    )
    left = json.loads(
        next((out / "artifacts/eaft_models").glob("*_eaft_left/tiny-base.json")).read_text()
    )
    assert right["meta"]["block_offset"] == 8 and left["meta"]["block_offset"] == 0
    l_rows = {p["pack"]: p["seq"]["1024"]["rows_sha256"] for p in left["packs"]}
    r_rows = {p["pack"]: p["seq"]["1024"]["rows_sha256"] for p in right["packs"]}
    assert all(l_rows[k] != r_rows[k] for k in l_rows)  # disjoint blocks


def test_the_recipe_a_build_ships_rebuilds_the_same_kept_experts(demo):
    out, _, _ = demo  # after the tiny build above
    manifest = json.loads(
        (out / "artifacts/20b_pruned_models_eaftreap_budgeted/manifest.json").read_text()
    )
    shipped = Path(manifest["out_dir"]) / "reap-recipe.yaml"
    resolved = _versa("recipe", "resolve", str(shipped), cwd=out)
    assert resolved.returncode == 0 and "keep_experts_by_layer" in resolved.stdout
    scores = _versa("recipe", "resolve", str(shipped.with_name("reap-scores.yaml")), cwd=out)
    assert scores.returncode == 0 and "kind: reap_scores" in scores.stdout, scores.stderr
    again = _versa("recipe", "run", str(shipped), "--overwrite", "--no-detach", cwd=out)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-2000:]
    assert "kept experts of" in again.stdout and "match the recipe in all 4 layers" in again.stdout


def test_a_failing_playbook_stops_at_that_step_and_is_reattached_like_any_run(tmp_path):
    prepare_demo_inputs(tmp_path, log=open(os.devnull, "w"))
    submitted = _versa(
        "playbook",
        str(TINY / "playbook-tiny_demo.yaml"),
        "--model-path",
        "models/nothing",
        cwd=tmp_path,
    )
    assert submitted.returncode == 0 and "submitted" in submitted.stdout  # detached
    waited = _versa("wait", "last", "--timeout", "300", cwd=tmp_path)
    assert waited.returncode == 1
    log = _versa("logs", "last", cwd=tmp_path).stdout
    assert "step 2/15 'build_light' failed:" in log and "models/nothing" in log
    assert "step 3/15" not in log  # nothing after the failing step ran
    record = _record(tmp_path)
    assert record["state"] == "failed" and record["failed_step"] == "build_light"
    assert [s["state"] for s in record["steps"]] == ["done", "failed"]
    assert (tmp_path / record["steps"][1]["notebook"]).is_file()  # the failed step's notebook
