"""Peak host memory while streaming a multi-GB gpt-oss checkpoint, vs. its largest tensor.

Issue 3 asks that reading and rewriting a checkpoint keep peak host memory near the largest
single tensor, not the checkpoint size. This benchmark:

1. generates (in a child process) a checkpoint with gpt-oss-20b's real tensor shapes and dtypes
   (MXFP4 experts [32, 5760, 90, 16], bf16 attention, the 201088 x 2880 embedding and lm_head)
   but fewer layers, sharded like the hub;
2. in a fresh child process, streams it: `Checkpoint.get` every tensor, `ShardedWriter.add` it
   to a rewritten copy (what the pruning rewrite does), and reads `ru_maxrss` (peak RSS, which
   on Linux includes file-backed pages of the memory-mapped shards) before and after;
3. prints total bytes, largest tensor, baseline and peak RSS and the ratios, and deletes both
   checkpoints unless --keep.

Run: python benchmarks/bench_checkpoint_memory.py [--layers 2] [--workdir /tmp] [--keep]
"""

from __future__ import annotations

import argparse
import json
import resource
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

GIB = 1 << 30
# gpt-oss-20b shapes (gptoss_reference.md §2.2)
E, H, I, Q_HEADS, KV_HEADS, HEAD_DIM, VOCAB = 32, 2880, 2880, 64, 8, 64, 201088  # noqa: E741
GROUPS = H // 32  # MXFP4 blocks per row


def _config(layers: int) -> dict:
    return {
        "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "num_hidden_layers": layers,
        "num_local_experts": E, "num_experts_per_tok": 4, "experts_per_token": 4, "hidden_size": H,
        "intermediate_size": I, "head_dim": HEAD_DIM, "num_attention_heads": Q_HEADS,
        "num_key_value_heads": KV_HEADS, "sliding_window": 128, "vocab_size": VOCAB,
        "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
        "quantization_config": {"quant_method": "mxfp4"},
    }  # fmt: skip


