"""``build_pruned``: the whole EAFT-REAP build the ``build_pruned`` notebook runs.

Order matters: every parameter and every allocation constraint is checked against the base
config, and the output directories are checked, *before* the packs are read or the model is
loaded (a bad flag costs seconds, not a GPU hour). Then: hash the base weights (cached) ->
sample packs -> tokenize with completion masks -> profile (resumable; the resume key covers the
weights) -> cut each variant (``recut``: allocate, select, rewrite with the recipe and scores
inside) -> per-variant folders, index manifest, plots, report (``manifest``). With ``keep_frac``
a list (the keepfrac task) one profile serves every variant.

``from_scores``: the scores come from a ``reap-scores.yaml`` instead of a profile; no pack is
read, no tokenizer or model is loaded, no forward runs. The calibration and EAFT parameters
are then not used: the scores file fixes them, and the recipe records the file's.

Parameter names are the task flags in snake_case (``versa_runner.tasks``); ``run_id`` is
accepted because papermill injects it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from versa_kernels.eaftreap.allocation import AllocationPlan
from versa_kernels.eaftreap.checks import check_params, plan_variants
from versa_kernels.eaftreap.fingerprint import code_version, weights_fingerprint
from versa_kernels.eaftreap.manifest import write_build_outputs
from versa_kernels.eaftreap.reap_scores import load_reap_scores
from versa_kernels.eaftreap.recut import ScoreSource, cut_variants, source_from_scores
from versa_kernels.eaftreap.scoring import EaftWeights, split_half_tau
from versa_kernels.errors import KernelError, ParameterError

log = logging.getLogger(__name__)

BUDGETED_SUBDIR = "20b_pruned_models_eaftreap_budgeted"
KEEPFRAC_SUBDIR = "20b_pruned_models_eaftreap_keepfrac"
PROFILE_STATE = "profile_state.pt"
WEIGHTS_SHA256_CACHE = "weights_sha256_cache.json"

__all__ = ["BuildResult", "Variant", "build_pruned"]


@dataclass
class Variant:
    """One pruned checkpoint of the build."""

    name: str
    keep_frac: float
    plan: AllocationPlan
    out_dir: Path
    record_dir: Path = field(default_factory=Path)
    """The variant's own artifacts folder (``variant_index``)."""
    keep_counts: list[int] = field(default_factory=list)
    cores: list[list[int]] = field(default_factory=list)
    kept: list[list[int]] = field(default_factory=list)
    neff: list[float] = field(default_factory=list)
    mass_share_kept: list[float] = field(default_factory=list)
    stored_experts: int = 0
    baselines: dict[str, Any] | None = None
    recipe: dict[str, Any] = field(default_factory=dict)


@dataclass
class BuildResult:
    """What the notebook shows: paths, allocation per variant, profile statistics."""

    artifacts_dir: Path
    manifest_path: Path
    report_path: Path
    plot_paths: list[Path]
    variants: list[Variant]
    profile_meta: dict[str, Any]
    sample: dict[str, Any]
    scores_table: list[dict[str, float | int]]

    @property
    def out_dir(self) -> Path:
        """The (first) pruned checkpoint directory."""
        return self.variants[0].out_dir


