"""No report calls a figure exact unless it is (issue 14, "Reports").

The pair summary's CC rate under the left run's thresholds is counted on reservoir samples that
the collector stores rounded to 6 decimals. The threshold is itself one token's value, so that
token (and any within 5e-7 of it) may land on either side after rounding: the count was one
token off in 5 of 16 complete-sample entries, yet labelled exact. Ground truth here is the
collector's own count over every kept token (`cc_count`), which a run compared with itself
must reproduce under its own thresholds.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from versa_kernels.eaft import HistogramSpec, SignalStats, collect
from versa_kernels.fixtures import make_calib_packs

from versa_runner.parity.shared_cc import cc_under_thresholds, own_cc, stored_half_width
from versa_runner.parity.summarize import compare_runs, load_gates, main

TINY = (
    Path(__file__).resolve().parent.parent
    / "kernels"
    / "versa_kernels"
    / "data"
    / "tiny_moe_trained"
)
SEQS = "128,256"


@pytest.fixture(scope="module")
def collected(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One real eaft_single collection of the trained tiny model, every kept token sampled."""
    root = tmp_path_factory.mktemp("shared_cc")
    packs = make_calib_packs(root / "packs", rows=16, seed=0)
    out = collect(model_id="tiny", model_path=str(TINY), calib_pack_files=[str(p) for p in packs],
                  seq_lens_csv=SEQS, num_blocks=3, sample_points=100_000, top_k=4, run_id="r",
                  out_root=str(root / "out"))  # fmt: skip
    gates = json.loads(Path(load_gates().path).read_text())
    gates["primary_seq_lens"] = SEQS.split(",")
    gates_path = root / "gates.json"
    gates_path.write_text(json.dumps(gates))
    return Path(out), gates_path


def _entries(doc: dict) -> list[dict]:
    return [entry["model"] for pack in doc["packs"] for entry in pack["seq"].values()]


def test_real_collection_under_its_own_thresholds_is_never_miscalled_exact(collected) -> None:
    path, _ = collected
    doc = json.loads(path.read_text())
    naive_off = 0
    for m in _entries(doc):
        n, truth = m["kept_tokens"], m["cc_count"]
        assert len(m["samples"]) == n  # a complete sample: the old report said "exact" here
        naive = sum(1 for x, h in m["samples"] if x < m["x_thr"] and h < m["h_thr"])
        naive_off += naive != truth
        shared = cc_under_thresholds(m, x_thr=m["x_thr"], h_thr=m["h_thr"])
        assert round(shared.low * n) <= truth <= round(shared.high * n)
        if shared.exact:
            assert round(shared.rate * n) == truth
        else:
            assert "±" in shared.cell() and shared.tokens_either_side >= abs(naive - truth)
        assert own_cc(m).exact and own_cc(m).rate == truth / n
    assert naive_off > 0, "expected rounded samples to miscount at least one entry"


def test_pair_report_of_a_run_with_itself(collected, tmp_path: Path) -> None:
    path, gates = collected
    doc = json.loads(path.read_text())
    summary = compare_runs(doc, copy.deepcopy(doc), load_gates(gates))
    for row in summary.rows:
        assert row.cc_left_at_left.exact and row.cc_left_at_left.rate == row.cc_left
        right = row.cc_right_at_left  # the same run, counted from its rounded samples
        assert right.low <= row.cc_right <= right.high
        assert right.exact == (right.low == right.high)
    out = tmp_path / "pair.md"
    code = main(["--left-json", str(path), "--right-json", str(path), "--out-md", str(out),
                 "--gates-json", str(gates)])  # fmt: skip
    assert code == 0
    text = out.read_text()
    table = [line for line in text.splitlines() if line.startswith("| ") and "%" in line]
    qualified = [line for line in table if " tok |" in line]
    ambiguous = [r for r in summary.rows if not r.cc_right_at_left.exact]
    assert ambiguous and len(qualified) == len(ambiguous)
    assert "exact when" not in text and "A figure without either mark is an exact count" in text


def test_points_on_a_threshold_are_counted_as_an_interval() -> None:
    """The real collector class: 1000 tokens, 300 of them within 1e-7 of the 15% quantile."""
    stats = SignalStats(HistogramSpec(), sample_points=1000)
    rng = np.random.default_rng(0)
    p = np.concatenate([rng.uniform(0.5, 0.9, 700), 0.2 + rng.uniform(-1e-7, 1e-7, 300)])
    h = np.full(1000, 0.01)
    h[:100] = 0.9  # keep H below its own quantile for the near-threshold tokens only
    stats.add(torch.tensor(p), torch.tensor(h), torch.log(torch.tensor(p)))
    m = stats.summary(predicted_tokens=1000, wall_s=1.0)
    m["h_thr"] = 0.5  # every low-H token qualifies on H: p alone decides
    truth = sum(1 for x, hh in zip(p, h, strict=True) if x < m["x_thr"] and hh < 0.5)
    shared = cc_under_thresholds(m, x_thr=m["x_thr"], h_thr=0.5)
    assert not shared.exact and shared.complete
    assert shared.low * 1000 <= truth <= shared.high * 1000
    assert shared.tokens_either_side >= 1 and shared.cell().endswith(" tok")


def test_full_precision_and_partial_samples_and_histograms_are_labelled() -> None:
    full = {"kept_tokens": 4, "samples": [[0.1234567, 0.2], [0.3, 0.4], [0.05, 0.01], [0.9, 0.9]]}
    assert stored_half_width(full["samples"]) == 0.0  # not on the 6-decimal grid: not rounded
    exact = cc_under_thresholds(full, x_thr=0.2, h_thr=0.5)
    assert exact.exact and exact.cell() == "50.000%"
    partial = {**full, "kept_tokens": 400}
    assert cc_under_thresholds(partial, x_thr=0.2, h_thr=0.5).cell() == "~50.000%"
    hist = {"x_edges": [0.0, 0.5, 1.0], "y_edges": [0.0, 0.5, 1.0], "counts": [10, 0, 0, 30],
            "xbins": 2, "ybins": 2}  # fmt: skip
    by_area = cc_under_thresholds({"kept_tokens": 40, "hist2d_x_H": hist}, x_thr=0.25, h_thr=0.5)
    assert by_area.rate == pytest.approx(0.125) and (by_area.low, by_area.high) == (0.0, 0.25)
    assert by_area.cell() == "~12.500%"
