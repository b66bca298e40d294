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


def _source_lines(manifest: dict[str, Any]) -> list[str]:
    """Where the scores came from: this build's profile, a scores file, or a finished state."""
    prof, cut = manifest["profile"], manifest.get("cut_from")
    if cut and cut.get("kind") == "reap_scores":
        return [
            f"- **cut from scores** `{cut['path']}` (sha256 `{cut['sha256']}`): no model forward "
            f"in this build; the scores were profiled on {prof.get('device', '?')} "
            f"({prof.get('scored_tokens', '?')} scored tokens)"
        ]
    if cut and cut.get("kind") == "profile_state":
        return [
            f"- **cut from the finished profile state** `{cut['path']}`: no model forward in this "
            "build (the profile was computed by an earlier run with the same inputs and weights)"
        ]
    return [
        f"- profiling throughput: {prof['tokens_per_s']:.1f} tok/s on {prof['device']} "
        f"({prof['profile_s']:.1f} s incl. load)"
    ]


def write_build_report(
    reports_dir: Path, variant_manifests: list[dict[str, Any]], plots: list[Path]
) -> Path:
    """Write ``reports/build_pruned_<first variant>.md`` from the variant manifests."""
    manifest = variant_manifests[0]
    prof = manifest["profile"]
    calib = manifest["calib"]
    lines = [
        f"# EAFT-REAP build: {manifest['variant_name']}",
        "",
        f"- base model: `{manifest['base_model']}`",
        f"- pruned checkpoint: `{manifest['out_dir']}` (layout **{manifest['layout']}**)",
        f"- keep_frac requested: {manifest['keep_frac']}; score key `{manifest['score_key']}`; "
        f"top_k unchanged ({manifest['top_k_unchanged']})",
        f"- calibration: {calib.get('rows_used')} rows ({calib.get('strategy')}, seed "
        f"{calib.get('seed')}) from {len(calib.get('pack_files', []))} pack(s); rows_sha256 "
        f"`{str(calib.get('rows_sha256'))[:16]}`",
        f"- scored completion tokens: {prof.get('scored_tokens')}; p_lo {_fmt(prof.get('p_lo'))}, "
        f"h_lo {_fmt(prof.get('h_lo'))}; classes {prof.get('region_counts')}",
        *_source_lines(manifest),
    ]
    if "rank_stability" in prof:
        taus = ", ".join(f"{t:.2f}" for t in prof["rank_stability"]["tau_by_layer"])
        lines.append(
            f"- ranking stability (split-half Kendall tau, 1 = identical): mean "
            f"{prof['rank_stability']['tau_mean']:.3f}; per layer {taus}"
        )
    for m in variant_manifests:
        v = m["variant"]
        lines += [
            "",
            f"## {m['variant_name']}",
            "",
            f"- out_dir `{v['out_dir']}`; stored experts per layer {v['stored_experts_per_layer']}"
            + (" (padded with masked experts)" if v["padded_with_masked_experts"] else ""),
            f"- artifacts `{v['artifacts_dir']}` (reap-recipe.yaml and reap-scores.yaml are also "
            "inside the checkpoint)",
            f"- budget {v['budget']} = keep_frac_actual {v['keep_frac_actual']:.4f}; bounds "
            f"[{v['min_keep_per_layer']}, {v['max_keep_per_layer']}]",
            "",
            "| layer | kept | neff | score mass kept |",
            "|---|---|---|---|",
        ]
        for i, (k, n, share) in enumerate(
            zip(
                v["keep_counts_by_layer"],
                v["neff_by_layer"],
                v["mass_share_kept_by_layer"],
                strict=True,
            )
        ):
            lines.append(f"| {i} | {k} | {n:.2f} | {share:.3f} |")
        if v.get("baselines"):
            lines += _baseline_lines(v["baselines"])
    lines += ["", *[f"![allocation]({p.name})" for p in plots], ""]
    path = Path(reports_dir) / f"build_pruned_{manifest['variant_name']}.md"
    atomic_write_text(path, "\n".join(lines))
    return path