def build_pruned(
    *,
    model_path: str,
    calib_pack_files: list[str] | str = "",
    calib_packs_repo: str = "",
    calib_pack_sample_strategy: str = "per_file",
    calib_pack_weights_csv: list[float] | str | None = None,
    num_rows: int = 2000,
    seed: int = 3407,
    max_seq_length: int = 4096,
    batch_size: int = 1,
    keep_frac: float | list[float] = 0.75,
    min_keep_per_layer: int | None = None,
    max_keep_per_layer: int | None = None,
    core_pos_top_m: int = 4,
    core_count_top_m: int = 0,
    keep_n_multiple_of: int = 4,
    layout: str = "per-layer",
    score_key: str = "eaft_gate_norm_sum",
    eaft_cc_quantile: float = 0.15,
    eaft_weight_good: float = 1.0,
    eaft_weight_cc: float = -2.0,
    eaft_weight_uncertain: float = 0.25,
    out_dir: str = "",
    overwrite: bool = False,
    max_tokens_per_row: int = 0,
    baseline_eval_rows: int = 0,
    baseline_random_seeds: int = 5,
    from_scores: str = "",
    expect_rows_sha256: str = "",
    expect_weights_sha256: str = "",
    artifacts_dir: str = "",
    reports_dir: str = "reports",
    device: str = "auto",
    save_every_s: float = 300.0,
    save_every_batches: int = 0,
    run_id: str = "",
    gpus: int = 1,
    on_batch: Any = None,
    dist: Any = None,
) -> BuildResult | dict[str, Any]:
    """Profile (or read ``from_scores``), cut, rewrite and report (module docstring).

    ``baseline_eval_rows`` > 0 adds held-out PPL of EAFT-REAP vs frequency vs random pruning
    (``baseline_random_seeds`` random prunes). ``expect_rows_sha256`` / ``expect_weights_sha256``
    (a recipe's) refuse other calibration rows or base weights before any forward.

    ``gpus > 1``: profiling runs on that many ranks under torchrun (``versa_kernels.
    distributed``); rank 0 leaves a finished profile state, and this call re-cuts from it.
    ``dist`` is set only inside such a rank: it profiles its share and returns the profile
    meta (a dict) without writing outputs.
    """
    params = {k: v for k, v in locals().items() if k not in ("on_batch", "dist")}
    from versa_kernels.distributed import check_gpus
    from versa_kernels.gptoss.config import GptOssConfig

    check_params(params)
    if dist is None:
        check_gpus(gpus)
    keepfrac_task = isinstance(keep_frac, list | tuple)
    fracs = (
        [float(k) for k in keep_frac] if isinstance(keep_frac, list | tuple) else [float(keep_frac)]
    )
    base = Path(model_path)
    config = GptOssConfig.from_dir(base)
    if not config.is_uniform:
        raise ParameterError(
            f"model_path={model_path!r} is already per-layer pruned "
            f"({list(config.experts_per_layer)}); prune a checkpoint with one expert count",
        )
    L, E = config.num_hidden_layers, config.num_local_experts
    art = Path(
        artifacts_dir or Path("artifacts") / (KEEPFRAC_SUBDIR if keepfrac_task else BUDGETED_SUBDIR)
    )
    variants = plan_variants(config, fracs, keepfrac_task, art, base, params)
    snapshot = load_reap_scores(from_scores) if from_scores else None  # checked before hashing
    weights = weights_fingerprint(base, cache_path=art / WEIGHTS_SHA256_CACHE)
    if expect_weights_sha256 and weights.digest != expect_weights_sha256:
        raise ParameterError(
            f"model_path={model_path!r}: weights sha256 {weights.digest} differs from "
            f"expect_weights_sha256={expect_weights_sha256}",
            hint="Point model_path at the base model the recipe was built from.",
        )
    if snapshot is not None:
        source = source_from_scores(
            snapshot, params=params, num_layers=L, num_experts=E, weights_digest=weights.digest
        )
    else:
        profiled = _profile_source(params, base, config, art, weights.digest, on_batch, dist)
        if not isinstance(profiled, ScoreSource):
            return profiled  # a rank's work ends here; the notebook's process writes the outputs
        source = profiled
    cut_variants(
        source, variants, base, params=params, keepfrac_task=keepfrac_task,
        code=code_version(), weights=weights.record(),
    )  # fmt: skip
    manifest_path, report_path, plots = write_build_outputs(
        art, Path(reports_dir), variants, meta=source.meta, sample=source.sample, params=params,
        scores_yaml=source.scores_yaml, table=source.table, cut_from=source.cut_from,
    )  # fmt: skip
    return BuildResult(
        art, manifest_path, report_path, plots, variants, source.meta, source.sample,
        source.table or [],
    )  # fmt: skip


