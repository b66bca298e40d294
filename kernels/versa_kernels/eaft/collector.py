"""The `eaft_single` collector: one model, fixed blocks, per-token EAFT signals, one JSON.

`collect(**params)` is what notebooks/eaft_single.ipynb calls. For each seq_len and each pack
(then UNION) it packs blocks (`blocks.pack_blocks`), runs the project's forward
(`GptOssModel`, batched), turns only the kept (completion) positions into logits, in chunks so
the vocabulary never materializes for a whole block, computes (p, H_norm, logp) with
`signals.token_signals`, and streams them into `stats.SignalStats`. The JSON keeps the field
names of eaftreap_spec §6.6 plus `schema_version`, the engine, versions, device and timing.
A lost session resumes: the streaming state is saved beside the JSON (`eaft.resume`).

Easy to get wrong:
- Logits at position t predict token t+1: hidden[:, :-1] pairs with targets input_ids[:, 1:]
  and keep[:, 1:].
- `top_k` is applied to the model (experts per token); an impossible value is an error, never
  recorded and ignored (spec §11.3 item 23).
- Base and candidate must be collected with identical settings and packs so `rows_sha256`
  matches; `versa_runner.summarize` refuses otherwise.
"""

from __future__ import annotations

import logging
import math
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from versa_kernels.distributed import DistContext
from versa_kernels.eaft.blocks import UNION_PACK, Blocks, TokenCache, pack_blocks, union_rows
from versa_kernels.eaft.inputs import (
    check_params,
    parse_int_csv,
    parse_str_csv,
    read_pack_texts,
    resolve_model_path,
    resolve_pack_files,
)
from versa_kernels.eaft.resume import CollectResume, OnBatch, collect_fingerprint, state_file
from versa_kernels.eaft.stats import HistogramSpec, SignalStats
from versa_kernels.errors import ParameterError
from versa_kernels.signals import CC_QUANTILE, ENTROPY_TOP_K, token_signals

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
ENGINE = "versa_kernels.gptoss"  # the project's own forward (no SGLang on the hot path)
DEFAULT_CHUNK_TOKENS = 1024  # logits rows per chunk: 1024 x 201088 fp32 = 0.8 GB per copy
DEFAULT_OUT_ROOT = "artifacts/eaft_models"
WEIGHTS_SHA256_CACHE = "weights_sha256_cache.json"
"""Under ``out_root``: the weights' sha256 by (size, mtime, inode), so a rerun hashes nothing."""

__all__ = ["collect", "collect_blocks", "json_name", "read_pack_texts", "run_blocks"]


def json_name(model_id: str) -> str:
    """File name of a model's JSON: `/` in the model id becomes `__` (DESIGN.md tasks table)."""
    return model_id.replace("/", "__") + ".json"


