"""The gate beside its noise, and base vs pruned decode side by side, on hand-built JSONs."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from versa_runner.errors import ConfigError
from versa_runner.parity.decode import main as decode_main
from versa_runner.parity.decode import summarize_decode
from versa_runner.parity.gates import load_gates
from versa_runner.parity.noise import gate_summary, sampling_noise
from versa_runner.parity.summarize import compare_runs, load_eaft_json

XBINS, YBINS = 40, 30
EDGES_X = [i / XBINS for i in range(XBINS + 1)]
EDGES_Y = [i / YBINS for i in range(YBINS + 1)]


def _tokens(n: int, seed: int, shift: float = 0.0) -> list[list[float]]:
    """n (p, H) points of one smooth distribution (shift moves mass toward low p)."""
    rng = random.Random(seed)
    return [[min(0.9999, max(1e-4, rng.betavariate(2.0, 1.2) - shift)),
             min(0.9999, rng.betavariate(1.2, 3.0))] for _ in range(n)]  # fmt: skip


def _model(points: list[list[float]]) -> dict:
    import math

    counts = [0] * (XBINS * YBINS)
    for x, h in points:
        counts[min(XBINS - 1, int(x * XBINS)) * YBINS + min(YBINS - 1, int(h * YBINS))] += 1
    nll = [-math.log(x) for x, _ in points]
    mean_nll = sum(nll) / len(nll)
    ps, hs = sorted(p for p, _ in points), sorted(h for _, h in points)
    x_thr, h_thr = ps[int(0.15 * len(ps))], hs[int(0.15 * len(hs))]
    return {
        "ppl": math.exp(mean_nll),
        "var_nll": sum((v - mean_nll) ** 2 for v in nll) / len(nll),
        "cc_rate": sum(1 for x, h in points if x < x_thr and h < h_thr) / len(points),
        "mean_prob": sum(ps) / len(ps),
        "x_thr": x_thr, "h_thr": h_thr, "kept_tokens": len(points), "x_scale": "p_t",
        "samples": points,
        "hist2d_x_H": {"x_edges": EDGES_X, "y_edges": EDGES_Y, "counts": counts,
                       "xbins": XBINS, "ybins": YBINS},
    }  # fmt: skip


def _run(path: Path, model_id: str, points: list[list[float]], rows: str) -> Path:
    meta = {"model_id": model_id, "entropy_topk": 20, "hist_xbins": XBINS, "hist_ybins": YBINS,
            "prob_scale": "linear", "x_min": 0.0, "x_max": 1.0, "cc_quantile": 0.15}  # fmt: skip
    seqs = {s: {"rows_seen": 4, "rows_sha256": f"{rows}-{s}", "model": _model(points)}
            for s in ("1024", "2048")}  # fmt: skip
    path.write_text(json.dumps({"schema_version": 1, "meta": meta,
                                "packs": [{"pack": "UNION", "seq": seqs}]}))  # fmt: skip
    return path


def test_js2d_sampling_noise_is_the_bias_of_few_tokens_and_shrinks_with_more():
    """Two samples of one distribution: JS2D noise near (K-1)/(4n), far above 0.02 at n=2000."""
    few = _model(_tokens(2000, 0))
    level = sampling_noise(few, n_left=2000, n_right=2000, cc_quantile=0.15)
    occupied = sum(1 for c in few["hist2d_x_H"]["counts"] if c)
    assert 0.3 * (occupied - 1) / 8000 < level["js2d"] < 3 * (occupied - 1) / 8000
    assert level["js2d"] > 0.02  # near-lossless-v1's JS2D threshold sits below this noise
    many = sampling_noise(few, n_left=20_000, n_right=20_000, cc_quantile=0.15)
    assert many["js2d"] < level["js2d"] / 4  # ~1/n (10x the tokens)
    assert many["ppl"] < level["ppl"] / 3 and many["mean_p"] < level["mean_p"] / 3  # ~1/sqrt(n)


def test_noise_pair_compares_disjoint_blocks_but_a_parity_pair_still_refuses_them(tmp_path):
    gates = load_gates()
    a = load_eaft_json(_run(tmp_path / "a.json", "base", _tokens(3000, 1), "rows-a"), param="a")
    b = load_eaft_json(_run(tmp_path / "b.json", "base-d", _tokens(3000, 2), "rows-b"), param="b")
    with pytest.raises(ConfigError, match="different blocks"):
        compare_runs(a, b, gates)
    summary = compare_runs(a, b, gates, require_same_blocks=False)
    assert summary.hero_rows and all(r.js2d > 0 for r in summary.hero_rows)


def test_gate_summary_shows_noise_beside_each_delta_and_keeps_the_verdict(tmp_path):
    base_points = _tokens(3000, 1)
    base = _run(tmp_path / "base.json", "base", base_points, "rows")
    noise = _run(tmp_path / "noise.json", "base-disjoint", _tokens(3000, 2), "rows-next")
    pruned = _run(tmp_path / "pruned.json", "pruned", _tokens(3000, 3, shift=0.2), "rows")
    floor = gate_summary(left_json=base, right_json=noise, out_md=tmp_path / "noise.md",
                         comparison="noise")  # fmt: skip
    assert floor["verdict"] == "FAIL"  # 3000 tokens: the gate fails on pure noise
    assert "thresholds below the noise" in floor["headline"]
    text = (tmp_path / "noise.md").read_text()
    assert "Noise floor" in text and "| threshold below noise |" in text
    result = gate_summary(left_json=base, right_json=pruned, out_md=tmp_path / "pair.md",
                          noise=[base, noise])  # fmt: skip
    report = (tmp_path / "pair.md").read_text()
    assert "## Gate Result: FAIL" in report and "## Gate beside its noise" in report
    rows = {(n["seq"], n["check"]): n for n in result["noise"]}
    js = rows[("1024", "js2d")]
    assert js["measured"] == pytest.approx(floor["hero"][0]["js2d"])  # the noise pair's JS2D
    assert js["limit"] == 0.02 and js["threshold_below_noise"]
    assert rows[("1024", "ppl")]["value"] > rows[("1024", "ppl")]["measured"]  # a real shift
    assert "At this sample size these thresholds sit below the noise" in report


def test_long_seq_runs_get_thresholds_for_orientation_and_no_verdict(tmp_path):
    def long(path: Path, model_id: str, seed: int) -> Path:
        doc = json.loads(_run(path, model_id, _tokens(2000, seed), "rows").read_text())
        doc["packs"][0]["seq"] = {"4096": doc["packs"][0]["seq"]["1024"]}
        path.write_text(json.dumps(doc))
        return path

    left, right = long(tmp_path / "l.json", "base", 1), long(tmp_path / "r.json", "pruned", 1)
    with pytest.raises(ConfigError, match="hero row pack=UNION seq=1024 is missing"):
        gate_summary(left_json=left, right_json=right, out_md=tmp_path / "x.md")  # the CLI's rule
    result = gate_summary(left_json=left, right_json=right, out_md=tmp_path / "long.md",
                          allow_informational=True)  # eval recipes' long-seq matrices  # fmt: skip
    assert result["verdict"] == "n/a" and "no verdict" in result["headline"]
    assert (tmp_path / "long.md").read_text().startswith("> Informational: seq 4096")


def _decode(path: Path, name: str, tok_s: dict[int, float], **over) -> Path:
    doc = {"schema_version": 1, "name": name, "model_path": f"/m/{name}", "engine": "native",
           "prompt_len_tokens": 64, "max_new_tokens": 32, "repeats": 2,
           "results": [{"batch_size": b, "tok_s_total": t} for b, t in tok_s.items()], **over}  # fmt: skip
    path.write_text(json.dumps(doc))
    return path


def test_summarize_decode_ratio_per_batch_size_and_one_plot(tmp_path, capsys):
    base = _decode(tmp_path / "base.json", "base", {1: 100.0, 4: 300.0, 8: 500.0})
    pruned = _decode(tmp_path / "pruned.json", "pruned", {1: 110.0, 4: 330.0})
    result = summarize_decode(base, pruned, tmp_path / "d.md")
    assert [(r["batch_size"], round(r["ratio"], 3)) for r in result["rows"]] == [(1, 1.1), (4, 1.1)]
    text = (tmp_path / "d.md").read_text()
    assert "| 4 | 300.0 | 330.0 | 1.100 |" in text
    assert [Path(p).name for p in result["plots"]] == ["d.png"] and (
        tmp_path / "d.png"
    ).stat().st_size
    assert decode_main([str(base), str(pruned), "--out-md", str(tmp_path / "cli.md")]) == 0
    assert "| 1 | 100.0 | 110.0 | 1.100 |" in capsys.readouterr().out
    other = _decode(tmp_path / "vllm.json", "pruned", {1: 1.0}, engine="vllm")
    with pytest.raises(ConfigError, match="engine: base='native' pruned='vllm'"):
        summarize_decode(base, other, tmp_path / "x.md")
    assert decode_main([str(base), str(other), "--out-md", str(tmp_path / "y.md")]) == 2


def test_summarize_cli_takes_the_noise_pair_and_the_noise_floor(tmp_path, capsys):
    from versa_runner.parity.summarize import main as summarize_main

    base = _run(tmp_path / "base.json", "base", _tokens(2000, 1), "rows")
    noise = _run(tmp_path / "noise.json", "base-disjoint", _tokens(2000, 2), "rows-next")
    pruned = _run(tmp_path / "pruned.json", "pruned", _tokens(2000, 1), "rows")
    args = [
        "--left-json",
        str(base),
        "--right-json",
        str(pruned),
        "--out-md",
        str(tmp_path / "p.md"),
    ]
    assert summarize_main([*args, "--noise-json", str(base), str(noise)]) == 0  # identical: PASS
    out = capsys.readouterr().out
    assert "Gate near-lossless-v1: PASS" in out and "Thresholds below the noise" in out
    assert "| 1024 | JS2D | 0 | 0.02 |" in (tmp_path / "p.md").read_text()
    floor = [
        "--left-json",
        str(base),
        "--right-json",
        str(noise),
        "--out-md",
        str(tmp_path / "n.md"),
    ]
    assert summarize_main([*floor, "--noise-floor"]) == 1  # the gate fails on pure noise here
    assert summarize_main(floor) == 2  # without --noise-floor, different blocks are refused
