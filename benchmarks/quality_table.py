"""Tables and verdicts for benchmarks/bench_quality.py (pure python: runs on its JSON alone).

Spread is min..max over calibration seeds. Method A *clearly* beats B at one (layout, keep_frac)
when A's worst seed has a lower dPPL than B's best seed (the ranges do not overlap); otherwise
the table says how many seeds A won, paired by seed.

    python benchmarks/quality_table.py results.json     # re-print a saved run's report
    python benchmarks/quality_table.py results.json eaft-reap,frequency   # dPPL matrix only
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

METRICS = ("dppl", "dcc", "dmean_p", "js2d")
REFERENCE = "eaft-reap"


def grouped(results: list[dict[str, Any]]) -> dict[tuple[str, float, str], list[dict[str, Any]]]:
    """Rows by (layout, keep_frac, method), each list ordered by seed."""
    out: dict[tuple[str, float, str], list[dict[str, Any]]] = defaultdict(list)
    for row in sorted(results, key=lambda r: r["seed"]):
        out[(row["layout"], row["keep_frac"], row["method"])].append(row)
    return out


def summary(rows: list[dict[str, Any]], metric: str) -> dict[str, float]:
    values = [r[metric] for r in rows]
    return {
        "mean": statistics.fmean(values),
        "min": min(values),
        "max": max(values),
        "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
    }


def compare(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> dict[str, Any]:
    """Does a beat b on dPPL? Paired seed wins, and whether the seed ranges separate."""
    wins = sum(x["dppl"] < y["dppl"] for x, y in zip(a, b, strict=True))
    clear_win = max(r["dppl"] for r in a) < min(r["dppl"] for r in b)
    clear_loss = min(r["dppl"] for r in a) > max(r["dppl"] for r in b)
    return {"wins": wins, "seeds": len(a), "clear_win": clear_win, "clear_loss": clear_loss}


def passes_without_js2d(row: dict[str, Any], gates: dict[str, Any], base_ppl: float) -> bool:
    """The gate's dPPL, dCC and dmean_p checks alone (JS2D needs far more tokens than a
    benchmark evaluates: with 19,200 histogram cells and ~10k tokens, sampling noise alone
    puts it above 0.02 for any change of routing)."""
    pick = min if gates["ppl_bound"] == "min" else max
    ppl_limit = pick(gates["max_abs_delta_ppl"], gates["max_rel_delta_ppl"] * base_ppl)
    return (
        abs(row["dppl"]) <= ppl_limit
        and abs(row["dcc"]) <= gates["max_abs_delta_cc_rate"]
        and abs(row["dmean_p"]) <= gates["max_abs_delta_mean_prob"]
    )


def _cell(s: dict[str, float], digits: int) -> str:
    return f"{s['mean']:+.{digits}f} ({s['min']:+.{digits}f}..{s['max']:+.{digits}f})"


def verdicts(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Per (layout, keep_frac): the best method by mean dPPL, and EAFT-REAP against each other."""
    groups = grouped(result["results"])
    cells = sorted({(k[0], k[1]) for k in groups}, key=lambda c: (c[0], -c[1]))
    out = []
    for layout, kf in cells:
        methods = [m for (lay, k, m) in groups if lay == layout and k == kf]
        best = min(methods, key=lambda m: summary(groups[(layout, kf, m)], "dppl")["mean"])
        entry: dict[str, Any] = {"layout": layout, "keep_frac": kf, "best": best, "vs": {}}
        if REFERENCE in methods:
            for m in methods:
                if m != REFERENCE:
                    entry["vs"][m] = compare(
                        groups[(layout, kf, REFERENCE)], groups[(layout, kf, m)]
                    )
        out.append(entry)
    return out


def _vs_text(c: dict[str, Any]) -> str:
    if c["clear_win"]:
        return f"**wins** {c['wins']}/{c['seeds']}"
    if c["clear_loss"]:
        return f"**loses** {c['wins']}/{c['seeds']}"
    return f"overlap {c['wins']}/{c['seeds']}"


