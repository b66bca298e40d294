"""Decode throughput per batch size: SGLang or vLLM when installed, else the native engine.

Why this harness and not the earlier one (eaftreap_spec §8, §11 item 24): the prompt is a fixed
number of *tokens* (not characters), every batch size gets a warm-up pass and several timed
repeats, and the figure reported is the median. Each request generates exactly
`max_new_tokens` (EOS ignored), so batch sizes are comparable.

Units: seconds and tokens per second. `tok_s_total` = generated tokens of the whole batch per
second of wall time (prefill included, the usual serving figure); for the native engine, where
prefill and decode are timed apart, `decode_tok_s` = tokens from decode steps only per second
of decode time. Pruning cannot change batch-1 decode much (the same 4 experts are active per
token); gains, if any, appear at larger batches (gptoss_reference §4.4).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from versa_kernels.errors import ParameterError
from versa_kernels.fsio import atomic_write_text

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
ENGINES = ("auto", "sglang", "vllm", "native")
PROMPT_SEED_TEXT = (
    "You are a helpful assistant. Explain, step by step, how a mixture-of-experts layer routes "
    "each token to a few experts and combines their outputs. "
)

__all__ = ["BatchResult", "ENGINES", "pick_engine", "prompt_token_ids", "run_decode_bench"]


@dataclass
class BatchResult:
    """Timings for one batch size (medians over the timed repeats)."""

    batch_size: int
    prompt_tokens: int
    new_tokens: int
    repeats: int
    wall_s: float
    output_tokens: int
    tok_s_total: float
    tok_s_per_stream: float
    prefill_s: float | None = None
    decode_tok_s: float | None = None


def pick_engine(engine: str) -> str:
    """Resolve `auto` to the fastest installed engine; refuse unknown or missing ones."""
    if engine not in ENGINES:
        raise ParameterError(f"engine must be one of {list(ENGINES)}, got {engine!r}")
    installed = {name: importlib.util.find_spec(name) is not None for name in ("sglang", "vllm")}
    if engine == "auto":
        return next((name for name in ("sglang", "vllm") if installed[name]), "native")
    if engine in installed and not installed[engine]:
        raise ParameterError(
            f"engine={engine!r} is not installed on this target",
            hint="Install it in the bootstrap, or pass --engine native.",
        )
    return engine


def prompt_token_ids(model_path: str | Path, prompt_len: int, vocab_size: int) -> list[int]:
    """Exactly `prompt_len` token ids of ordinary English (the checkpoint's tokenizer if any)."""
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(model_path))
        ids: list[int] = []
        while len(ids) < prompt_len:
            ids += tokenizer.encode(PROMPT_SEED_TEXT, add_special_tokens=False)
        return ids[:prompt_len]
    except (OSError, ValueError) as exc:  # no tokenizer files: fall back to fixed ids
        log.warning("no tokenizer in %s (%s); using fixed token ids", model_path, exc)
        return [(7919 * i) % vocab_size for i in range(1, prompt_len + 1)]


