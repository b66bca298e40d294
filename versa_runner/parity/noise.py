"""The gate beside its noise: how big each delta would be between two runs of the *same* model.

A gate threshold means something only when it sits above the noise of the statistic at the
sample size of the run. Two noise levels are reported for every hero row and check:

- **measured**: |delta| between the base model on its blocks and the base model on disjoint
  blocks of the same size (`eaft_single --block-offset NUM_BLOCKS`; the noise recipe). One draw
  of the real noise: different text, same model, with the correlation of tokens inside blocks.
- **sampling (iid, 95%)**: the 95th percentile of |delta| between two independent samples of
  the run's sizes (kept tokens of left and right) drawn from the left run's own tokens.
  PPL and mean p use the normal approximation (variance of NLL recorded by the collector,
  variance of p from its reservoir sample); the CC rate (each side with its own 15% quantiles)
  and JS2D (same bins as the collector) are bootstrapped from the reservoir sample. It treats
  tokens as independent (tokens of a block are not), and a heavy NLL tail makes its PPL level
  wide; the measured level is the one to trust when there is one.

JS2D has a bias, not only a spread: two samples of n tokens over K occupied cells differ by
about (K - 1) / (4 n) nats on average even from one distribution (e.g. 2,400 tokens over ~1,400
occupied cells: ~0.15, seven times near-lossless-v1's 0.02). A threshold below the noise level
decides PASS/FAIL by sampling, not by the model; the report says so per check. The verdict's rule
is unchanged (`near-lossless-v1`); nothing here moves a threshold.
"""

from __future__ import annotations

import dataclasses
import math
import random
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from versa_runner.fsutil import atomic_write_text
from versa_runner.parity.gates import CHECK_NAMES, load_gates
from versa_runner.parity.summarize import (
    PairRow,
    PairSummary,
    compare_runs,
    js_divergence_2d,
    load_eaft_json,
    summarize_pair,
)

Z_95 = 1.959964  # two-sided 95% of a normal
BOOTSTRAP_DRAWS = 40
BOOTSTRAP_SEED = 3407
BOOTSTRAP_POINTS = 4_000_000  # resampled points in all; fewer draws for very large runs
SHOWN = {"ppl": "|ΔPPL|", "cc": "|ΔCC| (pp)", "mean_p": "|Δmean_p|", "js2d": "JS2D"}
SCALE = {"ppl": 1.0, "cc": 100.0, "mean_p": 1.0, "js2d": 1.0}  # cc shown in percentage points

INFORMATIONAL = (
    "> Informational: seq {seqs} are not the hero rows of {name} (UNION at 1024 and 2048). The "
    "'Gate Result' below applies its thresholds at these lengths for orientation only; it is "
    "not a verdict.\n\n"
)

__all__ = ["NoiseRow", "gate_summary", "noise_rows", "sampling_noise"]


@dataclass(frozen=True)
class NoiseRow:
    """One hero row and check: the delta, its noise levels and the gate's threshold."""

    seq: str
    check: str
    delta: float
    limit: float
    measured: float | None
    sampling: float | None

    @property
    def noise(self) -> float:
        """The larger known noise level (0 when none is known)."""
        return max(v for v in (self.measured, self.sampling, 0.0) if v is not None)

    @property
    def threshold_below_noise(self) -> bool:
        return self.limit < self.noise


def _quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def _cc_rate(points: Sequence[Sequence[float]], q: float) -> float:
    x_thr = _quantile([p[0] for p in points], q)
    h_thr = _quantile([p[1] for p in points], q)
    return sum(1 for x, h in points if x < x_thr and h < h_thr) / len(points)


def _hist(
    points: Sequence[Sequence[float]], x_edges: list[float], y_edges: list[float]
) -> list[int]:
    xbins, ybins = len(x_edges) - 1, len(y_edges) - 1
    counts = [0] * (xbins * ybins)
    for x, h in points:
        ix = min(xbins - 1, max(0, bisect_right(x_edges, x) - 1))
        iy = min(ybins - 1, max(0, bisect_right(y_edges, h) - 1))
        counts[ix * ybins + iy] += 1
    return counts


