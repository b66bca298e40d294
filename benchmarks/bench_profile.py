"""EAFT evaluation and EAFT-REAP profiling speed and memory on gpt-oss-20b/120b shapes (issue 11).

What it does, in one run:

1. Writes a checkpoint with the real gpt-oss tensor shapes and the hub's MXFP4 layout, with
   random MXFP4 codes (fine for speed: every kernel does the same work whatever the codes),
   into memory-backed storage (`--dir`, default /dev/shm: the 120b is ~65 GB and the GPU box
   has a 64 GB disk). Tensors are drawn on the GPU and written one at a time.
2. Ours, through the code the tasks run: `GptOssModel.from_checkpoint` (load time from a warm
   page cache), `eaft.collector.run_blocks` (the `eaft_single` loop: forward, kept-token
   logits in chunks, p / H / logp, streaming statistics) and `eaftreap.profile.profile_experts`
   (the `build_pruned` profiler; tokens/s per calibration token with every pass counted).
   Peak GPU memory is the allocator's peak over load + both loops, with the process capped at
   `--mem-cap-gb` (torch.cuda.set_per_process_memory_fraction).
3. The baseline, measured in the same run: transformers' `GptOssForCausalLM` (eager attention,
   `Mxfp4Config(dequantize=True)`), forward with full logits, plus a REAP observer hooked on
   every MoE layer that recomputes routing and each routed expert's output norm (how REAP and
   the original EAFT-REAP profiler collect). Its load time, tokens/s and peak memory.
4. Prints one table with the ratios, and writes everything to `--json`.

`--torch-profile` adds a torch.profiler breakdown (top CUDA kernels) of one eaft forward and
one profiling batch at the longest sequence. `--onepass-diff` profiles with both methods on
the same rows and prints the largest relative difference of every accumulator.

Run (GPU):
    python benchmarks/bench_profile.py --shape 20b --seqs 2048,4096 --json out.json
    python benchmarks/bench_profile.py --shape 120b --seqs 4096 --no-baseline   # ~65 GB
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

SHAPES = {
    # layers, experts (gpt-oss-20b / -120b; everything else is shared)
    "20b": (24, 32),
    "120b": (36, 128),
    "tiny": (2, 8),  # a CPU smoke run of this script
}
SCALE_BYTE = 120  # 2^-7: random E2M1 codes then have std ~0.023 ~ 1/sqrt(2880)
LM_HEAD_GAIN = 6.0
KEEP_FROM = 0.25  # positions before this fraction of a block are "prompt" (not scored)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def make_config(shape: str) -> Any:
    from versa_kernels.fixtures.model import tiny_config

    layers, experts = SHAPES[shape]
    if shape == "tiny":
        return tiny_config(layers=layers, experts=experts, vocab=201088, tokenizer="o200k")
    return tiny_config(
        layers=layers, experts=experts, top_k=4, hidden=2880, intermediate=2880, heads=64,
        kv_heads=8, head_dim=64, sliding_window=128, vocab=201088, tokenizer="o200k",
    )  # fmt: skip


def write_checkpoint(out: Path, config: Any, device: str) -> float:
    """Random weights in the hub layout; returns the bytes written (GB)."""
    from versa_kernels.gptoss.checkpoint import ShardedWriter, expected_tensor_names
    from versa_kernels.gptoss.config import CONFIG_FILE

    D, F, V = config.hidden_size, config.intermediate_size, config.vocab_size
    N, G, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    gen = torch.Generator(device=device).manual_seed(0)

    def normal(*shape: int, std: float) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, device=device) * std).bfloat16()

    def codes(*shape: int) -> torch.Tensor:
        return torch.randint(0, 256, shape, generator=gen, device=device, dtype=torch.uint8)

    def tensor(name: str) -> torch.Tensor:
        leaf = name.rsplit(".", 1)[-1] if "experts" not in name else name.split("experts.")[1]
        E = config.num_local_experts
        if name.endswith("norm.weight"):
            return torch.ones(D, dtype=torch.bfloat16)
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            # A wide lm_head spreads the logits, so p and top-20 entropy vary across tokens and
            # all three EAFT classes occur (with std 1/sqrt(D) every H rounds to 1.0).
            return normal(V, D, std=1.0 if "embed" in name else LM_HEAD_GAIN * D**-0.5)
        shapes = {
            "q_proj.weight": (N * d, D), "k_proj.weight": (G * d, D), "v_proj.weight": (G * d, D),
            "o_proj.weight": (D, N * d), "q_proj.bias": (N * d,), "k_proj.bias": (G * d,),
            "v_proj.bias": (G * d,), "o_proj.bias": (D,), "sinks": (N,),
            "router.weight": (E, D), "router.bias": (E,),
            "gate_up_proj_bias": (E, 2 * F), "down_proj_bias": (E, D),
        }  # fmt: skip
        key = next((k for k in shapes if name.endswith(k)), None)
        if key is not None:
            shape = shapes[key]
            return normal(*shape, std=shape[-1] ** -0.5 if len(shape) == 2 else 0.1)
        if leaf == "gate_up_proj_blocks":
            return codes(E, 2 * F, D // 32, 16)
        if leaf == "gate_up_proj_scales":
            return torch.full((E, 2 * F, D // 32), SCALE_BYTE, dtype=torch.uint8)
        if leaf == "down_proj_blocks":
            return codes(E, D, F // 32, 16)
        if leaf == "down_proj_scales":
            return torch.full((E, D, F // 32), SCALE_BYTE, dtype=torch.uint8)
        raise KeyError(name)

    with ShardedWriter(out, overwrite=True) as writer:
        for name in expected_tensor_names(config):
            writer.add(name, tensor(name))
        writer.write_json(CONFIG_FILE, config.to_hf_dict())
    return writer.total_size / 1e9


def calib_ids(n: int, seq: int, vocab: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, seq), generator=gen)


def run_ours(args: argparse.Namespace, ckpt: Path, seqs: list[int], dev: str) -> dict[str, Any]:
    from versa_kernels.eaft.blocks import Blocks
    from versa_kernels.eaft.collector import run_blocks
    from versa_kernels.eaft.stats import HistogramSpec, SignalStats
    from versa_kernels.eaftreap.profile import CalibExample, profile_experts
    from versa_kernels.gptoss.model import GptOssModel

    out: dict[str, Any] = {}
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model = GptOssModel.from_checkpoint(
        ckpt, dtype=torch.bfloat16 if dev == "cuda" else torch.float32, device=dev
    )
    sync()
    out["load_s"] = time.perf_counter() - t0
    out["mxfp4_experts"] = model.mxfp4_experts
    if dev == "cuda":
        out["load_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    log(f"ours: loaded in {out['load_s']:.1f} s (experts in MXFP4: {model.mxfp4_experts})")
    V, L = model.config.vocab_size, model.config.num_hidden_layers
    for seq in seqs:
        batch = max(1, args.batch_tokens // seq)
        n = batch * args.forwards
        ids = calib_ids(n + batch, seq, V, seed=seq)
        keep = torch.zeros_like(ids, dtype=torch.bool)
        keep[:, int(seq * KEEP_FROM) :] = True
        warm = Blocks(ids[:batch], keep[:batch], batch, "warm")
        blocks = Blocks(ids[batch:], keep[batch:], n, "bench")
        stats = SignalStats(HistogramSpec(), sample_points=200_000)
        run_blocks(model, warm, batch_size=batch, entropy_top_k=20, stats=stats)  # warm-up
        stats = SignalStats(HistogramSpec(), sample_points=200_000)
        wall = run_blocks(model, blocks, batch_size=batch, entropy_top_k=20, stats=stats)
        eaft_tok_s = n * seq / wall
        positions = torch.arange(int(seq * KEEP_FROM) - 1, seq - 1)
        examples = [CalibExample(ids[batch + i], positions) for i in range(n)]
        warm_ex = [CalibExample(ids[i], positions) for i in range(batch)]
        prof_kw = dict(num_layers=L, num_experts=max(model.experts_per_layer), batch_size=batch)
        profile_experts(model, warm_ex, **prof_kw)
        sync()
        t0 = time.perf_counter()
        result = profile_experts(model, examples, **prof_kw)
        sync()
        prof_wall = time.perf_counter() - t0
        prof_tok_s = n * seq / prof_wall
        out[str(seq)] = {
            "batch": batch, "rows": n, "eaft_tok_s": eaft_tok_s, "profile_tok_s": prof_tok_s,
            "profile_reported_tok_s": result.tokens_per_s, "kept_tokens": stats.count,
        }  # fmt: skip
        log(f"ours seq {seq}: eaft {eaft_tok_s:,.0f} tok/s, profile {prof_tok_s:,.0f} tok/s "
            f"(batch {batch}, {n} rows)")  # fmt: skip
        if args.onepass_diff:
            out[str(seq)]["onepass_vs_twopass"] = onepass_diff(model, examples, prof_kw)
        if args.torch_profile and seq == max(seqs):
            out["torch_profile"] = torch_profile(model, blocks, examples[:batch], prof_kw, batch)
    if dev == "cuda":
        out["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
        out["peak_reserved_gb"] = torch.cuda.max_memory_reserved() / 1e9
    del model
    gc.collect()
    if dev == "cuda":
        torch.cuda.empty_cache()
    return out


def onepass_diff(model: Any, examples: list, prof_kw: dict) -> dict[str, Any]:
    """Largest relative difference of each accumulator, one-pass against the two-pass method."""
    import numpy as np
    from versa_kernels.eaftreap.profile import profile_experts

    one = profile_experts(model, examples, method="one_pass", **prof_kw)
    two = profile_experts(model, examples, method="two_pass", **prof_kw)
    diffs: dict[str, Any] = {}
    for name, a in one.acc.state().items():
        b = two.acc.state()[name]
        scale = max(float(np.abs(b).max()), 1e-300)
        diffs[name] = float(np.abs(a - b).max()) / scale
    ranks_equal = all(
        np.array_equal(
            np.argsort(-one.acc.score(k), kind="stable"),
            np.argsort(-two.acc.score(k), kind="stable"),
        )
        for k in ("eaft_gate_norm_sum", "gate_norm_sum")
    )
    regions = one.region_counts
    log(f"one-pass vs two-pass: max rel diff {max(diffs.values()):.3e}, rankings equal "
        f"{ranks_equal}, regions {regions}")  # fmt: skip
    return {"max_rel_diff": diffs, "rankings_equal": ranks_equal, "regions": regions}


def torch_profile(model: Any, blocks: Any, examples: list, prof_kw: dict, batch: int) -> str:
    from torch.profiler import ProfilerActivity, profile
    from versa_kernels.eaft.blocks import Blocks
    from versa_kernels.eaft.collector import run_blocks
    from versa_kernels.eaft.stats import HistogramSpec, SignalStats
    from versa_kernels.eaftreap.profile import profile_experts

    one = Blocks(blocks.input_ids[:batch], blocks.keep[:batch], batch, "prof")
    tables = []
    for label, fn in (
        ("eaft forward", lambda: run_blocks(model, one, batch_size=batch, entropy_top_k=20,
                                            stats=SignalStats(HistogramSpec()))),
        ("profiling batch", lambda: profile_experts(model, examples, **prof_kw)),
    ):  # fmt: skip
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        table = prof.key_averages().table(
            sort_by="cuda_time_total", row_limit=18, max_name_column_width=60
        )
        tables.append(f"--- {label} ---\n{table}")
        print(tables[-1], flush=True)
    return "\n".join(tables)


def reap_hooks(model: Any) -> list:
    """A REAP observer on every MoE layer: recompute routing and each routed expert's ||y_e||."""
    from versa_kernels.gptoss.expert_math import swiglu

    handles = []
    for layer in model.model.layers:
        mlp = layer.mlp
        E = mlp.router.weight.shape[0]
        sums = torch.zeros(E, device=mlp.router.weight.device, dtype=torch.float64)

        def hook(module: Any, inputs: tuple, output: Any, sums: torch.Tensor = sums) -> None:
            x = inputs[0].reshape(-1, inputs[0].shape[-1])  # [T, D]
            logits = torch.nn.functional.linear(x, module.router.weight, module.router.bias)
            top, idx = torch.topk(logits, 4, dim=-1)
            gates = torch.softmax(top.float(), dim=-1)
            ex = module.experts
            for e in range(ex.gate_up_proj.shape[0]):
                tok, slot = torch.where(idx == e)
                if tok.numel() == 0:
                    continue
                h = x[tok] @ ex.gate_up_proj[e] + ex.gate_up_proj_bias[e]
                y = swiglu(h) @ ex.down_proj[e] + ex.down_proj_bias[e]
                sums[e] += (gates[tok, slot] * y.float().norm(dim=-1)).sum().double()

        handles.append(mlp.register_forward_hook(hook))
    return handles


