"""The build's markdown report: what was pruned, how, and how well (reports/ next to the plots)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from versa_kernels.fsio import atomic_write_text

__all__ = ["write_build_report"]


def _fmt(x: Any) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def _baseline_lines(b: dict[str, Any]) -> list[str]:
    randoms = ", ".join(f"{p:.4f}" for p in b["random_ppl"])
    return [
        "",
        f"Held-out completion-only PPL ({b['eval_rows']} rows, rows_sha256 "
        f"`{b['eval_rows_sha256'][:16]}`), same per-layer counts for every method:",
        "",
        "| model | PPL | dPPL vs base |",
        "|---|---|---|",
        f"| base | {b['base_ppl']:.4f} | 0 |",
        f"| EAFT-REAP | {b['eaftreap_ppl']:.4f} | {b['eaftreap_ppl'] - b['base_ppl']:+.4f} |",
        f"| frequency | {b['frequency_ppl']:.4f} | {b['frequency_ppl'] - b['base_ppl']:+.4f} |",
        f"| random (mean of {b['random_seeds']}) | {b['random_ppl_mean']:.4f} | "
        f"{b['random_ppl_mean'] - b['base_ppl']:+.4f} |",
        "",
        f"Random seeds: {randoms}.",
    ]


def write_build_report(reports_dir: Path, manifest: dict[str, Any], plots: list[Path]) -> Path:
    """Write ``reports/build_pruned_<variant>.md`` from the manifest; returns its path."""
    prof = manifest["profile"]
    calib = manifest["calib"]
    lines = [
        f"# EAFT-REAP build: {manifest['variant_name']}",
        "",
        f"- base model: `{manifest['base_model']}`",
        f"- pruned checkpoint: `{manifest['out_dir']}` (layout **{manifest['layout']}**)",
        f"- keep_frac requested: {manifest['keep_frac']}; score key `{manifest['score_key']}`; "
        f"top_k unchanged ({manifest['top_k_unchanged']})",
        f"- calibration: {calib['rows_used']} rows ({calib['strategy']}, seed {calib['seed']}) "
        f"from {len(calib['pack_files'])} pack(s); rows_sha256 `{calib['rows_sha256'][:16]}`",
        f"- scored completion tokens: {prof['scored_tokens']}; p_lo {_fmt(prof['p_lo'])}, "
        f"h_lo {_fmt(prof['h_lo'])}; classes {prof['region_counts']}",
        f"- profiling throughput: {prof['tokens_per_s']:.1f} tok/s on {prof['device']} "
        f"({prof['profile_s']:.1f} s incl. load)",
    ]
    if "rank_stability" in prof:
        taus = ", ".join(f"{t:.2f}" for t in prof["rank_stability"]["tau_by_layer"])
        lines.append(
            f"- ranking stability (split-half Kendall tau, 1 = identical): mean "
            f"{prof['rank_stability']['tau_mean']:.3f}; per layer {taus}"
        )
    for name, v in manifest["variants"].items():
        lines += [
            "",
            f"## {name}",
            "",
            f"- out_dir `{v['out_dir']}`; stored experts per layer {v['stored_experts_per_layer']}"
            + (" (padded with masked experts)" if v["padded_with_masked_experts"] else ""),
            f"- budget {v['budget']} = keep_frac_actual {v['keep_frac_actual']:.4f}; bounds "
            f"[{v['min_keep_per_layer']}, {v['max_keep_per_layer']}]",
            "",
            "| layer | kept | neff | score mass kept |",
            "|---|---|---|---|",
        ]
        for i, (k, n, m) in enumerate(
            zip(
                v["keep_counts_by_layer"],
                v["neff_by_layer"],
                v["mass_share_kept_by_layer"],
                strict=True,
            )
        ):
            lines.append(f"| {i} | {k} | {n:.2f} | {m:.3f} |")
        if v.get("baselines"):
            lines += _baseline_lines(v["baselines"])
    lines += ["", *[f"![allocation]({p.name})" for p in plots], ""]
    path = Path(reports_dir) / f"build_pruned_{manifest['variant_name']}.md"
    atomic_write_text(path, "\n".join(lines))
    return path