def _shapes(layers: int) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, dtype, shape) in the order the hub checkpoint lists them."""
    out = [("model.embed_tokens.weight", "bf16", (VOCAB, H))]
    for n in range(layers):
        p = f"model.layers.{n}."
        out += [
            (p + "input_layernorm.weight", "bf16", (H,)),
            (p + "self_attn.q_proj.weight", "bf16", (Q_HEADS * HEAD_DIM, H)),
            (p + "self_attn.q_proj.bias", "bf16", (Q_HEADS * HEAD_DIM,)),
            (p + "self_attn.k_proj.weight", "bf16", (KV_HEADS * HEAD_DIM, H)),
            (p + "self_attn.k_proj.bias", "bf16", (KV_HEADS * HEAD_DIM,)),
            (p + "self_attn.v_proj.weight", "bf16", (KV_HEADS * HEAD_DIM, H)),
            (p + "self_attn.v_proj.bias", "bf16", (KV_HEADS * HEAD_DIM,)),
            (p + "self_attn.o_proj.weight", "bf16", (H, Q_HEADS * HEAD_DIM)),
            (p + "self_attn.o_proj.bias", "bf16", (H,)),
            (p + "self_attn.sinks", "bf16", (Q_HEADS,)),
            (p + "post_attention_layernorm.weight", "bf16", (H,)),
            (p + "mlp.router.weight", "bf16", (E, H)),
            (p + "mlp.router.bias", "bf16", (E,)),
            (p + "mlp.experts.gate_up_proj_blocks", "u8", (E, 2 * I, GROUPS, 16)),
            (p + "mlp.experts.gate_up_proj_scales", "u8", (E, 2 * I, GROUPS)),
            (p + "mlp.experts.gate_up_proj_bias", "bf16", (E, 2 * I)),
            (p + "mlp.experts.down_proj_blocks", "u8", (E, H, I // 32, 16)),
            (p + "mlp.experts.down_proj_scales", "u8", (E, H, I // 32)),
            (p + "mlp.experts.down_proj_bias", "bf16", (E, H)),
        ]
    return out + [("model.norm.weight", "bf16", (H,)), ("lm_head.weight", "bf16", (VOCAB, H))]


def generate(out: Path, layers: int, max_shard_bytes: int) -> None:
    """Child: write the 20b-shaped checkpoint with random contents."""
    import torch
    from versa_kernels.gptoss.checkpoint import ShardedWriter

    gen = torch.Generator().manual_seed(0)
    with ShardedWriter(out, max_shard_bytes=max_shard_bytes) as writer:
        for name, kind, shape in _shapes(layers):
            if kind == "u8":
                t = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
                if name.endswith("_scales"):
                    t = t % 8 + 118  # the real 20b's scale bytes sit around 118-125
            else:
                t = torch.empty(shape, dtype=torch.bfloat16).normal_(0, 0.02, generator=gen)
            writer.add(name, t)
            del t
        writer.write_json("config.json", _config(layers))


def stream(src: Path, dst: Path, max_shard_bytes: int) -> dict:
    """Child: read every tensor and write a rewritten copy; report sizes and peak RSS."""
    import torch
    from versa_kernels.gptoss.checkpoint import Checkpoint, ShardedWriter

    baseline_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # after imports
    start = time.monotonic()
    largest = total = 0
    with Checkpoint(src) as ckpt, ShardedWriter(dst, max_shard_bytes=max_shard_bytes) as writer:
        for name in ckpt.names():
            t = ckpt.get(name)
            nbytes = t.numel() * t.element_size()
            largest, total = max(largest, nbytes), total + nbytes
            writer.add(name, t)
            del t
        writer.copy_side_files(src, ("config.json",))
    seconds = time.monotonic() - start
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "torch": torch.__version__,
        "total_bytes": total,
        "largest_tensor_bytes": largest,
        "baseline_rss_bytes": baseline_kib * 1024,
        "peak_rss_bytes": peak_kib * 1024,
        "peak_over_largest": peak_kib * 1024 / largest,
        "peak_minus_baseline_over_largest": (peak_kib - baseline_kib) * 1024 / largest,
        "peak_over_total": peak_kib * 1024 / total,
        "seconds": seconds,
        "read_write_gb_per_s": total / seconds / 1e9,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--layers", type=int, default=2, help="20b-shaped layers (default 2: ~3.2 GB)"
    )
    parser.add_argument("--workdir", type=Path, default=Path("/tmp"))
    parser.add_argument("--max-shard-bytes", type=int, default=2 * GIB)
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    parser.add_argument("--child", choices=("generate", "stream"), help=argparse.SUPPRESS)
    parser.add_argument("--src", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--dst", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child == "generate":
        generate(args.src, args.layers, args.max_shard_bytes)
        return 0
    if args.child == "stream":
        print(json.dumps(stream(args.src, args.dst, args.max_shard_bytes)))
        return 0
    root = args.workdir / f"bench_ckpt_{secrets.token_hex(4)}"
    src, dst = root / "src", root / "dst"
    common = [
        sys.executable,
        __file__,
        "--layers",
        str(args.layers),
        "--max-shard-bytes",
        str(args.max_shard_bytes),
    ]
    try:
        t0 = time.monotonic()
        subprocess.run([*common, "--child", "generate", "--src", str(src)], check=True)
        gen_s = time.monotonic() - t0
        done = subprocess.run([*common, "--child", "stream", "--src", str(src), "--dst", str(dst)],
                              check=True, capture_output=True, text=True)  # fmt: skip
        result = json.loads(done.stdout.strip().splitlines()[-1])
        result.update(
            layers=args.layers,
            generate_seconds=gen_s,
            shards=len(list(src.glob("model-*.safetensors"))),
        )
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result, indent=2))
    print(
        f"checkpoint {result['total_bytes'] / GIB:.2f} GiB in {result['shards']} shards, largest tensor "
        f"{result['largest_tensor_bytes'] / GIB:.2f} GiB; peak RSS {result['peak_rss_bytes'] / GIB:.2f} GiB "
        f"(baseline {result['baseline_rss_bytes'] / GIB:.2f} GiB after imports) = "
        f"{result['peak_over_largest']:.2f}x largest tensor, {result['peak_over_total']:.2f}x checkpoint"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