def report(result: dict[str, Any]) -> str:
    """The markdown report: setup, the full table, and EAFT-REAP's standing per cell."""
    groups = grouped(result["results"])
    s, d, b = result["settings"], result["data"], result["base"]
    lines = [
        f"# Held-out pruning quality: {result['model']}",
        "",
        f"{result['shape']['layers']} layers x {result['shape']['experts']} experts, top-"
        f"{result['shape']['top_k']}; {result['device']}, {result['dtype']}, torch "
        f"{result['torch']}; {result['date']}; {result['wall_s']:.0f} s.",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Held out from training: {d['held_out_rule']}. Evaluation: {s['eval_blocks']} blocks "
        f"of {s['seq_len']} tokens from {d['eval_sources']} held-out sources "
        f"({b['kept_tokens']} completion tokens); calibration: {s['calib_rows']} rows per seed "
        f"sampled from {d['calib_pool_rows']} rows about {d['calib_sources']} other "
        f"{d.get('calib_source', 'held-out')} sources (sources shared: {d['shared_sources']}). "
        f"Seeds {s['seeds']}; safety core "
        f"{s['core']}; keep counts not rounded to a multiple. Base PPL {b['ppl']:.4f}, "
        f"CC rate {b['cc_rate']:.4f}, mean p {b['mean_prob']:.4f}.",
        "",
        "Cells: mean (min..max) over calibration seeds. Gate = near-lossless-v1 "
        "(|dPPL| <= min(0.25, 5% base), |dCC| <= 0.002, |dmean_p| <= 0.02, JS2D <= 0.02): "
        "seeds passing, and passing its other three checks.",
        "",
        "| layout | keep | method | dPPL | dCC_rate | dmean_prob | JS2D | gate | w/o JS2D |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    keys = sorted(groups, key=lambda k: (k[0], -k[1], summary(groups[k], "dppl")["mean"]))
    for key in keys:
        rows = groups[key]
        passes = sum(r["gate_pass"] for r in rows)
        no_js = sum(passes_without_js2d(r, result["gates"], b["ppl"]) for r in rows)
        lines.append(
            f"| {key[0]} | {key[1]} | {key[2]} | {_cell(summary(rows, 'dppl'), 3)} | "
            f"{_cell(summary(rows, 'dcc'), 4)} | {_cell(summary(rows, 'dmean_p'), 4)} | "
            f"{_cell(summary(rows, 'js2d'), 4)} | {passes}/{len(rows)} | {no_js}/{len(rows)} |"
        )
    vs = verdicts(result)
    others = sorted({m for v in vs for m in v["vs"]})
    lines += [
        "",
        "EAFT-REAP against each method on dPPL: seeds won (paired), **wins**/**loses** when the "
        "seed ranges do not overlap.",
        "",
        "| layout | keep | best (mean dPPL) | " + " | ".join(f"vs {m}" for m in others) + " |",
        "|---|---|---|" + "---|" * len(others),
    ]
    for v in vs:
        cols = [_vs_text(v["vs"][m]) if m in v["vs"] else "" for m in others]
        lines.append(
            f"| {v['layout']} | {v['keep_frac']} | {v['best']} | " + " | ".join(cols) + " |"
        )
    return "\n".join(lines) + "\n"


def dppl_matrix(result: dict[str, Any], methods: list[str], labels: dict[str, str]) -> str:
    """One row per (layout, keep), one column per method: dPPL mean (min..max) over seeds."""
    groups = grouped(result["results"])
    cells = sorted({(k[0], k[1]) for k in groups}, key=lambda c: (c[0] != "uniform", -c[1]))
    head = "| layout | keep | " + " | ".join(labels.get(m, m) for m in methods) + " |"
    lines = [head, "|---|---|" + "---|" * len(methods)]
    for layout, kf in cells:
        row = []
        for m in methods:
            rows = groups.get((layout, kf, m))
            row.append(_cell(summary(rows, "dppl"), 3) if rows else "")
        lines.append(f"| {layout} | {kf} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    doc = json.loads(Path(sys.argv[1]).read_text())
    if len(sys.argv) > 2:  # a compact dPPL matrix of the named methods, "name=label" allowed
        pairs = [m.partition("=") for m in sys.argv[2].split(",")]
        print(dppl_matrix(doc, [m for m, _, _ in pairs], {m: lab for m, _, lab in pairs if lab}))
    else:
        print(report(doc))