def _profile_source(
    params: dict[str, Any], base: Path, config: Any, art: Path, weights_digest: str,
    on_batch: Any, dist: Any,
) -> ScoreSource | dict[str, Any]:  # fmt: skip
    """Sample, tokenize and profile; a rank (``dist``) returns its profile meta instead."""
    import torch

    from versa_kernels.distributed import launch, rank_state_path
    from versa_kernels.eaftreap.calibration import held_out_baselines, load_calibration
    from versa_kernels.eaftreap.profile import profile_experts
    from versa_kernels.eaftreap.reap_scores import reap_scores_doc
    from versa_kernels.eaftreap.recut import profiling_block
    from versa_kernels.gptoss.model import GptOssModel

    p = params
    L, E, K = config.num_hidden_layers, config.num_local_experts, config.num_experts_per_tok
    calib = load_calibration(p, base)  # CPU: packs, rows (checked), tokenized examples
    sample_record, examples = calib.record, calib.examples

    # ---- profile (GPU) ----------------------------------------------------------------------
    device, gpus, batch_size = p["device"], p["gpus"], p["batch_size"]
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    dtype = torch.bfloat16 if dev.startswith("cuda") else torch.float32
    # A rank runs on its own GPU but in the dtype the notebook's process chose: the dtype is
    # part of the profile fingerprint, so the re-cut below finds the ranks' finished state.
    dev = dist.device if dist is not None else dev
    started = time.monotonic()
    loaded: list[Any] = []

    def load_model() -> Any:
        if not loaded:
            loaded.append(GptOssModel.from_checkpoint(base, dtype=dtype, device=dev))
        return loaded[0]

    dist_meta = launch("build_pruned", params, gpus) if gpus > 1 and dist is None else None

    def no_model() -> Any:  # after the ranks profiled, this process must only re-cut
        raise KernelError(
            f"the {gpus} ranks finished but their profile state {art / PROFILE_STATE} does not "
            "match this build's inputs",
            hint="Re-run the build; if it repeats, report it with the run log.",
        )

    pad_id = config.pad_token_id if isinstance(config.pad_token_id, int) else 0
    eaft = EaftWeights(
        p["eaft_weight_good"], p["eaft_weight_cc"], p["eaft_weight_uncertain"],
        p["eaft_cc_quantile"],
    )  # fmt: skip
    # The resume key covers the weights' sha256 (issue 14): a changed router bias under the
    # same path must not resume the stale profile.
    prof = profile_experts(
        None, examples, model_loader=load_model if dist_meta is None else no_model, num_layers=L, num_experts=E, batch_size=batch_size, pad_id=pad_id,
        weights=eaft, state_path=rank_state_path(art / PROFILE_STATE, dist),
        save_every_s=p["save_every_s"], save_every_batches=p["save_every_batches"],
        fingerprint_extra={"weights_sha256": weights_digest, "dtype": str(dtype)},
        on_batch=on_batch, dist=dist, single_state_path=art / PROFILE_STATE,
    )  # fmt: skip
    if dist is not None:
        return {**prof.meta(), "world_size": dist.world_size, "backend": dist.backend}
    if not (prof.acc.count.sum(axis=1) > 0).all():
        raise RuntimeError("profiling routed no tokens through some layer: scores would be empty")
    num_batches = -(-len(examples) // batch_size)
    # No forward in this build when the saved profile was already finished: say so, instead
    # of a "0.0 tok/s" throughput line.
    finished_before = dist_meta is None and prof.resumed_from_batch >= 2 * num_batches
    cut_from = (
        {"kind": "profile_state", "path": str((art / PROFILE_STATE).resolve())}
        if finished_before
        else None
    )
    meta = {
        **prof.meta(),
        "model_path": str(base), "base_weights_sha256": weights_digest, "num_layers": L,
        "num_experts": E, "top_k": K, "entropy_top_k": 20, "cc_quantile": p["eaft_cc_quantile"],
        "uncertain_quantile": 1.0 - p["eaft_cc_quantile"], "w_good": p["eaft_weight_good"],
        "w_uncertain": p["eaft_weight_uncertain"], "w_conflict": p["eaft_weight_cc"],
        "max_seq_length": p["max_seq_length"], "batch_size": batch_size,
        "max_tokens_per_row": p["max_tokens_per_row"], "dtype": str(dtype), "device": dev,
        "profile_s": time.monotonic() - started, "cut_from": cut_from,
    }  # fmt: skip
    if dist_meta is not None:  # throughput and resume point of the ranks, not of the re-cut
        meta.update({k: dist_meta[k] for k in ("tokens_per_s", "resumed_from_batch")})
        meta["distributed"] = {k: dist_meta[k] for k in ("world_size", "backend")}
    score_key = p["score_key"]
    tau = split_half_tau(prof.halves, score_key)
    meta["rank_stability"] = {
        "method": "split-half Kendall tau (even vs odd calibration rows)",
        "score_key": score_key,
        "tau_by_layer": tau,
        "tau_mean": float(np.mean(tau)),
    }
    from versa_kernels.eaftreap.outputs import PROFILE_META_JSON, SCORES_PARQUET, yaml_text

    profiling = profiling_block(p)
    doc = reap_scores_doc(
        score_key=score_key, acc=prof.acc, experts_per_layer=[E] * L, profile_meta=meta,
        sample=sample_record, profiling=profiling,
        inputs={"saliency_parquet": SCORES_PARQUET, "profile_meta_json": PROFILE_META_JSON},
    )  # fmt: skip

    def evaluate(v: Variant) -> dict[str, Any]:
        return held_out_baselines(load_model(), calib, v, prof.acc.count, p)

    return ScoreSource(
        scores=prof.acc.score(score_key),
        count=prof.acc.count,
        pos_gate_norm_sum=prof.acc.pos_gate_norm_sum,
        table=prof.acc.table([E] * L),
        meta=meta,
        sample=sample_record,
        profiling=profiling,
        scores_yaml=yaml_text(doc),
        cut_from=cut_from,
        evaluate=evaluate if p["baseline_eval_rows"] > 0 else None,
    )
