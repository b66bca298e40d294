"""The files a build leaves: per-variant folders, the index manifest, the report (spec §5.4).

Each variant's folder (``variant_index`` draws the layout) gets its manifest, its recipe, the
build's ``reap-scores.yaml``, the scores table and its keep lists; nothing of one variant is
written into another's folder. The index ``manifest.json`` then names every variant, and the
primary build's files are copied to the top level for the old single-build readers.

A variant manifest records the layout written, the per-layer counts, the calibration rows
(count and sha256), the EAFT settings, and where the scores came from (``cut_from``: None when
this build profiled; the scores file and its sha256, or the finished profile state, for a
re-cut), so the build can be repeated and checked.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from versa_kernels.eaftreap import outputs
from versa_kernels.eaftreap.report import write_build_report
from versa_kernels.eaftreap.variant_index import register_build
from versa_kernels.fsio import atomic_write_text

if TYPE_CHECKING:
    from versa_kernels.eaftreap.build import Variant

__all__ = ["write_build_outputs"]

EAFT_META_KEYS = (
    "cc_quantile", "uncertain_quantile", "entropy_top_k", "w_good", "w_uncertain", "w_conflict",
    "p_lo", "h_lo",
)  # fmt: skip
VARIANT_FILES = (
    outputs.REAP_RECIPE_YAML,
    outputs.REAP_SCORES_YAML,
    outputs.SCORES_PARQUET,
    outputs.PROFILE_META_JSON,
    outputs.KEEP_COUNTS_JSON,
    outputs.CORE_EXPERTS_JSON,
    outputs.KEEP_EXPERTS_JSON,
)


def _variant_doc(v: Variant) -> dict[str, Any]:
    return {
        "out_dir": str(v.out_dir), "artifacts_dir": str(v.record_dir), "layout": v.plan.layout,
        "keep_frac_requested": v.keep_frac,
        "keep_frac_actual": sum(v.keep_counts) / (v.plan.num_layers * v.plan.num_experts),
        "budget": v.plan.budget, "keep_counts_by_layer": v.keep_counts,
        "stored_experts_per_layer": v.stored_experts,
        "padded_with_masked_experts": v.stored_experts > min(v.keep_counts),
        "min_keep_per_layer": v.plan.min_keep, "max_keep_per_layer": v.plan.max_keep,
        "neff_by_layer": v.neff, "mass_share_kept_by_layer": v.mass_share_kept,
        "baselines": v.baselines,
    }  # fmt: skip


def _build_fields(
    v: Variant, meta: dict[str, Any], sample: dict[str, Any], params: dict[str, Any],
    cut_from: dict[str, Any] | None,
) -> dict[str, Any]:  # fmt: skip
    """The single-build manifest fields (schema 1 names, kept for its readers)."""
    return {
        "base_model": params["model_path"],
        "run_id": params["run_id"],
        "variant_name": v.name,
        "out_dir": str(v.out_dir),
        "layout": v.plan.layout,
        "keep_frac": v.keep_frac,
        "keep_counts_by_layer": v.keep_counts,
        "core_pos_top_m": params["core_pos_top_m"],
        "core_count_top_m": params["core_count_top_m"],
        "keep_n_multiple_of": params["keep_n_multiple_of"],
        "score_key": params["score_key"],
        "top_k_unchanged": v.plan.top_k,
        "calib": sample,
        "eaft": {k: meta.get(k) for k in EAFT_META_KEYS},
        "profile": meta,
        "cut_from": cut_from,
        "files": [n for n in VARIANT_FILES if (v.record_dir / n).is_file()],
    }


def write_build_outputs(
    art: Path,
    reports: Path,
    variants: list[Variant],
    *,
    meta: dict[str, Any],
    sample: dict[str, Any],
    params: dict[str, Any],
    scores_yaml: str,
    table: list[dict[str, float | int]] | None,
    cut_from: dict[str, Any] | None,
) -> tuple[Path, Path, list[Path]]:
    """Write every variant's folder, plots, the index manifest and the report.

    Returns ``(index manifest path, report path, plot paths)``.
    """
    import matplotlib.pyplot as plt

    plot_paths: list[Path] = []
    variant_manifests: dict[str, dict[str, Any]] = {}
    for v in variants:
        d = v.record_dir
        if table is not None:
            outputs.write_scores_parquet(d / outputs.SCORES_PARQUET, table)
        outputs.write_json(d / outputs.PROFILE_META_JSON, {"schema_version": 1, **meta})
        atomic_write_text(d / outputs.REAP_SCORES_YAML, scores_yaml)
        outputs.write_yaml(d / outputs.REAP_RECIPE_YAML, v.recipe)
        outputs.write_json(d / outputs.KEEP_COUNTS_JSON, v.keep_counts)
        outputs.write_json(d / outputs.CORE_EXPERTS_JSON, v.cores)
        outputs.write_json(d / outputs.KEEP_EXPERTS_JSON, v.kept)
        png = reports / f"build_pruned_{v.name}_allocation.png"
        fig = outputs.plot_allocation(
            png, keep_counts=v.keep_counts, num_experts=v.plan.num_experts,
            mass_share_kept=v.mass_share_kept, neff=v.neff, title=v.name,
        )  # fmt: skip
        plt.close(fig)
        plot_paths.append(png)
        doc = {
            "schema_version": 2,
            "kind": "build_variant",
            **_build_fields(v, meta, sample, params, cut_from),
            "artifacts_dir": str(d),
            "variant": _variant_doc(v),
        }
        outputs.write_json(d / outputs.MANIFEST_JSON, doc)
        variant_manifests[v.name] = doc

    first, single = variants[0], len(variants) == 1

    def by_variant(attr: str) -> Any:  # old top-level shape: a list, or a dict per variant
        return getattr(first, attr) if single else {v.name: getattr(v, attr) for v in variants}

    primary_files: dict[str, Any] = {
        name: first.record_dir / name
        for name in (outputs.REAP_RECIPE_YAML, outputs.REAP_SCORES_YAML, outputs.PROFILE_META_JSON)
    }
    if table is not None:
        primary_files[outputs.SCORES_PARQUET] = first.record_dir / outputs.SCORES_PARQUET
    primary_files[outputs.KEEP_COUNTS_JSON] = by_variant("keep_counts")
    primary_files[outputs.CORE_EXPERTS_JSON] = by_variant("cores")
    primary_files[outputs.KEEP_EXPERTS_JSON] = by_variant("kept")
    records = {
        v.name: {
            "out_dir": str(v.out_dir), "artifacts_dir": str(v.record_dir),
            "manifest": str(v.record_dir / outputs.MANIFEST_JSON), "keep_frac": v.keep_frac,
            "layout": v.plan.layout, "run_id": params["run_id"], "cut_from": cut_from,
            "base_model": params["model_path"],
        }
        for v in variants
    }  # fmt: skip
    build_fields = {
        **_build_fields(first, meta, sample, params, cut_from),
        "build_variants": [v.name for v in variants],
    }
    register_build(
        art, records=records, primary=cut_from is None, build_manifest=build_fields,
        primary_files=primary_files,
    )  # fmt: skip
    report_path = write_build_report(reports, list(variant_manifests.values()), plot_paths)
    return art / outputs.MANIFEST_JSON, report_path, plot_paths
