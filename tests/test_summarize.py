"""Pair summary and gate on hand-built collector JSONs: JS2D, each threshold, each refusal."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon

from versa_runner.errors import ConfigError, UsageError
from versa_runner.parity.summarize import (
    DEFAULT_GATES_PATH,
    compare_runs,
    js_divergence_2d,
    load_gates,
    main,
)

REPO = Path(__file__).resolve().parents[1]
XBINS, YBINS = 160, 120


def _counts(seed: int, shift: float = 0.0) -> list[float]:
    """A smooth 2-D histogram (mass near high p / low H), optionally shifted toward low p."""
    rng = np.random.default_rng(seed)
    x = np.clip(rng.beta(2.0, 1.2, 20000) - shift, 0, 0.9999)
    h = np.clip(rng.beta(1.2, 3.0, 20000), 0, 0.9999)
    grid, _, _ = np.histogram2d(x, h, bins=[XBINS, YBINS], range=[[0, 1], [0, 1]])
    return grid.reshape(-1).tolist()  # x-major: idx = ix*ybins + iy


def _model(ppl=5.0, cc=0.0015, mean_p=0.45, counts=None):
    return {
        "ppl": ppl,
        "cc_rate": cc,
        "mean_prob": mean_p,
        "x_thr": 0.02,
        "h_thr": 0.03,
        "kept_tokens": 20000,
        "x_scale": "p_t",
        "hist2d_x_H": {
            "x_edges": np.linspace(0, 1, XBINS + 1).tolist(),
            "y_edges": np.linspace(0, 1, YBINS + 1).tolist(),
            "counts": counts if counts is not None else _counts(0),
            "xbins": XBINS,
            "ybins": YBINS,
        },
    }


def _run(model_id="base", packs=("UNION", "pack_a"), seqs=("1024", "2048"), **model_kw):
    meta = {
        "model_id": model_id,
        "entropy_topk": 20,
        "hist_xbins": XBINS,
        "hist_ybins": YBINS,
        "prob_scale": "linear",
        "x_min": 0.0,
        "x_max": 1.0,
        "cc_quantile": 0.15,
    }
    return {
        "schema_version": 1,
        "meta": meta,
        "packs": [
            {
                "pack": pack,
                "seq": {
                    s: {
                        "rows_seen": 10,
                        "rows_sha256": f"sha-{pack}-{s}",
                        "model": _model(**model_kw),
                    }
                    for s in seqs
                },
            }
            for pack in packs
        ],
    }


def _write(tmp_path: Path, name: str, obj) -> str:
    path = tmp_path / name
    path.write_text(json.dumps(obj))
    return str(path)


def _set(run, pack, field, value, seq="1024"):
    for p in run["packs"]:
        if p["pack"] == pack:
            p["seq"][seq]["model"][field] = value
    return run


def test_js2d_matches_scipy_on_the_same_counts():
    a, b = _counts(1), _counts(2, shift=0.1)
    expected = jensenshannon(np.array(a), np.array(b), base=math.e) ** 2
    assert js_divergence_2d(a, b) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert js_divergence_2d(a, a) == 0.0
    assert js_divergence_2d([1, 0], [0, 1]) == pytest.approx(math.log(2))
    with pytest.raises(ValueError):
        js_divergence_2d([0, 0], [1, 2])


def test_base_against_itself_passes_with_zero_deltas(tmp_path):
    left = _write(tmp_path, "left.json", _run())
    out = tmp_path / "r" / "pair.md"
    assert main(["--left-json", left, "--right-json", left, "--out-md", str(out)]) == 0
    text = out.read_text()
    assert "## Gate Result: PASS" in text
    assert "seq=1024: ΔPPL=+0.000 | ΔCC=+0.000pp | Δmean_p=+0.0000 | JS2D=0.0000" in text
    assert "seq=2048" in text and "| pack_a | 1024 |" in text
    png = tmp_path / "r" / "pair_plots" / "UNION_1024.png"
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"
    assert "(pair_plots/UNION_1024.png)" in text


@pytest.mark.parametrize(
    "field,value,check",
    [
        ("ppl", 5.26, "ppl"),  # |dPPL| 0.26 > abs bound 0.25
        ("cc_rate", 0.0015 + 0.0025, "cc"),
        ("mean_prob", 0.45 - 0.021, "mean_p"),
        ("hist2d_x_H", None, "js2d"),
    ],
)
def test_each_threshold_trips_alone(tmp_path, field, value, check):
    right = _run(model_id="cand")
    if field == "hist2d_x_H":
        shifted = _model(counts=_counts(0, shift=0.3))["hist2d_x_H"]
        _set(right, "UNION", field, shifted)
    else:
        _set(right, "UNION", field, value)
    summary = compare_runs(_run(), right, load_gates())
    assert not summary.passed
    assert len(summary.failures) == 1
    assert summary.failures[0].startswith("pack=UNION seq=1024: ")
    assert f"{check} failed" in summary.failures[0]
    others = {"ppl", "cc", "mean_p", "js2d"} - {check}
    assert not any(f"{o} failed" in summary.failures[0] for o in others)
    out = tmp_path / "fail.md"
    rc = main(
        [
            "--left-json",
            _write(tmp_path, "l.json", _run()),
            "--right-json",
            _write(tmp_path, "r.json", right),
        ]
        + ["--out-md", str(out)]
    )
    assert rc == 1
    text = out.read_text()
    assert "## Gate Result: FAIL" in text and f"{check} failed" in text


def test_relative_ppl_bound_binds_at_low_base_ppl():
    # Base PPL 2.0: 5% is 0.10 < 0.25, so dPPL 0.15 fails although under the absolute bound.
    left, right = _run(ppl=2.0), _run(ppl=2.0)
    _set(right, "UNION", "ppl", 2.15, seq="2048")
    summary = compare_runs(left, right, load_gates())
    assert [f.split(":")[0] for f in summary.failures] == ["pack=UNION seq=2048"]
    assert "ppl failed (|dPPL|=0.15 > 0.1)" in summary.failures[0]


def test_non_hero_failure_is_a_warning_not_a_fail():
    right = _set(_run(), "pack_a", "ppl", 9.0)
    summary = compare_runs(_run(), right, load_gates())
    assert summary.passed and summary.warnings and "pack=pack_a seq=1024" in summary.warnings[0]


def _refusal(tmp_path, left, right):
    out = tmp_path / "refused.md"
    rc = main(
        [
            "--left-json",
            _write(tmp_path, "l.json", left),
            "--right-json",
            _write(tmp_path, "r.json", right),
        ]
        + ["--out-md", str(out)]
    )
    assert rc == 2 and not out.exists()
    with pytest.raises(ConfigError) as info:
        compare_runs(left, right, load_gates())
    assert info.value.hint
    return str(info.value)


def test_refuses_missing_histogram(tmp_path):
    right = _set(_run(), "UNION", "hist2d_x_H", None)
    assert "no usable 2-D histogram" in _refusal(tmp_path, _run(), right)
    empty = _set(_run(), "UNION", "hist2d_x_H", _model(counts=[0.0] * XBINS * YBINS)["hist2d_x_H"])
    assert "no usable 2-D histogram" in _refusal(tmp_path, _run(), empty)


def test_refuses_missing_hero_row(tmp_path):
    assert "hero row pack=UNION seq=2048 is missing" in _refusal(
        tmp_path, _run(), _run(seqs=("1024",))
    )
    assert "hero row pack=UNION" in _refusal(tmp_path, _run(packs=("pack_a",)), _run())


def test_refuses_different_blocks(tmp_path):
    right = _run()
    right["packs"][0]["seq"]["2048"]["rows_sha256"] = "other"
    assert "different blocks" in _refusal(tmp_path, _run(), right)


@pytest.mark.parametrize(
    "key,value",
    [("entropy_topk", 10), ("hist_xbins", 80), ("hist_ybins", 60), ("prob_scale", "log")],
)
def test_refuses_different_settings(tmp_path, key, value):
    right = _run()
    right["meta"][key] = value
    assert f"{key}: left=" in _refusal(tmp_path, _run(), right)


def test_cc_under_left_thresholds_reported():
    left = _run()
    right = copy.deepcopy(left)
    # Right piles mass into the low-p / low-H corner: its own cc may look equal, under the left
    # thresholds it must not.
    counts = [0.0] * (XBINS * YBINS)
    counts[0] = 100.0  # cell ix=0, iy=0: midpoint (0.003, 0.004) is below (0.02, 0.03)
    counts[-1] = 900.0
    _set(right, "UNION", "hist2d_x_H", _model(counts=counts)["hist2d_x_H"])
    row = compare_runs(left, right, load_gates()).hero_rows[0]
    assert row.cc_right_at_left_thr == pytest.approx(0.1)
    assert row.cc_left_at_left_thr < 0.05


def test_cc_under_thresholds_inside_the_first_bin():
    # The 15% p quantile usually sits inside the first p bin (0.00625 wide): a midpoint rule
    # would count nothing there.
    from versa_runner.parity.summarize import cc_rate_under_thresholds

    counts = [0.0] * (XBINS * YBINS)
    counts[0], counts[-1] = 100.0, 900.0  # cell (0, 0) and the top-right cell
    model = _model(counts=counts)
    share = cc_rate_under_thresholds(model, x_thr=0.00625 / 4, h_thr=0.03)
    assert share == pytest.approx(0.1 / 4)  # a quarter of cell (0, 0) lies below x_thr
    # With a reservoir sample the share is counted on the points themselves.
    model["samples"] = [[0.001, 0.01], [0.002, 0.5], [0.5, 0.01], [0.0001, 0.02]]
    assert cc_rate_under_thresholds(model, x_thr=0.0015, h_thr=0.03) == pytest.approx(0.5)


def test_gates_file_shipped_and_validated(tmp_path):
    gates = load_gates()
    assert DEFAULT_GATES_PATH.is_file() and gates.name == "near-lossless-v1"
    assert gates.primary_seq_lens == ("1024", "2048") and gates.ppl_limit(5.449) == 0.25
    bad = json.loads(DEFAULT_GATES_PATH.read_text())
    del bad["thresholds"]["max_js2d"]
    with pytest.raises(ConfigError, match="max_js2d"):
        load_gates(_write(tmp_path, "g.json", bad))
    with pytest.raises(UsageError, match="--gates-json"):
        load_gates(tmp_path / "missing.json")


def test_script_wrapper_exit_codes(tmp_path):
    left = _write(tmp_path, "l.json", _run())
    right = _write(tmp_path, "r.json", _set(_run(), "UNION", "ppl", 7.0))
    script = str(REPO / "scripts" / "summarize_eaft_pair.py")
    base = [sys.executable, script, "--left-json", left, "--out-md", str(tmp_path / "o.md")]
    ok = subprocess.run(base + ["--right-json", left], capture_output=True, text=True)
    assert ok.returncode == 0 and "[+] Wrote" in ok.stdout and "PASS" in ok.stdout
    bad = subprocess.run(base + ["--right-json", right], capture_output=True, text=True)
    assert bad.returncode == 1 and "ppl failed" in bad.stdout
    missing = subprocess.run(
        base + ["--right-json", str(tmp_path / "nope.json")], capture_output=True, text=True
    )
    assert missing.returncode == 2 and "--right-json" in missing.stderr


def test_versa_run_summarize_exit_codes(tmp_path):
    from versa_runner.cli import main as versa_run

    left = _write(tmp_path, "l.json", _run())
    right = _write(tmp_path, "r.json", _set(_run(), "UNION", "mean_prob", 0.3))
    other_blocks = _run()
    other_blocks["packs"][0]["seq"]["1024"]["rows_sha256"] = "x"
    refused = _write(tmp_path, "x.json", other_blocks)
    out = str(tmp_path / "cli.md")
    args = ["summarize", "--left-json", left, "--out-md", out, "--right-json"]
    assert versa_run(args + [left]) == 0
    assert versa_run(args + [right]) == 1
    assert versa_run(args + [refused]) == 2


def test_summarize_runs_without_torch(tmp_path):
    # The host may have no torch at all: block its import and run the whole summary.
    left = _write(tmp_path, "l.json", _run())
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from versa_runner.parity.summarize import main\n"
        f"rc = main(['--left-json', {left!r}, '--right-json', {left!r}, '--out-md', {str(tmp_path / 'n.md')!r}])\n"
        "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "sys.exit(rc)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_fail_verdict_names_the_playbook_levers(tmp_path, capsys):
    from versa_runner.cli import main as versa_run

    left = _write(tmp_path, "l.json", _run())
    right = _write(tmp_path, "r.json", _set(_run(), "UNION", "ppl", 7.0))
    args = ["summarize", "--left-json", left, "--out-md", str(tmp_path / "s.md"), "--right-json"]
    assert versa_run(args + [right]) == 1
    out = capsys.readouterr().out
    assert "Gate near-lossless-v1: FAIL" in out and "next levers (playbook §5" in out
    for flag in ("--num-rows", "--min-keep-per-layer", "--core-pos-top-m"):
        assert flag in out, flag
    assert versa_run(args + [left]) == 0
    assert "levers" not in capsys.readouterr().out  # a PASS needs no lever
    assert versa_run(["--json", *args, right]) == 1
    verdict = json.loads(capsys.readouterr().out)
    assert verdict["passed"] is False and len(verdict["levers"]) == 3