def _time_native(model: Any, ids: list[int], batch: int, new_tokens: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds) of one greedy run of `batch` copies of the prompt."""
    import torch

    from versa_kernels.decode import decode_step, prefill

    device = next(model.parameters()).device
    input_ids = torch.tensor([ids] * batch, device=device)  # [B, T]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        sync()
        start = time.perf_counter()
        logits, cache = prefill(model, input_ids)
        token = logits.argmax(dim=-1)
        sync()
        prefilled = time.perf_counter()
        for _ in range(new_tokens - 1):
            token = decode_step(model, token, cache).argmax(dim=-1)
        sync()
        return prefilled - start, time.perf_counter() - prefilled


def _bench_native(
    model_path: str, ids: list[int], batch_sizes: list[int], new_tokens: int, repeats: int,
    warmup: int, device: str, dtype: str,
) -> tuple[list[BatchResult], dict[str, Any]]:  # fmt: skip
    import torch

    from versa_kernels.gptoss.model import GptOssModel

    device = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[
        dtype if dtype != "auto" else ("bf16" if device == "cuda" else "fp32")
    ]
    model = GptOssModel.from_checkpoint(model_path, dtype=torch_dtype, device=device)
    results = []
    for batch in batch_sizes:
        for _ in range(warmup):
            _time_native(model, ids, batch, min(new_tokens, 8))
        runs = [_time_native(model, ids, batch, new_tokens) for _ in range(repeats)]
        prefill_s = statistics.median(r[0] for r in runs)
        decode_s = statistics.median(r[1] for r in runs)
        wall_s = statistics.median(r[0] + r[1] for r in runs)
        out = batch * new_tokens
        results.append(
            BatchResult(
                batch,
                len(ids),
                new_tokens,
                repeats,
                wall_s,
                out,
                out / wall_s,
                out / wall_s / batch,
                prefill_s,
                batch * (new_tokens - 1) / decode_s if new_tokens > 1 else None,
            )  # fmt: skip
        )
        log.info("batch %d: %.1f tok/s total", batch, out / wall_s)
    info = {"device": device, "dtype": str(torch_dtype).removeprefix("torch.")}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return results, info


def _bench_server_engine(
    engine: str, model_path: str, ids: list[int], batch_sizes: list[int], new_tokens: int,
    repeats: int, warmup: int,
) -> tuple[list[BatchResult], dict[str, Any]]:  # fmt: skip
    """SGLang's offline Engine or vLLM's LLM, greedy, EOS ignored, exactly new_tokens each."""
    if engine == "sglang":
        import sglang

        llm = sglang.Engine(model_path=model_path, dtype="bfloat16")
        params = {"temperature": 0.0, "max_new_tokens": new_tokens,
                  "min_new_tokens": new_tokens, "ignore_eos": True}  # fmt: skip

        def generate(batch: int) -> int:
            outs = llm.generate(input_ids=[ids] * batch, sampling_params=params)
            return sum(o["meta_info"]["completion_tokens"] for o in outs)
    else:
        from vllm import LLM, SamplingParams, TokensPrompt

        llm = LLM(model=model_path, dtype="bfloat16", max_num_seqs=max(batch_sizes))
        sampling = SamplingParams(
            temperature=0.0, max_tokens=new_tokens, min_tokens=new_tokens, ignore_eos=True
        )

        def generate(batch: int) -> int:
            prompts = [TokensPrompt(prompt_token_ids=ids) for _ in range(batch)]
            outs = llm.generate(prompts, sampling, use_tqdm=False)
            return sum(len(o.outputs[0].token_ids) for o in outs)

    results = []
    for batch in batch_sizes:
        for _ in range(warmup):
            generate(batch)
        walls, produced = [], 0
        for _ in range(repeats):
            start = time.perf_counter()
            produced = generate(batch)
            walls.append(time.perf_counter() - start)
        wall_s = statistics.median(walls)
        results.append(
            BatchResult(
                batch,
                len(ids),
                new_tokens,
                repeats,
                wall_s,
                produced,
                produced / wall_s,
                produced / wall_s / batch,
            )  # fmt: skip
        )
    return results, {"device": "cuda"}


def run_decode_bench(
    *,
    name: str,
    model_path: str,
    prompt_len: int = 256,
    max_new_tokens: int = 2048,
    batch_sizes: list[int] | tuple[int, ...] = (1, 2, 4, 8, 16, 32),
    engine: str = "auto",
    repeats: int = 3,
    warmup: int = 1,
    device: str = "auto",
    dtype: str = "auto",
    out_dir: str | Path = "artifacts/decode_bench",
    report_dir: str | Path = "reports",
) -> dict[str, Any]:
    """Benchmark decode throughput; write `<out_dir>/<name>.json` and a markdown report."""
    if not name or any(c in name for c in "/\\") or name.startswith("."):
        raise ParameterError(f"name must be a plain file name, got {name!r}")
    if prompt_len < 1 or max_new_tokens < 1 or repeats < 1 or warmup < 0:
        raise ParameterError("prompt_len, max_new_tokens and repeats must be >= 1, warmup >= 0")
    if not batch_sizes or min(batch_sizes) < 1:
        raise ParameterError(f"batch_sizes must be positive integers, got {list(batch_sizes)}")
    if not (Path(model_path) / "config.json").is_file():
        raise ParameterError(f"model_path has no config.json: {model_path}")
    chosen = pick_engine(engine)
    vocab = json.loads((Path(model_path) / "config.json").read_text())["vocab_size"]
    ids = prompt_token_ids(model_path, prompt_len, vocab)
    sizes = [int(b) for b in batch_sizes]
    start = time.time()
    if chosen == "native":
        results, info = _bench_native(
            model_path, ids, sizes, max_new_tokens, repeats, warmup, device, dtype
        )
    else:
        results, info = _bench_server_engine(
            chosen, model_path, ids, sizes, max_new_tokens, repeats, warmup
        )
    record = {
        "schema_version": SCHEMA_VERSION,
        "name": name,
        "model_path": str(model_path),
        "engine": chosen,
        "engine_requested": engine,
        "prompt_len_tokens": prompt_len,
        "max_new_tokens": max_new_tokens,
        "batch_sizes": sizes,
        "repeats": repeats,
        "warmup": warmup,
        "results": [asdict(r) for r in results],
        "versions": _versions(chosen),
        "host": platform.node(),
        "elapsed_s": time.time() - start,
        **info,
    }
    json_path = Path(out_dir) / f"{name}.json"
    atomic_write_text(json_path, json.dumps(record, indent=2) + "\n")
    report_path = Path(report_dir) / f"decode_bench_{name}.md"
    plot = _plot(record, Path(report_dir) / f"decode_bench_{name}.png")
    atomic_write_text(report_path, render_report(record, plot_name=plot))
    record["json_path"], record["report_path"] = str(json_path), str(report_path)
    return record


def render_report(record: dict[str, Any], *, plot_name: str | None = None) -> str:
    """Markdown table of one decode bench record."""
    lines = [
        f"# Decode bench: {record['name']}",
        "",
        f"- model: `{record['model_path']}`",
        f"- engine: {record['engine']} (requested {record['engine_requested']}), device "
        f"{record.get('gpu', record.get('device'))}, dtype {record.get('dtype', 'bfloat16')}",
        f"- prompt: {record['prompt_len_tokens']} tokens; {record['max_new_tokens']} new tokens "
        f"per request (EOS ignored); {record['warmup']} warm-up + median of "
        f"{record['repeats']} timed runs per batch size",
        f"- versions: {record['versions']}",
        "",
        "| batch | wall s | output tokens | tok/s total | tok/s per stream | decode-only tok/s |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in record["results"]:
        decode = f"{r['decode_tok_s']:.1f}" if r.get("decode_tok_s") else "-"
        lines.append(
            f"| {r['batch_size']} | {r['wall_s']:.3f} | {r['output_tokens']} | "
            f"{r['tok_s_total']:.1f} | {r['tok_s_per_stream']:.1f} | {decode} |"
        )
    if plot_name:
        lines += ["", f"![tokens per second by batch size]({plot_name})"]
    return "\n".join(lines) + "\n"


def _plot(record: dict[str, Any], path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    sizes = [r["batch_size"] for r in record["results"]]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(sizes, [r["tok_s_total"] for r in record["results"]], marker="o")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("generated tokens / s")
    ax.set_title(f"{record['name']} ({record['engine']})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _versions(engine: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("torch", "transformers", engine if engine != "native" else "versa-runner"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            continue
    return out
