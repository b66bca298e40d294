"""Pair summary of two EAFT collector runs and the `near-lossless-v1` gate (host CPU, no torch).

`versa-run summarize --left-json BASE.json --right-json CANDIDATE.json --out-md REPORT.md
[--gates-json GATES.json]` (and `scripts/summarize_eaft_pair.py` with the same flags) compares a
baseline (left) and a candidate (right) run of the `eaft_single` collector and writes a markdown
report with the gate verdict (eaftreap_spec §7, with the fixes of §11.3):

- Rows: every (pack, seq) present in both runs: PPL, CC rate, mean p (each run's own exact
  thresholds), their deltas (right - left), and JS2D, the Jensen-Shannon divergence (natural
  log, range [0, ln 2]) of the two normalized p/H_norm 2-D histograms.
- Gate: read from a versioned gates JSON (default: the one shipped with the package). PASS iff
  every hero row (primary pack at each primary seq) satisfies all four checks. Per-pack rows
  never change the verdict but are flagged as warnings when they would fail.
- Refusals (ConfigError, exit 2, no verdict written): a missing or empty histogram, a missing
  hero row, different blocks (`rows_sha256`) or different settings (entropy top-k, bins, prob
  scale, range, CC quantile). The predecessor silently passed in the first three cases.
- Also reported: CC of both models under the **left** model's thresholds: the left one is its
  own exact count; the right one is counted on its reservoir sample (or, without samples, the 2-D
  histogram by cell area) and shown with the uncertainty that leaves (`parity.shared_cc`).

Pure python + `math` so it runs where torch is absent; matplotlib is imported lazily for plots.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from versa_runner.errors import ConfigError
from versa_runner.fsutil import atomic_write_text
from versa_runner.parity.gates import (
    DEFAULT_GATES_PATH,
    GateCheck,
    Gates,
    load_gates,
    read_json_object,
)
from versa_runner.parity.shared_cc import CcUnderThresholds, cc_under_thresholds, own_cc

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_GATES_PATH",
    "Gates",
    "PairRow",
    "PairSummary",
    "cc_rate_under_thresholds",
    "compare_runs",
    "js_divergence_2d",
    "load_eaft_json",
    "load_gates",
    "main",
    "summarize_pair",
]

EAFT_SCHEMA_VERSION = 1
# Settings that change what a number means; two runs that differ in any are not comparable.
SETTINGS_THAT_MUST_MATCH = (
    "entropy_topk",
    "hist_xbins",
    "hist_ybins",
    "prob_scale",
    "x_min",
    "x_max",
    "cc_quantile",
)


@dataclass(frozen=True)
class PairRow:
    """One (pack, seq) compared across the two runs; deltas are right - left."""

    pack: str
    seq: str
    ppl_left: float
    ppl_right: float
    cc_left: float
    cc_right: float
    mean_p_left: float
    mean_p_right: float
    js2d: float
    cc_left_at_left: CcUnderThresholds  # cc_left itself: exact
    cc_right_at_left: CcUnderThresholds  # from samples or the histogram: see `shared_cc`
    kept_left: int
    kept_right: int

    @property
    def cc_left_at_left_thr(self) -> float:
        return self.cc_left_at_left.rate

    @property
    def cc_right_at_left_thr(self) -> float:
        return self.cc_right_at_left.rate

    @property
    def delta_ppl(self) -> float:
        return self.ppl_right - self.ppl_left

    @property
    def delta_cc(self) -> float:
        return self.cc_right - self.cc_left

    @property
    def delta_mean_p(self) -> float:
        return self.mean_p_right - self.mean_p_left

    def checks(self, gates: Gates) -> list[GateCheck]:
        """The four gate checks of this row, in CHECK_NAMES order."""
        return [
            GateCheck("ppl", abs(self.delta_ppl), gates.ppl_limit(self.ppl_left)),
            GateCheck("cc", abs(self.delta_cc), gates.max_abs_delta_cc_rate),
            GateCheck("mean_p", abs(self.delta_mean_p), gates.max_abs_delta_mean_prob),
            GateCheck("js2d", self.js2d, gates.max_js2d),
        ]


@dataclass(frozen=True)
class PairSummary:
    """Everything the report shows: labels, rows, hero rows, verdict, failures, warnings."""

    left_label: str
    right_label: str
    gates: Gates
    rows: tuple[PairRow, ...]
    hero_rows: tuple[PairRow, ...]
    failures: tuple[str, ...]
    warnings: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return not self.failures


def load_eaft_json(path: str | Path, *, param: str) -> dict[str, Any]:
    """Read one collector JSON, upgrading the predecessor's unversioned layout."""
    raw = read_json_object(Path(path), param=param)
    if "schema_version" not in raw:
        raw = _upgrade_v0(raw, path)
    if raw.get("schema_version") != EAFT_SCHEMA_VERSION:
        raise ConfigError(
            f"{param} {path}: schema_version {raw.get('schema_version')!r} is not supported "
            f"(expected {EAFT_SCHEMA_VERSION})",
            hint="Re-run the eaft_single task with this version of versa-runner.",
        )
    if not isinstance(raw.get("meta"), dict) or not isinstance(raw.get("packs"), list):
        raise ConfigError(
            f"{param} {path}: not an EAFT collector JSON (needs 'meta' and a 'packs' list)",
            hint="Pass the JSON written by the eaft_single task (artifacts/eaft_models/...).",
        )
    return raw