@torch.inference_mode()
def run_blocks(
    model: Any,
    blocks: Blocks,
    *,
    batch_size: int,
    entropy_top_k: int,
    stats: SignalStats,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    router_mask: Sequence[torch.Tensor | None] | None = None,
    dist: DistContext | None = None,
    start_batch: int = 0,
    after_batch: Callable[[int, float], None] | None = None,
) -> float:
    """Forward every block, feed kept-token signals into `stats`; returns the loop's wall seconds.

    A batch's signals stay on the device until the batch is done and reach `stats` in one
    transfer (one host sync per batch, not per logits chunk). With `dist` rank r runs batches
    r, r+N, ...; the signals of all ranks are then gathered and fed to `stats` in batch order,
    so thresholds, histograms, sums and the reservoir sample equal a single process's exactly.

    Resume: batches before ``start_batch`` are skipped (their signals are already in ``stats``);
    ``after_batch(batches_done, wall_s)`` is called after each batch (the collector saves there).
    """
    device = next(model.parameters()).device
    started = time.perf_counter()
    mine: dict[int, tuple[torch.Tensor, ...]] = {}
    for batch, first in enumerate(range(0, blocks.input_ids.shape[0], batch_size)):
        if batch < start_batch or (dist is not None and not dist.owns(batch)):
            continue
        ids = blocks.input_ids[first : first + batch_size].to(device)  # [B, S]
        keep = blocks.keep[first : first + batch_size, 1:].to(device)  # [B, S-1] targets kept
        hidden = model(ids, router_mask=router_mask).hidden[:, :-1]  # [B, S-1, D] predictors
        kept_hidden = hidden[keep]  # [N, D]
        targets = ids[:, 1:][keep]  # [N]
        parts = []
        for start, logits in model.iter_logit_chunks(kept_hidden[None], chunk_tokens):  # [c, V]
            parts.append(
                token_signals(
                    logits, targets[start : start + logits.shape[0]], entropy_top_k=entropy_top_k
                )
            )
        signals = tuple(
            torch.cat([q[i] for q in parts]) if parts else torch.zeros(0) for i in range(3)
        )
        if dist is None:
            stats.add(*signals)
        else:
            mine[batch] = tuple(t.cpu() for t in signals)
        if after_batch is not None:
            after_batch(batch + 1, time.perf_counter() - started)
    if dist is not None:
        for p, h, logp in dist.gather_in_order(mine):
            stats.add(p, h, logp)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def collect_blocks(
    model: Any,
    blocks: Blocks,
    *,
    batch_size: int = 1,
    entropy_top_k: int = ENTROPY_TOP_K,
    cc_quantile: float = CC_QUANTILE,
    sample_points: int = 0,
    spec: HistogramSpec | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    router_mask: Sequence[torch.Tensor | None] | None = None,
    dist: DistContext | None = None,
    resume: CollectResume | None = None,
    entry_key: tuple[str, int] = ("", 0),
) -> dict[str, Any]:
    """One (pack, seq) entry of the JSON: provenance of the blocks plus the `model` summary.

    With ``resume`` the entry ``entry_key`` = (pack, seq_len) continues from its saved partial
    state and saves its progress when due (`eaft.resume`).
    """
    stats = SignalStats(
        spec or HistogramSpec(), cc_quantile=cc_quantile, sample_points=sample_points
    )
    start, before_s = 0, 0.0
    after_batch = None
    if resume is not None:
        start, before_s = resume.begin(*entry_key, blocks.rows_sha256, stats)
        total = blocks.input_ids.shape[0]

        def after_batch(done: int, wall_s: float) -> None:
            resume.after_batch(done, batch_size, total, stats, before_s + wall_s)

    wall_s = before_s + run_blocks(
        model,
        blocks,
        batch_size=batch_size,
        entropy_top_k=entropy_top_k,
        stats=stats,
        chunk_tokens=chunk_tokens,
        router_mask=router_mask,
        dist=dist,
        start_batch=start,
        after_batch=after_batch,
    )
    return {
        "rows_seen": blocks.rows_seen,
        "rows_sha256": blocks.rows_sha256,
        "pack_wall_s": wall_s,
        "model": stats.summary(predicted_tokens=blocks.predicted_tokens, wall_s=wall_s),
    }


def _environment(device: torch.device) -> dict[str, Any]:
    import transformers

    import versa_kernels

    env: dict[str, Any] = {
        "engine": ENGINE,
        "engine_version": versa_kernels.__version__,
        "torch": torch.__version__,
        "transformers_version": transformers.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "gpu_type": None,
        "gpu_name": None,
        "gpu_sm": None,
    }
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        env.update(
            gpu_type="cuda", gpu_name=torch.cuda.get_device_name(device), gpu_sm=f"{major}{minor}"
        )
    return env