def run_baseline(ckpt: Path, seqs: list[int], dev: str, forwards: int) -> dict[str, Any]:
    from transformers import GptOssForCausalLM, Mxfp4Config

    out: dict[str, Any] = {}
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    import importlib.util

    # device_map needs accelerate; without it transformers decodes on the CPU, then moves.
    placement = {"device_map": dev} if importlib.util.find_spec("accelerate") else {}
    out["placement"] = "device_map" if placement else "cpu load, then .to(device)"
    model = GptOssForCausalLM.from_pretrained(
        ckpt, quantization_config=Mxfp4Config(dequantize=True), attn_implementation="eager",
        dtype=torch.bfloat16 if dev == "cuda" else torch.float32, **placement,
    ).to(dev).eval()  # fmt: skip
    sync()
    out["load_s"] = time.perf_counter() - t0
    log(f"baseline: loaded in {out['load_s']:.1f} s ({out['placement']})")
    V = model.config.vocab_size
    for seq in seqs:
        ids = calib_ids(forwards + 1, seq, V, seed=seq).to(dev)
        row: dict[str, float] = {}
        for label, hooked in (("eager_tok_s", False), ("reap_tok_s", True)):
            handles = reap_hooks(model) if hooked else []
            with torch.inference_mode():
                model(ids[:1])  # warm-up
                sync()
                t0 = time.perf_counter()
                for i in range(1, forwards + 1):
                    model(ids[i : i + 1])
                sync()
            row[label] = forwards * seq / (time.perf_counter() - t0)
            for h in handles:
                h.remove()
        out[str(seq)] = row
        log(
            f"baseline seq {seq}: eager {row['eager_tok_s']:,.0f} tok/s, +REAP hooks {row['reap_tok_s']:,.0f} tok/s"
        )
    if dev == "cuda":
        out["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    del model
    gc.collect()
    if dev == "cuda":
        torch.cuda.empty_cache()
    return out


def report(res: dict[str, Any], seqs: list[int]) -> None:
    ours, base = res["ours"], res.get("baseline")
    print(
        f"\n== {res['shape']}-shaped checkpoint ({res['checkpoint_gb']:.1f} GB), {res['device']} =="
    )
    print("| measure | ours | transformers eager + REAP hooks | ratio |\n|---|---|---|---|")

    def row(label: str, a: float, b: float | None, unit: str, higher_better: bool = True) -> None:
        if b is None or not math.isfinite(b) or b == 0:
            print(f"| {label} | {a:,.1f} {unit} | n/a | n/a |")
            return
        ratio = a / b if higher_better else b / a
        print(f"| {label} | {a:,.1f} {unit} | {b:,.1f} {unit} | {ratio:.2f}x |")

    for seq in seqs:
        o, b = ours[str(seq)], (base or {}).get(str(seq), {})
        row(f"eaft_single tokens/s, seq {seq}", o["eaft_tok_s"], b.get("reap_tok_s"), "tok/s")
        row(
            f"profiling calib tokens/s, seq {seq}", o["profile_tok_s"], b.get("reap_tok_s"), "tok/s"
        )
        if b:
            print(
                f"| (baseline eager without hooks, seq {seq}) | | {b['eager_tok_s']:,.1f} tok/s | |"
            )
    row(
        "load time (warm page cache)",
        ours["load_s"],
        (base or {}).get("load_s"),
        "s",
        higher_better=False,
    )
    if "peak_gb" in ours:
        row(
            "peak GPU memory",
            ours["peak_gb"],
            (base or {}).get("peak_gb"),
            "GB",
            higher_better=False,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="20b")
    parser.add_argument("--seqs", default="2048,4096")
    parser.add_argument(
        "--dir", default="/dev/shm/versa_bench", help="where checkpoints are written"
    )
    parser.add_argument("--batch-tokens", type=int, default=16384, help="tokens per forward")
    parser.add_argument("--forwards", type=int, default=4, help="timed forwards per measure")
    parser.add_argument("--mem-cap-gb", type=float, default=80.0)
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--torch-profile", action="store_true")
    parser.add_argument("--onepass-diff", action="store_true")
    parser.add_argument("--keep-checkpoint", action="store_true")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    seqs = [int(s) for s in args.seqs.split(",")]
    if any(s < 16 for s in seqs) or args.batch_tokens < 1 or args.forwards < 1:
        sys.exit("--seqs must be integers >= 16; --batch-tokens and --forwards >= 1")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.mem_cap_gb * 1e9 / total))
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    config = make_config(args.shape)
    ckpt = Path(args.dir) / f"gptoss_{args.shape}_random"
    t0 = time.perf_counter()
    size = write_checkpoint(ckpt, config, dev)
    log(f"wrote {size:.1f} GB to {ckpt} in {time.perf_counter() - t0:.0f} s")
    res: dict[str, Any] = {"shape": args.shape, "device": name, "checkpoint_gb": size,
                           "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
                           "mem_cap_gb": args.mem_cap_gb, "args": vars(args)}  # fmt: skip
    try:
        res["ours"] = run_ours(args, ckpt, seqs, dev)
        if not args.no_baseline:
            res["baseline"] = run_baseline(ckpt, seqs, dev, args.forwards)
    finally:
        if not args.keep_checkpoint:
            shutil.rmtree(ckpt, ignore_errors=True)
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=2, default=str))
    report(res, seqs)


if __name__ == "__main__":
    main()
