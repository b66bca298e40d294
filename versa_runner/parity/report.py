"""Markdown and PNG rendering of an EAFT pair summary (split from `summarize` to keep it short).

Layout (eaftreap_spec §7, plus a warnings section, CC under the left thresholds and plots):
title and inputs, hero bullets, gate result with each failing check named, per-pack warnings,
the full table, then links to PNG plots (left and right 2-D histograms side by side and their
difference). matplotlib is imported lazily; without it the report says plots were skipped.
"""

from __future__ import annotations

import io
import logging
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from versa_runner.fsutil import atomic_write_bytes

if TYPE_CHECKING:
    from versa_runner.parity.summarize import PairRow, PairSummary

log = logging.getLogger(__name__)

PP_PER_FRACTION = 100.0  # CC shown in percent / percentage points
PLOT_DPI = 110


def render_markdown(
    summary: PairSummary, *, plots: dict[tuple[str, str], str], plot_note: str
) -> str:
    """The full markdown report as one string."""
    g = summary.gates
    lines = [
        "# EAFT parity summary (pair)",
        "",
        f"- Left (baseline): `{summary.left_label}`",
        f"- Right (candidate): `{summary.right_label}`",
        f"- Gates: `{g.name}` ({g.path})",
        "",
        f"## Hero ({g.primary_pack})",
        "",
    ]
    for row in summary.hero_rows:
        lines.append(
            f"- seq={row.seq}: ΔPPL={row.delta_ppl:+.3f} | "
            f"ΔCC={row.delta_cc * PP_PER_FRACTION:+.3f}pp | Δmean_p={row.delta_mean_p:+.4f} | "
            f"JS2D={row.js2d:.4f}"
        )
    verdict = "PASS" if summary.passed else "FAIL"
    bound = f"{g.ppl_bound}({g.max_abs_delta_ppl}, {g.max_rel_delta_ppl}×PPL_left)"
    lines += [
        "",
        f"## Gate Result: {verdict}",
        "",
        f"Rule: on {g.primary_pack} at seq {', '.join(g.primary_seq_lens)}: |ΔPPL| <= {bound}; "
        f"|ΔCC| <= {g.max_abs_delta_cc_rate} (fraction); |Δmean_p| <= "
        f"{g.max_abs_delta_mean_prob}; JS2D <= {g.max_js2d}.",
        "",
    ]
    if summary.failures:
        lines.append("- Failures:")
        for row in summary.hero_rows:
            flags = {c.name: c.ok for c in row.checks(g)}
            if all(flags.values()):
                continue
            lines.append(
                f"  - seq={row.seq} ppl_ok={flags['ppl']} cc_ok={flags['cc']} "
                f"mean_p_ok={flags['mean_p']} js_ok={flags['js2d']}"
            )
        lines += [f"  - {text}" for text in summary.failures]
        lines.append("")
    lines += ["## Per-pack warnings (do not change the verdict)", ""]
    lines += [f"- WARNING {text}" for text in summary.warnings] or ["- none"]
    lines += ["", "## Full Table (Right vs Left)", ""]
    lines += _table(summary.rows)
    lines += [
        "",
        "cc_L/cc_R: each run's own exact 15% thresholds, every kept token counted. cc_L@L / "
        "cc_R@L put both runs under the left run's thresholds: cc_L@L is cc_L; cc_R@L is counted "
        "on the right run's reservoir sample of (p, H) points, whose coordinates are stored "
        "rounded to 6 decimals, so a point that close to a threshold may lie on either side: "
        "'±k tok' gives how many such points a complete sample holds, '~' marks an estimate (a "
        "partial sample, or without samples the 2-D histogram by cell area). A figure without "
        "either mark is an exact count.",
        "",
        "## Plots",
        "",
    ]
    if plot_note:
        lines.append(plot_note)
    for (pack, seq), rel in sorted(plots.items(), key=lambda kv: (kv[0][0], int(kv[0][1]))):
        lines.append(f"- pack={pack} seq={seq}: [{rel}]({rel})")
        lines.append(f"  ![{pack} {seq}]({rel})")
    return "\n".join(lines) + "\n"