def _upgrade_v0(raw: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """The predecessor's collector wrote the same fields without schema_version."""
    log.info("%s: no schema_version; reading it as the unversioned layout (schema 1)", path)
    return {**raw, "schema_version": EAFT_SCHEMA_VERSION}


def js_divergence_2d(counts_left: Sequence[float], counts_right: Sequence[float]) -> float:
    """Jensen-Shannon divergence (nats) of two histograms given as flat counts.

    Why: PPL and mean p average away shape changes; JS of the joint p/H_norm histogram sees a
    shift of mass between regions. Each histogram is normalized to sum 1 (shorter one zero
    padded); JS = KL(P||M)/2 + KL(Q||M)/2 with M = (P+Q)/2, terms with zero mass skipped, so
    the result is in [0, ln 2]. An empty histogram has no distribution: ValueError.
    """
    size = max(len(counts_left), len(counts_right))
    a = list(counts_left) + [0.0] * (size - len(counts_left))
    b = list(counts_right) + [0.0] * (size - len(counts_right))
    total_a, total_b = math.fsum(a), math.fsum(b)
    if total_a <= 0 or total_b <= 0:
        raise ValueError("JS divergence of an empty histogram is undefined")
    kl_pm, kl_qm = [], []
    for ca, cb in zip(a, b, strict=True):
        p, q = ca / total_a, cb / total_b
        m = 0.5 * (p + q)
        if p > 0:
            kl_pm.append(p * math.log(p / m))
        if q > 0:
            kl_qm.append(q * math.log(q / m))
    return max(0.0, 0.5 * math.fsum(kl_pm) + 0.5 * math.fsum(kl_qm))


def cc_rate_under_thresholds(model: dict[str, Any], *, x_thr: float, h_thr: float) -> float:
    """Share of a run's kept tokens with x < x_thr and H < h_thr: the point value of
    `shared_cc.cc_under_thresholds` (which also says how far it can be trusted)."""
    return cc_under_thresholds(model, x_thr=x_thr, h_thr=h_thr).rate


def compare_runs(
    left: dict[str, Any], right: dict[str, Any], gates: Gates, *, require_same_blocks: bool = True
) -> PairSummary:
    """Rows, verdict, failures and warnings for two loaded collector JSONs (refuses if unsafe).

    `require_same_blocks=False` is for the noise floor only: the same model on disjoint blocks
    (`parity.noise`); a parity verdict always needs the same blocks.
    """
    _refuse_on_setting_mismatch(left["meta"], right["meta"])
    left_packs, right_packs = _index_rows(left), _index_rows(right)
    for seq in gates.primary_seq_lens:
        for side, packs in (("--left-json", left_packs), ("--right-json", right_packs)):
            if (gates.primary_pack, seq) not in packs:
                raise ConfigError(
                    f"{side}: hero row pack={gates.primary_pack} seq={seq} is missing, so the "
                    f"gate {gates.name} cannot be decided",
                    hint="Collect with --seq-lens-csv including "
                    f"{','.join(gates.primary_seq_lens)} (UNION is always collected), or pass a "
                    "--gates-json whose primary_seq_lens match the run.",
                )
    rows = []
    for key in sorted(set(left_packs) & set(right_packs), key=lambda k: (k[0], int(k[1]))):
        rows.append(_pair_row(key, left_packs[key], right_packs[key], require_same_blocks))
    hero = tuple(
        r for r in rows if r.pack == gates.primary_pack and r.seq in gates.primary_seq_lens
    )
    failures: list[str] = []
    warnings: list[str] = []
    for row in rows:
        failed = [c for c in row.checks(gates) if not c.ok]
        if not failed:
            continue
        text = f"pack={row.pack} seq={row.seq}: " + "; ".join(_describe(c) for c in failed)
        (failures if row in hero else warnings).append(text)
    return PairSummary(
        left_label=_label(left, "left"),
        right_label=_label(right, "right"),
        gates=gates,
        rows=tuple(rows),
        hero_rows=hero,
        failures=tuple(failures),
        warnings=tuple(warnings),
    )


def _describe(check: GateCheck) -> str:
    shown = {"ppl": "|dPPL|", "cc": "|dCC|", "mean_p": "|dmean_p|", "js2d": "JS2D"}[check.name]
    return f"{check.name} failed ({shown}={check.value:.4g} > {check.limit:.4g})"


def _refuse_on_setting_mismatch(left_meta: dict[str, Any], right_meta: dict[str, Any]) -> None:
    differ = [
        f"{k}: left={left_meta.get(k)!r} right={right_meta.get(k)!r}"
        for k in SETTINGS_THAT_MUST_MATCH
        if left_meta.get(k) != right_meta.get(k)
    ]
    if differ:
        raise ConfigError(
            "the two runs used different settings, so their numbers are not comparable: "
            + "; ".join(differ),
            hint="Re-collect one side with the other's settings (same --entropy-topk, bins, "
            "prob scale).",
        )


def _index_rows(run: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for pack in run["packs"]:
        for seq, entry in pack.get("seq", {}).items():
            out.setdefault((str(pack["pack"]), str(seq)), entry)
    return out


def _pair_row(
    key: tuple[str, str], left: dict[str, Any], right: dict[str, Any], same_blocks: bool = True
) -> PairRow:
    pack, seq = key
    differ = left.get("rows_sha256") != right.get("rows_sha256")
    if (differ and same_blocks) or not left.get("rows_sha256"):
        raise ConfigError(
            f"pack={pack} seq={seq}: the runs used different blocks or did not record them (rows_sha256 "
            f"{str(left.get('rows_sha256'))[:12]}... vs {str(right.get('rows_sha256'))[:12]}...)",
            hint="Collect both models with the same packs, --num-blocks and --seq-lens-csv.",
        )
    lm, rm = left["model"], right["model"]
    for side, model in (("left", lm), ("right", rm)):
        hist = model.get("hist2d_x_H") or {}
        counts = hist.get("counts") or []
        if (
            not counts
            or math.fsum(counts) <= 0
            or len(counts) != int(hist["xbins"]) * int(hist["ybins"])
        ):
            raise ConfigError(
                f"pack={pack} seq={seq}: the {side} run has no usable 2-D histogram "
                "(missing, empty or not xbins*ybins counts)",
                hint="Re-collect that run; a JS2D of a missing histogram would be a silent pass.",
            )
    return PairRow(
        pack=pack,
        seq=seq,
        ppl_left=float(lm["ppl"]),
        ppl_right=float(rm["ppl"]),
        cc_left=float(lm["cc_rate"]),
        cc_right=float(rm["cc_rate"]),
        mean_p_left=float(lm["mean_prob"]),
        mean_p_right=float(rm["mean_prob"]),
        js2d=js_divergence_2d(lm["hist2d_x_H"]["counts"], rm["hist2d_x_H"]["counts"]),
        cc_left_at_left=own_cc(lm),  # the left run under its own thresholds is its own count
        cc_right_at_left=cc_under_thresholds(rm, x_thr=lm["x_thr"], h_thr=lm["h_thr"]),
        kept_left=int(lm.get("kept_tokens", 0)),
        kept_right=int(rm.get("kept_tokens", 0)),
    )


def _label(run: dict[str, Any], fallback: str) -> str:
    return str(run["meta"].get("model_id") or run.get("_path_stem") or fallback)


def summarize_pair(
    left_json: str | Path,
    right_json: str | Path,
    out_md: str | Path,
    gates_json: str | Path | Gates | None = None,
) -> PairSummary:
    """Load, compare, plot and write the markdown report; returns the summary (raises on refusal).

    `gates_json` is a gates file, or already loaded `Gates` (the noise summary passes those)."""
    from versa_runner.parity.report import render_markdown, write_plots

    gates = gates_json if isinstance(gates_json, Gates) else load_gates(gates_json)
    left = load_eaft_json(left_json, param="--left-json")
    right = load_eaft_json(right_json, param="--right-json")
    left.setdefault("_path_stem", Path(left_json).stem)
    right.setdefault("_path_stem", Path(right_json).stem)
    summary = compare_runs(left, right, gates)
    out_path = Path(out_md)
    plots, plot_note = write_plots(summary, left, right, out_path)
    atomic_write_text(out_path, render_markdown(summary, plots=plots, plot_note=plot_note))
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """`versa-run summarize ARGS` (kept for `scripts/summarize_eaft_pair.py` and callers): 0 PASS,
    1 FAIL, 2 when the pair is refused. Flags and output live in the CLI, defined once."""
    from versa_runner.cli.main import main as versa_run

    return versa_run(["summarize", *(sys.argv[1:] if argv is None else argv)])