def sampling_noise(
    model: dict[str, Any], *, n_left: int, n_right: int, cc_quantile: float,
    draws: int = BOOTSTRAP_DRAWS, seed: int = BOOTSTRAP_SEED,
) -> dict[str, float | None]:  # fmt: skip
    """95th percentile of |delta| per check between two iid samples of sizes n_left, n_right
    from one run's tokens (module docstring). None where the run lacks what is needed."""
    out: dict[str, float | None] = dict.fromkeys(CHECK_NAMES)
    if n_left <= 0 or n_right <= 0:
        return out
    spread = math.sqrt(1.0 / n_left + 1.0 / n_right)
    var_nll = model.get("var_nll")
    if isinstance(var_nll, (int, float)) and math.isfinite(var_nll):
        out["ppl"] = Z_95 * float(model["ppl"]) * math.sqrt(var_nll) * spread  # delta method
    samples = model.get("samples") or []
    if len(samples) < 2:
        return out
    x_linear = str(model.get("x_scale", "p")).lower().startswith("p")
    probs = [s[0] if x_linear else 10.0 ** s[0] for s in samples]
    mean = math.fsum(probs) / len(probs)
    var_p = math.fsum((p - mean) ** 2 for p in probs) / (len(probs) - 1)
    out["mean_p"] = Z_95 * math.sqrt(var_p) * spread
    hist = model["hist2d_x_H"]
    rng = random.Random(seed)
    draws = max(10, min(draws, BOOTSTRAP_POINTS // (n_left + n_right)))  # bounded host time
    cc, js = [], []
    for _ in range(draws):
        a = rng.choices(samples, k=n_left)
        b = rng.choices(samples, k=n_right)
        cc.append(abs(_cc_rate(a, cc_quantile) - _cc_rate(b, cc_quantile)))
        js.append(js_divergence_2d(_hist(a, hist["x_edges"], hist["y_edges"]),
                                   _hist(b, hist["x_edges"], hist["y_edges"])))  # fmt: skip
    out["cc"], out["js2d"] = _quantile(cc, 0.95), _quantile(js, 0.95)
    return out


def _models(run: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(p["pack"], s): e["model"] for p in run["packs"] for s, e in p["seq"].items()}


def noise_rows(
    summary: PairSummary, left: dict[str, Any], noise: PairSummary | None
) -> list[NoiseRow]:
    """Every hero row's checks with their measured and sampling noise levels."""
    measured = {(r.seq, c.name): c.value for r in (noise.hero_rows if noise else ())
                for c in r.checks(summary.gates)}  # fmt: skip
    models = _models(left)
    cc_q = float(left["meta"].get("cc_quantile", 0.15))
    rows = []
    for row in summary.hero_rows:
        sampling = sampling_noise(models[(row.pack, row.seq)], n_left=row.kept_left,
                                  n_right=row.kept_right, cc_quantile=cc_q)  # fmt: skip
        for check in row.checks(summary.gates):
            rows.append(NoiseRow(row.seq, check.name, check.value, check.limit,
                                 measured.get((row.seq, check.name)), sampling[check.name]))  # fmt: skip
    return rows


def _fmt(value: float | None, check: str) -> str:
    return "-" if value is None else f"{value * SCALE[check]:.4g}"


def render_noise(rows: Sequence[NoiseRow], *, noise_label: str) -> str:
    """The 'gate beside its noise' markdown section."""
    lines = [
        "## Gate beside its noise",
        "",
        f"measured: the same checks between the base on its blocks and on disjoint blocks of "
        f"the same size ({noise_label}). sampling: 95th percentile of the check between two iid "
        "samples of these sizes from the base's own tokens (treats tokens as independent; "
        "they are not within a block). The verdict above is unchanged; this says how far to trust it.",
        "",
        "| seq | check | value | threshold | noise measured | noise sampling (95%) | threshold below noise |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        flag = "**yes**" if r.threshold_below_noise else "no"
        lines.append(f"| {r.seq} | {SHOWN[r.check]} | {_fmt(r.delta, r.check)} | "
                     f"{_fmt(r.limit, r.check)} | {_fmt(r.measured, r.check)} | "
                     f"{_fmt(r.sampling, r.check)} | {flag} |")  # fmt: skip
    below = [r for r in rows if r.threshold_below_noise]
    lines.append("")
    if below:
        lines.append("At this sample size these thresholds sit below the noise, so their pass or "
                     "fail is decided by sampling, not by the model (collect more tokens: "
                     "raise --num-blocks):")  # fmt: skip
        lines += [f"- seq={r.seq} {SHOWN[r.check]}: threshold {_fmt(r.limit, r.check)} < noise "
                  f"{_fmt(r.noise, r.check)}" for r in below]  # fmt: skip
    else:
        lines.append("Every threshold sits above the noise at this sample size.")
    return "\n".join(lines) + "\n"


def _row_text(row: PairRow) -> str:
    return (f"seq={row.seq}: ΔPPL={row.delta_ppl:+.3f} ΔCC={100 * row.delta_cc:+.3f}pp "
            f"Δmean_p={row.delta_mean_p:+.4f} JS2D={row.js2d:.4f}")  # fmt: skip


def gate_summary(
    *, left_json: str | Path, right_json: str | Path, out_md: str | Path,
    gates_json: str | Path | None = None, noise: Sequence[str | Path] | None = None,
    comparison: str = "parity", allow_informational: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """Write the gate summary (with the noise section) and return its facts as a mapping.

    `comparison="noise"`: left and right are the same model on disjoint blocks; the report is
    the noise floor itself (what the gate would say about pure noise). `noise`: that pair's two
    JSONs, whose measured deltas are shown beside this pair's. `allow_informational`: a run with
    none of the gate's hero lengths gets the thresholds for orientation and no verdict.
    """
    gates = load_gates(gates_json)
    left = load_eaft_json(left_json, param="left")
    out_path = Path(out_md)
    seqs = sorted({s for p in left["packs"] for s in p["seq"]}, key=int)
    # Only runs with none of the hero lengths (eval recipes' long-seq matrices); a run missing
    # one hero row is still refused, as the gate requires.
    informational = allow_informational and not set(gates.primary_seq_lens) & set(seqs)
    if informational:  # e.g. long-seq runs: v1's thresholds shown at these lengths, no verdict
        gates = dataclasses.replace(gates, primary_seq_lens=tuple(seqs))
    if comparison == "noise":
        right = load_eaft_json(right_json, param="right")
        summary = compare_runs(left, right, gates, require_same_blocks=False)
        rows = noise_rows(summary, left, summary)
        lines = [f"# Noise floor: {summary.left_label} vs {summary.right_label} (disjoint blocks, "
                "same sizes)", "", f"- Gates: `{gates.name}` ({gates.path})", ""]  # fmt: skip
        lines += [f"- {_row_text(r)}" for r in summary.hero_rows]
        verdict = "PASS" if summary.passed else "FAIL"
        lines += ["", f"The gate applied to pure noise: **{verdict}** "
                 "(a FAIL here means the gate cannot be met at this sample size).", ""]  # fmt: skip
        atomic_write_text(
            out_path, "\n".join(lines) + "\n" + render_noise(rows, noise_label="this pair")
        )
        headline = f"noise floor ({gates.name} on base vs base, disjoint blocks): {verdict}"
    else:
        summary = summarize_pair(left_json, right_json, out_path, gates)
        noise_summary = None
        if noise:
            noise_summary = compare_runs(load_eaft_json(noise[0], param="noise left"),
                                         load_eaft_json(noise[1], param="noise right"), gates,
                                         require_same_blocks=False)  # fmt: skip
        rows = noise_rows(summary, left, noise_summary)
        label = f"{Path(noise[1]).name}" if noise else "not collected"
        atomic_write_text(out_path, out_path.read_text(encoding="utf-8") + "\n"
                          + render_noise(rows, noise_label=label))  # fmt: skip
        verdict = "PASS" if summary.passed else "FAIL"
        headline = f"gate {gates.name} {summary.right_label} vs {summary.left_label}: {verdict}"
        if informational:
            verdict = "n/a"
            headline = (f"{summary.right_label} vs {summary.left_label} at seq {', '.join(seqs)}: "
                        f"not {gates.name}'s hero rows, no verdict (thresholds for orientation)")  # fmt: skip
            atomic_write_text(out_path, INFORMATIONAL.format(seqs=", ".join(seqs), name=gates.name)
                              + out_path.read_text(encoding="utf-8"))  # fmt: skip
    below = [f"seq={r.seq} {r.check}" for r in rows if r.threshold_below_noise]
    if below:
        headline += f"; thresholds below the noise: {', '.join(below)}"
    return {
        "verdict": "n/a" if informational else ("PASS" if summary.passed else "FAIL"),
        "gate": gates.name,
        "headline": headline,
        "out_md": str(out_path),
        "hero": [
            {
                "seq": r.seq,
                "delta_ppl": r.delta_ppl,
                "delta_cc": r.delta_cc,
                "delta_mean_p": r.delta_mean_p,
                "js2d": r.js2d,
            }
            for r in summary.hero_rows
        ],  # fmt: skip
        "noise": [
            {
                "seq": r.seq,
                "check": r.check,
                "value": r.delta,
                "limit": r.limit,
                "measured": r.measured,
                "sampling": r.sampling,
                "threshold_below_noise": r.threshold_below_noise,
            }
            for r in rows
        ],  # fmt: skip
        "failures": list(summary.failures),
    }
