"""Calibration rows of a build: resolve the packs, sample, check, tokenize; held-out baselines.

The rows are what the profile's scores depend on besides the weights: their sha256 goes into
the manifest and the recipe, and a build from a recipe refuses other rows before any forward
(``expect_rows_sha256``). The held-out comparison (``baseline_eval_rows`` > 0) samples rows
disjoint from the calibration rows, from the same packs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from versa_kernels.errors import DataError

if TYPE_CHECKING:
    from versa_kernels.eaftreap.build import Variant
    from versa_kernels.eaftreap.profile import CalibExample
    from versa_kernels.packs import PackSample

log = logging.getLogger(__name__)

__all__ = ["Calibration", "held_out_baselines", "load_calibration"]


@dataclass(frozen=True)
class Calibration:
    """The sampled rows, their record (no texts), and the tokenized examples."""

    sample: PackSample
    record: dict[str, Any]
    pack_paths: list[Path]
    tokenizer: Any
    examples: list[CalibExample]


def _csv_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [str(v) for v in value]


def _resolve_pack_files(repo: str, files: list[str]) -> tuple[list[Path], list[str]]:
    """Local paths as given; names that are not local files are fetched from ``repo``.

    This is what lets the playbook's command run unchanged where the hub is unreachable: pass
    local paths in ``calib_pack_files`` and the repo is recorded but not contacted.
    """
    from versa_kernels.packs import fetch_pack_files

    paths, sources = [], []
    for name in files:
        if Path(name).is_file():
            paths.append(Path(name))
            sources.append("local")
        elif repo:
            paths.extend(fetch_pack_files(repo, [name]))
            sources.append(f"hf:{repo}")
        else:
            raise DataError(f"calibration pack {name!r} is not a local file and no repo is set")
    if repo and all(src == "local" for src in sources):
        log.info("all calib_pack_files are local paths; %s was not contacted", repo)
    return paths, sources


def load_calibration(p: dict[str, Any], base: Path) -> Calibration:
    """Sample the rows ``p`` names, refuse other rows than expected, tokenize them."""
    from transformers import AutoTokenizer

    from versa_kernels.eaftreap.profile import prepare_examples
    from versa_kernels.packs import load_packs, parse_weights_csv

    weights_csv = p["calib_pack_weights_csv"]
    if isinstance(weights_csv, list | tuple):
        weights_csv = ",".join(str(w) for w in weights_csv)
    pack_paths, pack_sources = _resolve_pack_files(
        p["calib_packs_repo"], _csv_list(p["calib_pack_files"])
    )
    sample = load_packs(
        pack_paths, num_rows=p["num_rows"], seed=p["seed"],
        strategy=p["calib_pack_sample_strategy"],
        weights=parse_weights_csv(weights_csv, len(pack_paths)),
    )  # fmt: skip
    if p["expect_rows_sha256"] and sample.rows_sha256 != p["expect_rows_sha256"]:
        raise DataError(
            f"calibration rows sha256 {sample.rows_sha256} differs from expect_rows_sha256="
            f"{p['expect_rows_sha256']}: these packs or sampling settings are not the recipe's",
            hint="Pass the recipe's pack files (same content) and sampling settings.",
        )
    record = {**sample.record(), "dataset_repo": p["calib_packs_repo"], "sources": pack_sources}
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    examples = prepare_examples(
        [r.text for r in sample.rows], tokenizer, max_seq_length=p["max_seq_length"],
        max_tokens_per_row=p["max_tokens_per_row"],
    )  # fmt: skip
    return Calibration(sample, record, pack_paths, tokenizer, examples)


def held_out_baselines(
    model: Any, calib: Calibration, v: Variant, count: np.ndarray, params: dict[str, Any]
) -> dict[str, Any]:
    """Held-out completion PPL of this variant vs frequency and random pruning."""
    from versa_kernels.eaftreap.evaluate import compare_baselines
    from versa_kernels.eaftreap.profile import prepare_examples
    from versa_kernels.packs import load_packs

    held_out = load_packs(
        calib.pack_paths, num_rows=int(params["baseline_eval_rows"]), seed=int(params["seed"]) + 1,
        strategy="concat", exclude={(r.source_file, r.row_i) for r in calib.sample.rows},
    )  # fmt: skip
    examples = prepare_examples(
        [r.text for r in held_out.rows],
        calib.tokenizer,
        max_seq_length=int(params["max_seq_length"]),
    )
    result = compare_baselines(
        model, examples, kept=v.kept, count=count, experts_per_layer=[v.plan.num_experts] * len(v.kept),
        random_seeds=int(params["baseline_random_seeds"]), batch_size=int(params["batch_size"]),
    )  # fmt: skip
    return {**result, "eval_rows": len(held_out.rows), "eval_rows_sha256": held_out.rows_sha256}
