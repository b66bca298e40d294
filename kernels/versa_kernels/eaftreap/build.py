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

import inspect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from versa_kernels.distributed import DistContext
from versa_kernels.eaftreap.allocation import AllocationPlan
from versa_kernels.eaftreap.checks import check_params, plan_variants
from versa_kernels.eaftreap.fingerprint import code_version, weights_fingerprint
from versa_kernels.eaftreap.manifest import write_build_outputs
from versa_kernels.eaftreap.reap_scores import load_reap_scores
from versa_kernels.eaftreap.recut import ScoreSource, cut_variants, source_from_scores
from versa_kernels.eaftreap.scoring import EaftWeights, split_half_tau
from versa_kernels.errors import KernelError, ParameterError

if TYPE_CHECKING:
    from versa_kernels.eaftreap.fingerprint import WeightsFingerprint
    from versa_kernels.eaftreap.profile import CalibExample, ProfileResult
    from versa_kernels.eaftreap.reap_scores import ScoresSnapshot
    from versa_kernels.gptoss.config import GptOssConfig

log = logging.getLogger(__name__)

BUDGETED_SUBDIR = "20b_pruned_models_eaftreap_budgeted"
KEEPFRAC_SUBDIR = "20b_pruned_models_eaftreap_keepfrac"
PROFILE_STATE = "profile_state.pt"
WEIGHTS_SHA256_CACHE = "weights_sha256_cache.json"

__all__ = ["BuildResult", "Variant", "build_pruned", "profile_rank"]

OnBatch = Callable[[int, int, int], None]
"""``on_batch(pass_no, batches_done, total_batches)``, called after each profiled batch."""


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
    on_batch: OnBatch | None = None,
) -> BuildResult:
    """Profile (or read ``from_scores``), cut, rewrite and report (module docstring).

    ``baseline_eval_rows`` > 0 adds held-out PPL of EAFT-REAP vs frequency vs random pruning
    (``baseline_random_seeds`` random prunes). ``expect_rows_sha256`` / ``expect_weights_sha256``
    (a recipe's) refuse other calibration rows or base weights before any forward.

    ``gpus > 1``: profiling runs on that many ranks under torchrun (``versa_kernels.
    distributed``, each rank runs ``profile_rank``); rank 0 leaves a finished profile state,
    and this call re-cuts from it.
    """
    params = {k: v for k, v in locals().items() if k != "on_batch"}
    from versa_kernels.distributed import check_gpus

    check_params(params)
    check_gpus(gpus)
    plan = _plan(params)
    if plan.snapshot is not None:
        source = source_from_scores(
            plan.snapshot, params=params, num_layers=plan.config.num_hidden_layers,
            num_experts=plan.config.num_local_experts, weights_digest=plan.weights.digest,
        )  # fmt: skip
    else:
        source = _profile_source(params, plan, on_batch)
    cut_variants(
        source, plan.variants, plan.base, params=params, keepfrac_task=plan.keepfrac_task,
        code=code_version(), weights=plan.weights.record(),
    )  # fmt: skip
    manifest_path, report_path, plots = write_build_outputs(
        plan.art, Path(reports_dir), plan.variants, meta=source.meta, sample=source.sample,
        params=params, scores_yaml=source.scores_yaml, table=source.table,
        cut_from=source.cut_from,
    )  # fmt: skip
    return BuildResult(
        plan.art, manifest_path, report_path, plots, plan.variants, source.meta, source.sample,
        source.table or [],
    )  # fmt: skip


def profile_rank(*, dist: DistContext, **params: Any) -> dict[str, Any]:
    """One torchrun rank of ``build_pruned(gpus=N)``: profile this rank's share, nothing else.

    ``params`` are ``build_pruned``'s (unnamed ones take its defaults). Every rank returns the
    reduced profile meta plus ``world_size`` and ``backend``; rank 0 also leaves the finished
    profile state in single-process form, which the notebook's ``build_pruned`` re-cuts from.
    No output file is written here.
    """
    defaults = {
        name: par.default
        for name, par in inspect.signature(build_pruned).parameters.items()
        if name != "on_batch"
    }
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise ParameterError(f"profile_rank got unknown parameters {unknown}")
    params = {**defaults, **params}
    check_params(params)
    plan = _plan(params)
    if plan.snapshot is not None:
        raise ParameterError("from_scores builds read no profile; run them with gpus=1")
    calib, dtype, _ = _calibration(params, plan)
    prof = _profile(
        params, plan, calib.examples, dtype, dev=dist.device, dist=dist, on_batch=None,
        model_loader=_model_loader(plan.base, dtype, dist.device),
    )  # fmt: skip
    return {**prof.meta(), "world_size": dist.world_size, "backend": dist.backend}


@dataclass(frozen=True)
class _Plan:
    """What every build checks and derives before any pack is read or model loaded."""

    keepfrac_task: bool
    base: Path
    config: GptOssConfig
    art: Path
    variants: list[Variant]
    snapshot: ScoresSnapshot | None
    """The ``from_scores`` document (then nothing is profiled)."""
    weights: WeightsFingerprint


