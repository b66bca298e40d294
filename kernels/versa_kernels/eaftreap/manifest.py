"""manifest.json, the side files and reap-recipe.yaml of a build (eaftreap_spec §5.4, §9.1).

The manifest is what later steps read (the playbook's step 2 takes ``out_dir`` from it); it
records the layout written, the per-layer counts, the calibration rows (count and sha256) and
the EAFT settings, so the build can be repeated and checked.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from versa_kernels.eaftreap import outputs
from versa_kernels.eaftreap.report import write_build_report

if TYPE_CHECKING:
    from versa_kernels.eaftreap.build import Variant

__all__ = ["write_build_outputs"]


def write_build_outputs(
    art: Path,
    reports: Path,
    variants: list[Variant],
    meta: dict[str, Any],
    sample: dict[str, Any],
    params: dict[str, Any],
) -> tuple[Path, Path, list[Path]]:
    """Write the side files, plots, reap-recipe.yaml, manifest.json and the markdown report.

    Returns ``(manifest path, report path, plot paths)``.
    """
    first = variants[0]
    single = len(variants) == 1
    keep_counts = first.keep_counts if single else {v.name: v.keep_counts for v in variants}
    cores = first.cores if single else {v.name: v.cores for v in variants}
    kept = first.kept if single else {v.name: v.kept for v in variants}
    outputs.write_json(art / outputs.KEEP_COUNTS_JSON, keep_counts)
    outputs.write_json(art / outputs.CORE_EXPERTS_JSON, cores)
    outputs.write_json(art / outputs.KEEP_EXPERTS_JSON, kept)
    plot_paths = []
    for v in variants:
        png = reports / f"build_pruned_{v.name}_allocation.png"
        fig = outputs.plot_allocation(
            png, keep_counts=v.keep_counts, num_experts=v.plan.num_experts,
            mass_share_kept=v.mass_share_kept, neff=v.neff, title=v.name,
        )  # fmt: skip
        import matplotlib.pyplot as plt

        plt.close(fig)
        plot_paths.append(png)
    variant_docs = {
        v.name: {
            "out_dir": str(v.out_dir), "layout": v.plan.layout, "keep_frac_requested": v.keep_frac,
            "keep_frac_actual": sum(v.keep_counts) / (v.plan.num_layers * v.plan.num_experts),
            "budget": v.plan.budget, "keep_counts_by_layer": v.keep_counts,
            "stored_experts_per_layer": v.stored_experts,
            "padded_with_masked_experts": v.stored_experts > min(v.keep_counts),
            "min_keep_per_layer": v.plan.min_keep, "max_keep_per_layer": v.plan.max_keep,
            "neff_by_layer": v.neff, "mass_share_kept_by_layer": v.mass_share_kept,
            "baselines": v.baselines,
        }
        for v in variants
    }  # fmt: skip
    manifest = {
        "schema_version": 1,
        "base_model": params["model_path"],
        "run_id": params["run_id"],
        "variant_name": first.name,
        "out_dir": str(first.out_dir),
        "layout": first.plan.layout,
        "keep_frac": first.keep_frac,
        "keep_counts_by_layer": first.keep_counts,
        "core_pos_top_m": params["core_pos_top_m"],
        "core_count_top_m": params["core_count_top_m"],
        "keep_n_multiple_of": params["keep_n_multiple_of"],
        "score_key": params["score_key"],
        "top_k_unchanged": first.plan.top_k,
        "variants": variant_docs,
        "calib": sample,
        "eaft": {
            k: meta[k]
            for k in (
                "cc_quantile",
                "uncertain_quantile",
                "entropy_top_k",
                "w_good",
                "w_uncertain",
                "w_conflict",
                "p_lo",
                "h_lo",
            )
        },  # fmt: skip
        "profile": meta,
        "files": [
            outputs.SCORES_PARQUET,
            outputs.REAP_SCORES_YAML,
            outputs.REAP_RECIPE_YAML,
            outputs.KEEP_COUNTS_JSON,
            outputs.CORE_EXPERTS_JSON,
            outputs.KEEP_EXPERTS_JSON,
        ],  # fmt: skip
    }
    outputs.write_reap_recipe(
        art / outputs.REAP_RECIPE_YAML, _recipe(first, variants, meta, sample, params)
    )
    manifest_path = art / outputs.MANIFEST_JSON
    outputs.write_json(manifest_path, manifest)
    report_path = write_build_report(reports, manifest, plot_paths)
    return manifest_path, report_path, plot_paths


def _recipe(
    first: Variant, variants: list[Variant], meta: dict[str, Any], sample: dict[str, Any],
    params: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    return {
        "name": first.name,
        "description": "EAFT-REAP expert prune, top_k unchanged, no finetune (versa-runner build).",
        "model": {
            "base_model_id": params["model_path"],
            "pruned_model_label": first.name,
            "keep_frac_requested": first.keep_frac,
            "keep_counts_by_layer": first.keep_counts,
            "num_experts": first.plan.num_experts,
            "uniform_keep_n_across_layers": len(set(first.keep_counts)) == 1,
            "layout": first.plan.layout,
            "top_k_unchanged": True,
        },
        "scoring": {
            "method": "eaftreap",
            "top_k": first.plan.top_k,
            "entropy_top_k": 20,
            "cc_quantile": meta["cc_quantile"],
            "uncertain_quantile": meta["uncertain_quantile"],
            "weights": {
                "w_good": meta["w_good"],
                "w_uncertain": meta["w_uncertain"],
                "w_conflict": meta["w_conflict"],
            },
            "score_key": params["score_key"],
            "label_position": "predicting position t",
        },  # fmt: skip
        "profiling_data": {
            "dataset_repo": params["calib_packs_repo"],
            "pack_files": sample["pack_files"],
            "sampling": {
                "strategy": sample["strategy"],
                "num_rows": sample["num_rows"],
                "seed": sample["seed"],
                "weights": sample["weights"],
                "rows_sha256": sample["rows_sha256"],
            },
            "max_seq_length": params["max_seq_length"],
            "batch_size": params["batch_size"],
            "token_sampling": {
                "max_tokens_per_row": params["max_tokens_per_row"],
                "strategy": "strided",
            },
        },  # fmt: skip
        "selection_constraints": {
            "keep_n_multiple_of": params["keep_n_multiple_of"],
            "min_keep_per_layer": first.plan.min_keep,
            "max_keep_per_layer": first.plan.max_keep,
            "core_experts": {
                "core_pos_top_m": params["core_pos_top_m"],
                "core_count_top_m": params["core_count_top_m"],
            },
        },  # fmt: skip
        "structural_rewrite": {
            "writer": "safetensors",
            "byte_exact_slices": True,
            "mapping_file_in_model_dir": "expert_mapping.json",
        },  # fmt: skip
        "variants": {v.name: str(v.out_dir) for v in variants},
    }
