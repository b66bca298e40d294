"""Everything a build checks before any work: parameters, variant names, output folders.

``build_pruned`` calls ``check_params`` (ranges, choices, finite numbers, combinations such as
``from_scores`` with ``baseline_eval_rows``) before it reads the config, then ``plan_variants``
(allocation feasibility against the config, one name and one folder per variant) before it
reads a pack or loads the model: a bad flag costs seconds, not a GPU hour. Messages name the
parameter and the allowed values.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from versa_kernels.eaftreap.allocation import AllocationPlan, check_feasible
from versa_kernels.eaftreap.rewrite import check_output_dir
from versa_kernels.eaftreap.scoring import SCORE_KEYS
from versa_kernels.eaftreap.variant_index import CHECKPOINT_SUBDIR, variant_dir
from versa_kernels.errors import ParameterError

if TYPE_CHECKING:
    from versa_kernels.eaftreap.build import Variant

BASELINE_EVAL_ROWS_MAX = 1_000_000
BASELINE_RANDOM_SEEDS_MAX = 100
SHA256_HEX = re.compile(r"[0-9a-f]{64}")

__all__ = ["check_params", "plan_variants", "variant_name"]


def variant_name(kf: float, plan: AllocationPlan, keepfrac_task: bool) -> str:
    if keepfrac_task:
        from versa_kernels.eaftreap.allocation import uniform_keep_n

        n, e = uniform_keep_n(kf, plan.num_experts, plan.keep_n_multiple_of), plan.num_experts
        return f"calib_union_keep{n}of{e}_k{round(100 * n / e)}_eaftreap"
    layout = "perlayer" if plan.layout == "per-layer" else "uniform"
    return (
        f"calib_budget_keepfrac{kf:.2f}_eaftreap_corep{plan.core_pos_top_m}"
        f"c{plan.core_count_top_m}_{layout}"
    )


def _check_finite(p: dict[str, Any]) -> None:
    fracs = p["keep_frac"] if isinstance(p["keep_frac"], list | tuple) else [p["keep_frac"]]
    floats = [("keep_frac", f) for f in fracs] + [
        (name, p[name])
        for name in ("eaft_cc_quantile", "eaft_weight_good", "eaft_weight_cc",
                     "eaft_weight_uncertain", "save_every_s")
    ]  # fmt: skip
    for name, value in floats:
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise ParameterError(f"{name}={value!r} must be a finite number")


def _check_baselines(p: dict[str, Any]) -> None:
    rows, seeds = p["baseline_eval_rows"], p["baseline_random_seeds"]
    if (
        isinstance(rows, bool)
        or not isinstance(rows, int)
        or not 0 <= rows <= BASELINE_EVAL_ROWS_MAX
    ):
        raise ParameterError(
            f"baseline_eval_rows={rows!r} must be an integer in 0..{BASELINE_EVAL_ROWS_MAX} "
            "(0 = no frequency/random comparison)"
        )
    if (
        isinstance(seeds, bool)
        or not isinstance(seeds, int)
        or not 1 <= seeds <= BASELINE_RANDOM_SEEDS_MAX
    ):
        raise ParameterError(
            f"baseline_random_seeds={seeds!r} must be an integer in 1..{BASELINE_RANDOM_SEEDS_MAX}"
            " (random prunes averaged in the comparison)"
        )


def _check_from_scores(p: dict[str, Any]) -> None:
    for name in ("expect_rows_sha256", "expect_weights_sha256"):
        if p[name] and not SHA256_HEX.fullmatch(str(p[name])):
            raise ParameterError(f"{name}={p[name]!r} must be empty or 64 lowercase hex digits")
    if not p["from_scores"]:
        if not p["calib_pack_files"]:
            raise ParameterError(
                "calib_pack_files is empty", hint="Pass at least one parquet file."
            )
        return
    if p["baseline_eval_rows"] > 0:
        raise ParameterError(
            f"baseline_eval_rows={p['baseline_eval_rows']} with from_scores: the comparison "
            "needs the calibration packs and a model forward, a re-cut has neither",
            hint="Pass baseline_eval_rows=0, or run the comparison in a profiled build.",
        )
    if p["gpus"] != 1:
        raise ParameterError(
            f"gpus={p['gpus']} with from_scores: a re-cut runs no forward", hint="Pass gpus=1."
        )
    if p["expect_rows_sha256"]:
        raise ParameterError(
            "expect_rows_sha256 with from_scores: a re-cut reads no calibration rows",
            hint="Leave expect_rows_sha256 empty for a re-cut.",
        )


def check_params(p: dict[str, Any]) -> None:
    """Checks that need no config: choices and ranges (the host checked them too)."""
    from versa_kernels.packs import SAMPLE_STRATEGIES

    if p["score_key"] not in SCORE_KEYS:
        raise ParameterError(f"score_key={p['score_key']!r} is not one of {', '.join(SCORE_KEYS)}")
    if p["calib_pack_sample_strategy"] not in SAMPLE_STRATEGIES:
        raise ParameterError(
            f"calib_pack_sample_strategy={p['calib_pack_sample_strategy']!r} is not one of "
            f"{', '.join(SAMPLE_STRATEGIES)}"
        )
    for name in ("num_rows", "batch_size", "max_seq_length"):
        if int(p[name]) < 1:
            raise ParameterError(f"{name}={p[name]} must be >= 1")
    if int(p["max_tokens_per_row"]) < 0:
        raise ParameterError(f"max_tokens_per_row={p['max_tokens_per_row']} must be >= 0 (0 = all)")
    _check_finite(p)
    if not 0.0 < float(p["eaft_cc_quantile"]) <= 0.5:
        raise ParameterError(f"eaft_cc_quantile={p['eaft_cc_quantile']} must be in (0, 0.5]")
    _check_baselines(p)
    _check_from_scores(p)


def plan_variants(
    config: Any, fracs: list[float], keepfrac_task: bool, art: Path, base: Path,
    p: dict[str, Any],
) -> list[Variant]:  # fmt: skip
    """Check every variant's allocation and output folders; nothing is written yet."""
    variants: list[Variant] = []
    for kf in fracs:
        plan = check_feasible(
            num_layers=config.num_hidden_layers, num_experts=config.num_local_experts,
            top_k=config.num_experts_per_tok, keep_frac=kf, layout=p["layout"],
            min_keep=p["min_keep_per_layer"], max_keep=p["max_keep_per_layer"],
            core_pos_top_m=p["core_pos_top_m"], core_count_top_m=p["core_count_top_m"],
            keep_n_multiple_of=p["keep_n_multiple_of"],
        )  # fmt: skip
        name = variant_name(kf, plan, keepfrac_task)
        if any(v.name == name for v in variants):
            raise ParameterError(
                f"keep_frac={fracs}: two values give the same variant {name}",
                hint="Pass keep_frac values that keep different expert counts.",
            )
        records = variant_dir(art, name).resolve()
        out_dir = p["out_dir"]
        dest = Path(out_dir) / name if out_dir and len(fracs) > 1 else Path(out_dir or "")
        dest = dest.resolve() if out_dir else records / CHECKPOINT_SUBDIR  # absolute: pasted
        if dest == records or dest in records.parents:  # the rename would replace the records
            raise ParameterError(
                f"out_dir={out_dir!r} holds the variant's artifacts folder {records}",
                hint="Leave out_dir empty (checkpoint under the variant folder) or pick another.",
            )
        check_output_dir(base, dest, overwrite=p["overwrite"])
        if (records / "manifest.json").is_file() and not p["overwrite"]:
            raise ParameterError(
                f"variant {name} was already built in {records}",
                hint="Pass --overwrite to rebuild it, or another --artifacts-dir.",
            )
        from versa_kernels.eaftreap.build import Variant

        variants.append(Variant(name, kf, plan, dest, records))
    return variants