def _plan(params: dict[str, Any]) -> _Plan:
    from versa_kernels.gptoss.config import GptOssConfig

    keep_frac, model_path = params["keep_frac"], params["model_path"]
    artifacts_dir, from_scores = params["artifacts_dir"], params["from_scores"]
    expect_weights_sha256 = params["expect_weights_sha256"]
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
    return _Plan(keepfrac_task, base, config, art, variants, snapshot, weights)


def _device_and_dtype(device: str) -> tuple[str, Any]:
    """The notebook process's device and dtype; a rank keeps the dtype (it is in the resume
    fingerprint, so the re-cut finds the ranks' finished state) but runs on its own GPU."""
    import torch

    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    return dev, torch.bfloat16 if dev.startswith("cuda") else torch.float32


def _calibration(params: dict[str, Any], plan: _Plan) -> tuple[Any, Any, str]:
    """Packs, rows and tokenized examples (CPU), plus the device and dtype to profile in."""
    from versa_kernels.eaftreap.calibration import load_calibration

    dev, dtype = _device_and_dtype(params["device"])
    return load_calibration(params, plan.base), dtype, dev


def _model_loader(base: Path, dtype: Any, dev: str) -> Callable[[], Any]:
    """Loads the model on first call only (a finished profile re-cuts without loading it)."""
    from versa_kernels.gptoss.model import GptOssModel

    loaded: list[Any] = []

    def load() -> Any:
        if not loaded:
            loaded.append(GptOssModel.from_checkpoint(base, dtype=dtype, device=dev))
        return loaded[0]

    return load


def _profile(
    p: dict[str, Any], plan: _Plan, examples: list[CalibExample], dtype: Any, *, dev: str,
    dist: DistContext | None, on_batch: OnBatch | None, model_loader: Callable[[], Any],
) -> ProfileResult:  # fmt: skip
    """``profile_experts`` with the build's settings; returns its ``ProfileResult``."""
    from versa_kernels.distributed import rank_state_path
    from versa_kernels.eaftreap.profile import profile_experts

    config, art = plan.config, plan.art
    pad_id = config.pad_token_id if isinstance(config.pad_token_id, int) else 0
    eaft = EaftWeights(
        p["eaft_weight_good"], p["eaft_weight_cc"], p["eaft_weight_uncertain"],
        p["eaft_cc_quantile"],
    )  # fmt: skip
    # The resume key covers the weights' sha256 (issue 14): a changed router bias under the
    # same path must not resume the stale profile.
    return profile_experts(
        None, examples, model_loader=model_loader, num_layers=config.num_hidden_layers,
        num_experts=config.num_local_experts, batch_size=p["batch_size"], pad_id=pad_id,
        weights=eaft, state_path=rank_state_path(art / PROFILE_STATE, dist),
        save_every_s=p["save_every_s"], save_every_batches=p["save_every_batches"],
        fingerprint_extra={"weights_sha256": plan.weights.digest, "dtype": str(dtype)},
        on_batch=on_batch, dist=dist, single_state_path=art / PROFILE_STATE,
    )  # fmt: skip


def _profile_source(params: dict[str, Any], plan: _Plan, on_batch: OnBatch | None) -> ScoreSource:
    """Sample, tokenize and profile (here, or on ``gpus`` ranks), then score."""
    from versa_kernels.distributed import launch
    from versa_kernels.eaftreap.calibration import held_out_baselines
    from versa_kernels.eaftreap.reap_scores import reap_scores_doc
    from versa_kernels.eaftreap.recut import profiling_block

    p, base, config, art = params, plan.base, plan.config, plan.art
    weights_digest = plan.weights.digest
    L, E, K = config.num_hidden_layers, config.num_local_experts, config.num_experts_per_tok
    calib, dtype, dev = _calibration(p, plan)
    sample_record, examples = calib.record, calib.examples
    gpus, batch_size = p["gpus"], p["batch_size"]
    started = time.monotonic()
    load_model = _model_loader(base, dtype, dev)
    dist_meta = launch("build_pruned", params, gpus) if gpus > 1 else None

    def no_model() -> Any:  # after the ranks profiled, this process must only re-cut
        raise KernelError(
            f"the {gpus} ranks finished but their profile state {art / PROFILE_STATE} does not "
            "match this build's inputs",
            hint="Re-run the build; if it repeats, report it with the run log.",
        )

    prof = _profile(
        p, plan, examples, dtype, dev=dev, dist=None, on_batch=on_batch,
        model_loader=load_model if dist_meta is None else no_model,
    )  # fmt: skip
    if not (prof.acc.count.sum(axis=1) > 0).all():
        raise RuntimeError("profiling routed no tokens through some layer: scores would be empty")
    # No forward in this build when the saved profile was already finished: say so, instead
    # of a "0.0 tok/s" throughput line.
    finished_before = dist_meta is None and prof.finished_before
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
