"""``build_pruned``: the whole EAFT-REAP build the ``build_pruned`` notebook runs.

Order matters: every parameter and every allocation constraint is checked against the base
config, and the output directory is checked, *before* the packs are read or the model is loaded
(a bad flag costs seconds, not a GPU hour). Then: sample packs -> tokenize with completion masks
-> profile (resumable) -> save scores -> allocate per variant -> rewrite -> manifest, YAMLs, plots,
report. With ``keep_frac`` a list (the keepfrac task) one profile serves every variant.

Parameter names are the task flags in snake_case (``versa_runner.tasks``); ``run_id`` is
accepted because papermill injects it.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from versa_kernels.eaftreap import outputs
from versa_kernels.eaftreap.allocation import (
    AllocationPlan,
    budget_keep_counts,
    check_feasible,
    core_experts,
    select_experts,
)
from versa_kernels.eaftreap.manifest import write_build_outputs
from versa_kernels.eaftreap.rewrite import check_output_dir
from versa_kernels.eaftreap.scoring import SCORE_KEYS, EaftWeights, split_half_tau
from versa_kernels.errors import KernelError, ParameterError

log = logging.getLogger(__name__)

BUDGETED_SUBDIR = "20b_pruned_models_eaftreap_budgeted"
KEEPFRAC_SUBDIR = "20b_pruned_models_eaftreap_keepfrac"
PROFILE_STATE = "profile_state.pt"
BASELINE_RANDOM_SEEDS = 5

__all__ = ["BuildResult", "Variant", "build_pruned"]


@dataclass
class Variant:
    """One pruned checkpoint of the build."""

    name: str
    keep_frac: float
    plan: AllocationPlan
    out_dir: Path
    keep_counts: list[int] = field(default_factory=list)
    cores: list[list[int]] = field(default_factory=list)
    kept: list[list[int]] = field(default_factory=list)
    neff: list[float] = field(default_factory=list)
    mass_share_kept: list[float] = field(default_factory=list)
    stored_experts: int = 0
    baselines: dict[str, Any] | None = None


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


def _variant_name(kf: float, plan: AllocationPlan, keepfrac_task: bool) -> str:
    if keepfrac_task:
        from versa_kernels.eaftreap.allocation import uniform_keep_n

        n, e = uniform_keep_n(kf, plan.num_experts, plan.keep_n_multiple_of), plan.num_experts
        return f"calib_union_keep{n}of{e}_k{round(100 * n / e)}_eaftreap"
    layout = "perlayer" if plan.layout == "per-layer" else "uniform"
    return (
        f"calib_budget_keepfrac{kf:.2f}_eaftreap_corep{plan.core_pos_top_m}"
        f"c{plan.core_count_top_m}_{layout}"
    )


def _checked_params(p: dict[str, Any]) -> None:
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
    if not 0.0 < float(p["eaft_cc_quantile"]) <= 0.5:
        raise ParameterError(f"eaft_cc_quantile={p['eaft_cc_quantile']} must be in (0, 0.5]")
    if not p["calib_pack_files"]:
        raise ParameterError("calib_pack_files is empty", hint="Pass at least one parquet file.")


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
    from versa_kernels.errors import DataError
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


def _model_fingerprint(model_path: Path) -> str:
    digest = hashlib.sha256(str(model_path.resolve()).encode())
    for name in ("config.json", "model.safetensors.index.json"):
        if (model_path / name).is_file():
            digest.update((model_path / name).read_bytes())
    return digest.hexdigest()


def build_pruned(
    *,
    model_path: str,
    calib_pack_files: list[str] | str,
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
    """Profile, allocate, rewrite and report (module docstring); returns what was written.

    ``gpus > 1``: profiling runs on that many ranks under torchrun (``versa_kernels.
    distributed``); rank 0 leaves a finished profile state, and this call re-cuts from it.
    ``dist`` is set only inside such a rank: it profiles its share and returns the profile
    meta (a dict) without writing outputs.
    """
    params = {k: v for k, v in locals().items() if k not in ("on_batch", "dist")}
    import torch

    from versa_kernels.distributed import check_gpus, launch, rank_state_path
    from versa_kernels.gptoss.config import GptOssConfig

    _checked_params(params)
    if dist is None:
        check_gpus(gpus)
    keepfrac_task = isinstance(keep_frac, list | tuple)
    fracs = [float(k) for k in (keep_frac if keepfrac_task else [keep_frac])]
    base = Path(model_path)
    config = GptOssConfig.from_dir(base)
    if not config.is_uniform:
        raise ParameterError(
            f"model_path={model_path!r} is already per-layer pruned "
            f"({list(config.experts_per_layer)}); prune a checkpoint with one expert count",
        )
    L, E, K = config.num_hidden_layers, config.num_local_experts, config.num_experts_per_tok
    art = Path(
        artifacts_dir or Path("artifacts") / (KEEPFRAC_SUBDIR if keepfrac_task else BUDGETED_SUBDIR)
    )
    variants: list[Variant] = []
    for kf in fracs:
        plan = check_feasible(
            num_layers=L, num_experts=E, top_k=K, keep_frac=kf, layout=layout,
            min_keep=min_keep_per_layer, max_keep=max_keep_per_layer,
            core_pos_top_m=core_pos_top_m, core_count_top_m=core_count_top_m,
            keep_n_multiple_of=keep_n_multiple_of,
        )  # fmt: skip
        name = _variant_name(kf, plan, keepfrac_task)
        dest = Path(out_dir) / name if out_dir and len(fracs) > 1 else Path(out_dir or art / name)
        dest = dest.resolve()  # the manifest's out_dir is pasted into other runs: absolute
        check_output_dir(base, dest, overwrite=overwrite)
        variants.append(Variant(name, kf, plan, dest))
    weights_csv = calib_pack_weights_csv
    if isinstance(weights_csv, list | tuple):
        weights_csv = ",".join(str(w) for w in weights_csv)

    # ---- data (CPU) -------------------------------------------------------------------------
    from transformers import AutoTokenizer

    from versa_kernels.eaftreap.profile import prepare_examples, profile_experts
    from versa_kernels.packs import load_packs, parse_weights_csv

    pack_names = _csv_list(calib_pack_files)
    pack_paths, pack_sources = _resolve_pack_files(calib_packs_repo, pack_names)
    sample = load_packs(
        pack_paths, num_rows=num_rows, seed=seed, strategy=calib_pack_sample_strategy,
        weights=parse_weights_csv(weights_csv, len(pack_paths)),
    )  # fmt: skip
    sample_record = {**sample.record(), "dataset_repo": calib_packs_repo, "sources": pack_sources}
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    examples = prepare_examples(
        [r.text for r in sample.rows], tokenizer, max_seq_length=max_seq_length,
        max_tokens_per_row=max_tokens_per_row,
    )  # fmt: skip

    # ---- profile (GPU) ----------------------------------------------------------------------
    from versa_kernels.gptoss.model import GptOssModel

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
    eaft = EaftWeights(eaft_weight_good, eaft_weight_cc, eaft_weight_uncertain, eaft_cc_quantile)
    prof = profile_experts(
        None, examples, model_loader=load_model if dist_meta is None else no_model, num_layers=L, num_experts=E, batch_size=batch_size, pad_id=pad_id,
        weights=eaft, state_path=rank_state_path(art / PROFILE_STATE, dist),
        save_every_s=save_every_s, save_every_batches=save_every_batches,
        fingerprint_extra={"model": _model_fingerprint(base), "dtype": str(dtype)},
        on_batch=on_batch, dist=dist, single_state_path=art / PROFILE_STATE,
    )  # fmt: skip
    if dist is not None:  # a rank's work ends here; the notebook's process writes the outputs
        return {**prof.meta(), "world_size": dist.world_size, "backend": dist.backend}
    if not (prof.acc.count.sum(axis=1) > 0).all():
        raise RuntimeError("profiling routed no tokens through some layer: scores would be empty")
    meta = {
        **prof.meta(),
        "model_path": str(base), "num_layers": L, "num_experts": E, "top_k": K,
        "entropy_top_k": 20, "cc_quantile": eaft_cc_quantile,
        "uncertain_quantile": 1.0 - eaft_cc_quantile, "w_good": eaft_weight_good,
        "w_uncertain": eaft_weight_uncertain, "w_conflict": eaft_weight_cc,
        "max_seq_length": max_seq_length, "batch_size": batch_size,
        "max_tokens_per_row": max_tokens_per_row, "dtype": str(dtype), "device": dev,
        "profile_s": time.monotonic() - started,
    }  # fmt: skip
    if dist_meta is not None:  # throughput and resume point of the ranks, not of the re-cut
        meta.update({k: dist_meta[k] for k in ("tokens_per_s", "resumed_from_batch")})
        meta["distributed"] = {k: dist_meta[k] for k in ("world_size", "backend")}
    tau = split_half_tau(prof.halves, score_key)
    meta["rank_stability"] = {
        "method": "split-half Kendall tau (even vs odd calibration rows)",
        "score_key": score_key,
        "tau_by_layer": tau,
        "tau_mean": float(np.mean(tau)),
    }
    per_layer = [E] * L
    table = prof.acc.table(per_layer)
    scores = prof.acc.score(score_key)
    outputs.write_scores_parquet(art / outputs.SCORES_PARQUET, table)
    outputs.write_json(art / outputs.PROFILE_META_JSON, {"schema_version": 1, **meta})
    outputs.write_reap_scores(
        art / outputs.REAP_SCORES_YAML, score_key=score_key, scores=scores, table=table,
        experts_per_layer=per_layer, profile_meta=meta, sample=sample_record,
        inputs={"saliency_parquet": outputs.SCORES_PARQUET, "profile_meta_json": outputs.PROFILE_META_JSON},
    )  # fmt: skip

    # ---- allocate and rewrite (CPU) ---------------------------------------------------------
    from versa_kernels.eaftreap.rewrite import rewrite_checkpoint

    mass = np.clip(scores, 0.0, None)  # [L, E]; negative totals carry no keep-worthy mass
    for v in variants:
        v.keep_counts, v.neff = budget_keep_counts(mass, v.plan)
        v.cores = core_experts(
            prof.acc.pos_gate_norm_sum, prof.acc.count,
            pos_top_m=core_pos_top_m, count_top_m=core_count_top_m,
        )  # fmt: skip
        v.kept = select_experts(scores, v.keep_counts, v.cores)
        total = np.maximum(mass.sum(axis=1), 1e-30)
        v.mass_share_kept = [float(mass[i, ids].sum() / total[i]) for i, ids in enumerate(v.kept)]
        result = rewrite_checkpoint(
            base, v.out_dir, v.kept, layout=v.plan.layout,
            pad_multiple_of=keep_n_multiple_of, overwrite=overwrite,
        )  # fmt: skip
        v.stored_experts = result.stored_experts
        if baseline_eval_rows > 0:
            v.baselines = _baselines(
                load_model(), tokenizer, sample, pack_paths, v, prof.acc.count, params
            )

    loaded.clear()  # free the model before writing outputs
    manifest_path, report_path, plots = write_build_outputs(
        art, Path(reports_dir), variants, meta, sample_record, params
    )
    return BuildResult(art, manifest_path, report_path, plots, variants, meta, sample_record, table)


def _baselines(
    model: Any, tokenizer: Any, sample: Any, pack_paths: list[Path], v: Variant,
    count: np.ndarray, params: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    """Held-out completion PPL of this variant vs frequency and random pruning."""
    from versa_kernels.eaftreap.evaluate import compare_baselines
    from versa_kernels.eaftreap.profile import prepare_examples
    from versa_kernels.packs import load_packs

    held_out = load_packs(
        pack_paths, num_rows=int(params["baseline_eval_rows"]), seed=int(params["seed"]) + 1,
        strategy="concat", exclude={(r.source_file, r.row_i) for r in sample.rows},
    )  # fmt: skip
    examples = prepare_examples(
        [r.text for r in held_out.rows], tokenizer, max_seq_length=int(params["max_seq_length"])
    )
    result = compare_baselines(
        model, examples, kept=v.kept, count=count, experts_per_layer=[v.plan.num_experts] * len(v.kept),
        random_seeds=BASELINE_RANDOM_SEEDS, batch_size=int(params["batch_size"]),
    )  # fmt: skip
    return {**result, "eval_rows": len(held_out.rows), "eval_rows_sha256": held_out.rows_sha256}