def collect(
    *,
    model_id: str,
    model_path: str,
    calib_pack_files: str | Sequence[str],
    seq_lens_csv: str | Sequence[int] = "1024,2048",
    num_blocks: int = 256,
    batch_size: int = 1,
    sample_points: int = 200_000,
    top_k: int = 4,
    entropy_top_k: int = ENTROPY_TOP_K,
    run_id: str = "",
    calib_packs_repo: str = "",
    cc_quantile: float = CC_QUANTILE,
    prob_scale: str = "linear",
    hist_xbins: int = 160,
    hist_ybins: int = 120,
    out_root: str | Path = DEFAULT_OUT_ROOT,
    device: str | None = None,
    dtype: str | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    experts_keep: Sequence[Sequence[int]] | None = None,
    gpus: int = 1,
    save_every_s: float = 300.0,
    save_every_blocks: int = 0,
    on_batch: OnBatch | None = None,
    dist: DistContext | None = None,
    block_offset: int = 0,
) -> Path:
    """Collect EAFT statistics of one model; returns the JSON path (see module docstring).

    `gpus > 1` runs the collection on that many torchrun ranks (versa_kernels.distributed) and
    returns the path rank 0 wrote; `dist` is set only inside such a rank. Every rank returns
    that same path (rank 0 writes it).

    Resumable (`eaft.resume`): the state is saved under the JSON's folder every `save_every_s`
    seconds or `save_every_blocks` blocks (0 = by time only) and after each (pack, seq) entry;
    a rerun with the same `run_id` and inputs continues from it. `on_batch(pack, seq_len,
    blocks_done, total_blocks)` is called after each batch (progress; a single process only).
    """
    params = {
        k: str(v) if isinstance(v, Path) else v
        for k, v in locals().items()
        if k not in ("dist", "on_batch")
    }
    seq_lens = parse_int_csv(seq_lens_csv, "seq_lens_csv")
    files = parse_str_csv(calib_pack_files)
    check_params(
        model_id=model_id, seq_lens=seq_lens, num_blocks=num_blocks, batch_size=batch_size,
        sample_points=sample_points, top_k=top_k, entropy_top_k=entropy_top_k,
        cc_quantile=cc_quantile, prob_scale=prob_scale, chunk_tokens=chunk_tokens,
    )  # fmt: skip
    if not files:
        raise ParameterError("calib_pack_files is empty; expected one or more parquet files")
    if not (isinstance(save_every_s, int | float) and 0 <= save_every_s < math.inf):
        raise ParameterError(
            f"save_every_s={save_every_s!r} is not allowed; expected a number >= 0"
        )
    if not (isinstance(save_every_blocks, int) and save_every_blocks >= 0):
        raise ParameterError(
            f"save_every_blocks={save_every_blocks!r} is not allowed; expected an integer >= 0"
        )
    if dist is None:
        from versa_kernels.distributed import check_gpus, launch

        check_gpus(gpus)
    model_path = resolve_model_path(model_id, model_path)
    if dist is None and gpus > 1:  # resolved (downloaded) once, here, not by every rank
        # One run id for every rank, so all of them name the file rank 0 writes.
        rid = run_id or time.strftime("%Y%m%d_%H%M%S")
        return Path(
            launch("eaft_single", {**params, "model_path": model_path, "run_id": rid}, gpus)
        )
    from transformers import AutoTokenizer

    from versa_kernels.distributed import rank_state_path
    from versa_kernels.eaftreap.fingerprint import weights_fingerprint
    from versa_kernels.gptoss.model import GptOssModel

    out = Path(out_root) / (run_id or time.strftime("%Y%m%d_%H%M%S")) / json_name(model_id)

    started = time.perf_counter()
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch_dtype = getattr(torch, dtype or ("bfloat16" if dev.type == "cuda" else "float32"))
    dev = torch.device(dist.device) if dist is not None else dev  # a rank's own GPU, same dtype
    packs = {Path(f).stem: read_pack_texts(f) for f in resolve_pack_files(calib_packs_repo, files)}
    packs[UNION_PACK] = list(union_rows(packs))
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = GptOssModel.from_checkpoint(
        model_path, dtype=torch_dtype, device=dev, top_k=top_k, experts_keep=experts_keep
    )  # raises ParameterError when top_k exceeds the experts of a layer
    eos = (
        tokenizer.eos_token_id if tokenizer.eos_token_id is not None else model.config.eos_token_id
    )
    eos_id = int(eos[0] if isinstance(eos, (list, tuple)) else eos)
    load_s = time.perf_counter() - started
    spec = HistogramSpec(xbins=hist_xbins, ybins=hist_ybins, prob_scale=prob_scale)
    tokens = TokenCache(tokenizer)
    # The resume key covers the weights' sha256 (cached by size, mtime and inode), the pack
    # rows and every setting that changes the statistics.
    weights = weights_fingerprint(model_path, cache_path=Path(out_root) / WEIGHTS_SHA256_CACHE)
    settings = {
        k: params[k]
        for k in (
            "model_id", "num_blocks", "batch_size", "sample_points", "top_k", "entropy_top_k",
            "cc_quantile", "prob_scale", "hist_xbins", "hist_ybins", "chunk_tokens",
            "experts_keep",
        )
    }  # fmt: skip
    settings.update(seq_lens=seq_lens, dtype=str(torch_dtype), device_type=dev.type,
                    block_offset=block_offset)  # fmt: skip
    resume = CollectResume.open(
        rank_state_path(state_file(out.parent, model_id), dist),
        collect_fingerprint(weights_sha256=weights.digest, packs=packs, settings=settings),
        dist=dist, save_every_s=save_every_s, save_every_blocks=save_every_blocks,
        on_batch=on_batch,
    )  # fmt: skip
    results: dict[str, dict[str, Any]] = {name: {} for name in packs}
    for seq_len in seq_lens:
        for name, rows in packs.items():
            entry = resume.entry(name, seq_len)
            if entry is None:
                blocks = pack_blocks(
                    rows,
                    tokens,
                    seq_len=seq_len,
                    num_blocks=num_blocks,
                    eos_id=eos_id,
                    pack=name,
                    block_offset=block_offset,
                )
                entry = collect_blocks(
                    model, blocks, batch_size=batch_size, entropy_top_k=entropy_top_k,
                    cc_quantile=cc_quantile, sample_points=sample_points, spec=spec,
                    chunk_tokens=chunk_tokens, dist=dist, resume=resume, entry_key=(name, seq_len),
                )  # fmt: skip
                resume.finish(name, seq_len, entry)
            results[name][str(seq_len)] = entry
            m = entry["model"]
            if m["kept_tokens"] == 0:
                log.warning(
                    "pack=%s seq=%d: no completion tokens in %d blocks; its statistics are empty "
                    "and a pair summary will refuse this row (raise num_blocks)",
                    name, seq_len, num_blocks,
                )  # fmt: skip
            log.info(
                "pack=%s seq=%d: %d kept tokens, PPL %.3f, cc %.4f%%, %.0f tok/s",
                name, seq_len, m["kept_tokens"], m["ppl"], 100 * m["cc_rate"], m["tok_s_pred"],
            )  # fmt: skip
    meta = {
        "dataset_repo": calib_packs_repo,
        "pack_files": [str(f) for f in files],
        "model_id": model_id,
        "model_path": str(model_path),
        **_environment(dev),
        "dtype": str(torch_dtype).removeprefix("torch."),
        "top_k": model.top_k,
        "top_k_applied": True,
        "experts_per_layer": list(model.experts_per_layer),
        "entropy_topk": entropy_top_k,
        "cc_quantile": cc_quantile,
        "num_blocks": num_blocks,
        "block_offset": block_offset,
        "batch_size": batch_size,
        "hist_xbins": hist_xbins,
        "hist_ybins": hist_ybins,
        "prob_scale": prob_scale,
        "logp_min": spec.logp_min,
        "logp_max": spec.logp_max,
        "sample_points": sample_points,
        "seq_lens": seq_lens,
        "axes": {"x": spec.x_label, "y": f"H_top{entropy_top_k}/ln({entropy_top_k})"},
        "x_min": spec.x_range[0],
        "x_max": spec.x_range[1],
        "run_id": run_id,
        "timing": {"load_s": load_s, "total_s": time.perf_counter() - started},
    }
    doc = {
        "schema_version": SCHEMA_VERSION,
        "meta": meta,
        "packs": [{"pack": name, "seq": seqs} for name, seqs in results.items()],
    }
    if dist is None or dist.is_main:  # one writer; every rank reports the same path
        _write_json(out, doc)
    if dist is not None:
        dist.barrier()  # the JSON is complete before any rank drops its state
    resume.remove()
    return out


def _strict(value: Any) -> Any:
    """NaN/inf (empty statistics) become null so the file is strict JSON for any reader."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_strict(v) for v in value]
    return value


def _write_json(path: Path, doc: Mapping[str, Any]) -> None:
    """Atomic write (temp + rename): a reader never sees half a JSON; NaN is written as null."""
    import json

    from versa_kernels.fsio import atomic_write_text

    atomic_write_text(path, json.dumps(_strict(dict(doc)), allow_nan=False))