def _table(rows: tuple[PairRow, ...]) -> list[str]:
    head = (
        "| pack | seq | ppl_L | ppl_R | Δppl | cc_L | cc_R | Δcc (pp) | mean_p_L | mean_p_R "
        "| Δmean_p | JS2D | cc_L@L | cc_R@L | kept_L | kept_R |"
    )
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        out.append(
            f"| {r.pack} | {r.seq} | {r.ppl_left:.3f} | {r.ppl_right:.3f} | {r.delta_ppl:+.3f} | "
            f"{r.cc_left * PP_PER_FRACTION:.3f}% | {r.cc_right * PP_PER_FRACTION:.3f}% | "
            f"{r.delta_cc * PP_PER_FRACTION:+.3f} | {r.mean_p_left:.4f} | {r.mean_p_right:.4f} | "
            f"{r.delta_mean_p:+.4f} | {r.js2d:.4f} | {r.cc_left_at_left.cell()} | "
            f"{r.cc_right_at_left.cell()} | {r.kept_left} | {r.kept_right} |"
        )
    return out


def write_plots(
    summary: PairSummary, left: dict[str, Any], right: dict[str, Any], out_md: Path
) -> tuple[dict[tuple[str, str], str], str]:
    """PNG per hero row (left | right | right - left); returns {(pack, seq): relative path}, note."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on hosts or CI
        import matplotlib.pyplot as plt
    except ImportError:
        return {}, "Plots skipped: matplotlib is not installed (`pip install matplotlib`)."
    plot_dir = out_md.parent / f"{out_md.stem}_plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    models = {
        side: {(p["pack"], s): e["model"] for p in run["packs"] for s, e in p["seq"].items()}
        for side, run in (("left", left), ("right", right))
    }
    written: dict[tuple[str, str], str] = {}
    for row in summary.hero_rows:
        key = (row.pack, row.seq)
        lm, rm = models["left"][key], models["right"][key]
        grid_l, grid_r = _grid(lm), _grid(rm)
        diff = [
            [b - a for a, b in zip(ra, rb, strict=True)]
            for ra, rb in zip(grid_l, grid_r, strict=True)
        ]
        hist = lm["hist2d_x_H"]
        extent = (hist["x_edges"][0], hist["x_edges"][-1], hist["y_edges"][0], hist["y_edges"][-1])
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), constrained_layout=True)
        vmax = max(max(map(max, grid_l)), max(map(max, grid_r)))
        for ax, grid, title in (
            (axes[0], grid_l, f"left: {summary.left_label}"),
            (axes[1], grid_r, f"right: {summary.right_label}"),
        ):
            im = ax.imshow(
                grid,
                origin="lower",
                aspect="auto",
                extent=extent,
                vmin=0,
                vmax=vmax,
                cmap="viridis",
            )
            ax.set_title(title, fontsize=9)
            fig.colorbar(im, ax=ax, label="sqrt(share of tokens)")
        lim = max(1e-12, max(abs(v) for r in diff for v in r))
        im = axes[2].imshow(
            diff, origin="lower", aspect="auto", extent=extent, vmin=-lim, vmax=lim, cmap="RdBu_r"
        )
        axes[2].set_title(f"right - left (JS2D={row.js2d:.4f})", fontsize=9)
        fig.colorbar(im, ax=axes[2], label="difference of sqrt(share)")
        for ax in axes:
            ax.set_xlabel(lm.get("x_scale", "p_t"))
            ax.set_ylabel("H_top20 / ln 20")
        fig.suptitle(f"pack={row.pack} seq={row.seq}")
        name = f"{_safe(row.pack)}_{row.seq}.png"
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=PLOT_DPI)
        atomic_write_bytes(plot_dir / name, png.getvalue())  # a reader never sees half a PNG
        plt.close(fig)
        written[key] = f"{plot_dir.name}/{name}"
    return written, ""


def _grid(model: dict[str, Any]) -> list[list[float]]:
    """[ybins][xbins] grid of sqrt(share): rows are H bins so imshow puts H on the y axis."""
    hist = model["hist2d_x_H"]
    xbins, ybins, counts = int(hist["xbins"]), int(hist["ybins"]), hist["counts"]
    total = math.fsum(counts) or 1.0
    # sqrt spreads the few dense cells (high p, low H) from the long sparse tail.
    return [
        [math.sqrt(counts[ix * ybins + iy] / total) for ix in range(xbins)] for iy in range(ybins)
    ]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
