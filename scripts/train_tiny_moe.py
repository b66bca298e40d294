"""Train the small gpt-oss-architecture MoE committed at kernels/versa_kernels/data/tiny_moe_trained.

Why it exists: pruning criteria can only be told apart on a model whose experts specialize;
random weights route arbitrarily, so "EAFT-REAP beats random and frequency pruning" cannot show
on them. This script trains a real gpt-oss MoE (router with bias, top-k then softmax, clamped
interleaved SwiGLU, sinks, sliding window, YaRN) with the project's own forward
(`versa_kernels.gptoss.model`, train mode) on text that ships with Python: the standard library's
non-test `.py` sources (code, comments, docstrings) plus Harmony-formatted conversations built
from the same modules' docstrings and sources, so completion-only masks are meaningful.

Deterministic: a fixed, sorted file list (every VAL_EVERY-th file held out), fixed seeds, fixed
step count. Load balance uses the router bias (auxiliary-loss-free balancing, DeepSeek-V3 §2.1.2):
after each step the bias of over-loaded experts moves down and under-loaded up by BIAS_RATE; the
bias is not trained by gradient.

Writes the MXFP4 checkpoint (via `save_mxfp4_checkpoint`), the tokenizer (H2's small Harmony
tokenizer, vocab 1024), generation_config.json, train_log.json (loss curve, validation losses in
fp32 and after MXFP4 re-load, expert-specialization numbers), loss_curve.png and TRAINING.md.

Usage: python scripts/train_tiny_moe.py [--steps 600] [--threads 1] [--out DIR]
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import logging
import math
import platform
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from versa_kernels.fixtures.tokenizer import build_small_harmony, harmony_special_ids
from versa_kernels.gptoss.config import GptOssConfig
from versa_kernels.gptoss.export import save_mxfp4_checkpoint
from versa_kernels.gptoss.model import GptOssModel

from versa_runner.fsutil import atomic_write_json

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_moe_report import routing_specialization, write_report  # noqa: E402

log = logging.getLogger("train_tiny_moe")

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "kernels/versa_kernels/data/tiny_moe_trained"
VAL_EVERY = 20  # every 20th stdlib file (sorted) is held out for validation
SEQ_LEN = 256
BATCH = 16
CHAT_FRACTION = 0.25  # share of training windows drawn from the Harmony conversations
LR, WARMUP, MIN_LR_FRAC, WEIGHT_DECAY, GRAD_CLIP = 3e-3, 40, 0.1, 0.01, 1.0
BIAS_RATE = 1e-3
INIT_STD = 0.02
EVAL_EVERY = 50
VAL_WINDOWS = 48  # fixed validation windows (2/3 code, 1/3 chat)
MAX_CHECKPOINT_BYTES = 8 * 1024 * 1024
SOURCE_SNIPPET_MAX_CHARS = 1200

# The architecture: gpt-oss shapes scaled down (4 layers, 16 experts, top-4).
MODEL_CONFIG = {
    "architectures": ["GptOssForCausalLM"],
    "model_type": "gpt_oss",
    "num_hidden_layers": 4,
    "num_local_experts": 16,
    "num_experts_per_tok": 4,
    "experts_per_token": 4,
    "hidden_size": 128,
    "intermediate_size": 128,
    "head_dim": 32,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "sliding_window": 64,
    "layer_types": ["sliding_attention", "full_attention"] * 2,
    "rope_theta": 150000.0,
    "rope_scaling": {
        "rope_type": "yarn",
        "factor": 32.0,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "original_max_position_embeddings": 4096,
        "truncate": False,
    },
    "rms_norm_eps": 1e-5,
    "swiglu_limit": 7.0,
    "swiglu_alpha": 1.702,
    "max_position_embeddings": 131072,
    "initial_context_length": 4096,
}


def stdlib_files() -> list[Path]:
    """Non-test stdlib .py files, sorted (site-packages and test packages excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if "site-packages" in parts or "__pycache__" in parts or "test" in parts[0]:
            continue
        files.append(path)
    return files


def conversations(path: Path, root: Path) -> list[str]:
    """Harmony conversations about one module: explain a function, show a function's source."""
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return []
    module = ".".join(path.relative_to(root).with_suffix("").parts)
    out = []
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) or node.name.startswith("_"):
            continue
        doc = ast.get_docstring(node)
        kind = "class" if isinstance(node, ast.ClassDef) else "function"
        system = "<|start|>system<|message|>You are a helpful Python assistant.<|end|>"
        if doc:
            answer = doc.strip().split("\n\n")[0]
            out.append(
                f"{system}<|start|>user<|message|>What does the {kind} `{module}.{node.name}` do?<|end|>"
                f"<|start|>assistant<|channel|>analysis<|message|>The user asks about {node.name} "
                f"in the {module} module. I will summarize its docstring.<|end|>"
                f"<|start|>assistant<|channel|>final<|message|>{answer}<|return|>"
            )
        source = ast.get_source_segment(text, node) or ""
        if kind == "function" and 0 < len(source) <= SOURCE_SNIPPET_MAX_CHARS:
            out.append(
                f"{system}<|start|>user<|message|>Show me how `{module}.{node.name}` is implemented."
                f"<|end|><|start|>assistant<|channel|>final<|message|>```python\n{source}\n```<|return|>"
            )
    return out


def token_streams(
    tokenizer, files: list[Path], root: Path, eot: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(code ids, chat ids): each document's tokens followed by <|endoftext|>, concatenated."""
    code_docs = [p.read_text(encoding="utf-8", errors="replace") for p in files]
    chat_docs = [c for p in files for c in conversations(p, root)]
    streams = []
    for docs in (code_docs, chat_docs):
        ids: list[int] = []
        for encoded in tokenizer(docs, add_special_tokens=False)["input_ids"]:
            ids.extend(encoded)
            ids.append(eot)
        streams.append(torch.tensor(ids, dtype=torch.long))
    return streams[0], streams[1]


def windows(stream: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` random windows of SEQ_LEN + 1 tokens from `stream` -> [count, SEQ_LEN + 1]."""
    starts = torch.randint(0, stream.numel() - SEQ_LEN - 1, (count,), generator=generator)
    return torch.stack([stream[s : s + SEQ_LEN + 1] for s in starts.tolist()])


def init_model(config: GptOssConfig, seed: int) -> GptOssModel:
    """Random init like transformers' GptOss `_init_weights` (normal 0.02, zero biases, unit norms)."""
    torch.manual_seed(seed)
    model = GptOssModel(config)
    for name, param in model.named_parameters():
        with torch.no_grad():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith("bias") or name.endswith("sinks"):
                param.zero_()
            else:
                param.normal_(0.0, INIT_STD)
    return model


def lm_loss(model: GptOssModel, batch: torch.Tensor, *, collect_moe: bool = False):
    """Mean next-token cross entropy over batch [B, T+1] (all positions), plus the forward output."""
    out = model(batch[:, :-1], collect_moe=collect_moe)
    logits = model.logits(out.hidden).float()  # [B, T, V]; V is small here
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)
    )
    return loss, out


@torch.no_grad()
def evaluate(model: GptOssModel, val: torch.Tensor) -> float:
    model.eval()
    losses = [
        lm_loss(model, val[i : i + BATCH])[0].item() * len(val[i : i + BATCH])
        for i in range(0, len(val), BATCH)
    ]
    model.train()
    return sum(losses) / len(val)


def balance_router_bias(model: GptOssModel, traces: list) -> None:
    """Auxiliary-loss-free balancing: nudge each router bias against its expert's load."""
    for layer, trace in zip(model.model.layers, traces, strict=True):
        num_experts = layer.mlp.num_experts
        load = torch.bincount(trace.indices.reshape(-1), minlength=num_experts).float()
        target = trace.indices.numel() / num_experts
        with torch.no_grad():
            layer.mlp.router.bias.add_(BIAS_RATE * torch.sign(target - load))


@dataclass
class Data:
    """Tokenizer and token streams; `val` holds the fixed validation windows [N, SEQ_LEN + 1]."""

    tokenizer: Any
    tokenizer_dir: Path
    specials: dict[str, int]
    train_code: torch.Tensor
    train_chat: torch.Tensor
    val: torch.Tensor
    n_val_chat: int
    info: dict[str, Any]


def prepare(seed: int, tokenizer_dir: Path | None = None) -> Data:
    """Build (or reuse) the tokenizer, tokenize the stdlib split, draw the validation windows."""
    from transformers import AutoTokenizer

    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_files()
    val_files = files[::VAL_EVERY]
    train_files = [p for i, p in enumerate(files) if i % VAL_EVERY]
    if tokenizer_dir is None:
        tokenizer_dir = build_small_harmony(
            Path(tempfile.mkdtemp(prefix="tiny_moe_")) / "tokenizer"
        )
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    specials = harmony_special_ids(len(tokenizer))
    eot = specials["<|endoftext|>"]
    train_code, train_chat = token_streams(tokenizer, train_files, root, eot)
    val_code, val_chat = token_streams(tokenizer, val_files, root, eot)
    val_gen = torch.Generator().manual_seed(seed + 2)
    n_val_chat = VAL_WINDOWS // 3
    val = torch.cat(
        [
            windows(val_code, VAL_WINDOWS - n_val_chat, val_gen),
            windows(val_chat, n_val_chat, val_gen),
        ]
    )
    listing = "\n".join(str(p.relative_to(root)) for p in files)
    info = {
        "stdlib_files": len(files),
        "val_files": len(val_files),
        "file_list_sha256": hashlib.sha256(listing.encode()).hexdigest(),
        "tokens": {
            "train_code": train_code.numel(),
            "train_chat": train_chat.numel(),
            "val_code": val_code.numel(),
            "val_chat": val_chat.numel(),
        },
    }
    log.info("tokens: %s", info["tokens"])
    return Data(
        tokenizer, Path(tokenizer_dir), specials, train_code, train_chat, val, n_val_chat, info
    )


def train_loop(model: GptOssModel, data: Data, *, steps: int, seed: int) -> tuple[list, list]:
    """AdamW with warmup + cosine; router biases balanced outside the gradient. Returns curves."""
    started = time.monotonic()
    router_biases = {n for n, _ in model.named_parameters() if n.endswith("router.bias")}
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and n not in router_biases]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 and n not in router_biases]
    for name, param in model.named_parameters():
        param.requires_grad_(name not in router_biases)
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": WEIGHT_DECAY},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=LR,
        betas=(0.9, 0.95),
    )
    data_gen = torch.Generator().manual_seed(seed + 1)
    n_chat = round(BATCH * CHAT_FRACTION)
    curve, val_curve = [], []
    for step in range(1, steps + 1):
        lr = LR * min(1.0, step / WARMUP)
        progress = max(0.0, (step - WARMUP) / max(1, steps - WARMUP))
        lr *= MIN_LR_FRAC + (1 - MIN_LR_FRAC) * 0.5 * (1 + math.cos(math.pi * progress))
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = torch.cat(
            [
                windows(data.train_code, BATCH - n_chat, data_gen),
                windows(data.train_chat, n_chat, data_gen),
            ]
        )  # [BATCH, SEQ_LEN + 1]
        loss, out = lm_loss(model, batch, collect_moe=True)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        balance_router_bias(model, out.moe)
        elapsed = time.monotonic() - started
        curve.append(
            {"step": step, "loss": round(loss.item(), 5), "lr": lr, "elapsed_s": round(elapsed, 1)}
        )
        if step % EVAL_EVERY == 0 or step == steps:
            val_curve.append({"step": step, "val_loss": round(evaluate(model, data.val), 5)})
            log.info(
                "step %d loss %.4f val %.4f (%.0fs)",
                step,
                loss.item(),
                val_curve[-1]["val_loss"],
                elapsed,
            )
        elif step % 10 == 0:
            log.info("step %d loss %.4f (%.1f s/step)", step, loss.item(), elapsed / step)
    return curve, val_curve


def analyze(out_dir: Path, data: Data, train_log: dict[str, Any], *, seed: int) -> dict[str, Any]:
    """Re-load the written MXFP4 checkpoint: its validation loss, routing specialization (and that
    of the untrained init, for contrast), size; then write train_log.json and TRAINING.md."""
    reloaded = GptOssModel.from_checkpoint(out_dir)
    untrained = init_model(reloaded.config, seed)
    train_log["val_loss_mxfp4_reloaded"] = round(evaluate(reloaded, data.val), 5)
    train_log["specialization"] = routing_specialization(
        reloaded, data.tokenizer, data.val, chat_rows=data.n_val_chat
    )
    train_log["specialization_untrained_init"] = routing_specialization(
        untrained.eval(), data.tokenizer, data.val, chat_rows=data.n_val_chat
    )
    train_log["checkpoint_bytes"] = sum(p.stat().st_size for p in out_dir.iterdir() if p.is_file())
    atomic_write_json(out_dir / "train_log.json", train_log)
    write_report(out_dir, train_log)
    train_log["checkpoint_bytes"] = sum(p.stat().st_size for p in out_dir.iterdir() if p.is_file())
    atomic_write_json(out_dir / "train_log.json", train_log)
    return train_log


def train(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    started = time.monotonic()
    out_dir = Path(args.out)
    data = prepare(args.seed)
    specials, eot = data.specials, data.specials["<|endoftext|>"]
    config = GptOssConfig.from_dict(
        {
            **MODEL_CONFIG,
            "vocab_size": len(data.tokenizer),
            "eos_token_id": specials["<|return|>"],
            "pad_token_id": eot,
        }
    )
    model = init_model(config, args.seed)
    model.fused_attention = True  # ~3x faster on CPU; the checkpoint is evaluated on the reference
    model.train()
    curve, val_curve = train_loop(model, data, steps=args.steps, seed=args.seed)
    train_wall_s = time.monotonic() - started
    model.eval()
    model.fused_attention = False
    fp32_val = evaluate(model, data.val)
    save_mxfp4_checkpoint(model, out_dir, side_files_from=data.tokenizer_dir, overwrite=True)
    atomic_write_json(
        out_dir / "generation_config.json",
        {
            "bos_token_id": specials["<|startoftext|>"],
            "eos_token_id": [specials["<|return|>"], specials["<|call|>"], eot],
            "pad_token_id": eot,
        },
    )
    train_log = {
        "schema_version": 1,
        "command": " ".join(["python", "scripts/train_tiny_moe.py", *sys.argv[1:]]),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": args.threads,
        "seed": args.seed,
        "steps": args.steps,
        "batch": BATCH,
        "seq_len": SEQ_LEN,
        "chat_fraction": CHAT_FRACTION,
        "val_windows": VAL_WINDOWS,
        "lr": LR,
        **data.info,
        "wall_s": round(train_wall_s, 1),
        "final_train_loss": curve[-1]["loss"],
        "val_loss_fp32": round(fp32_val, 5),
        "curve": curve,
        "val_curve": val_curve,
    }
    train_log = analyze(out_dir, data, train_log, seed=args.seed)
    if train_log["checkpoint_bytes"] > MAX_CHECKPOINT_BYTES:
        raise SystemExit(
            f"checkpoint is {train_log['checkpoint_bytes']} bytes, over {MAX_CHECKPOINT_BYTES}"
        )
    log.info("done: val fp32 %.4f, mxfp4 %.4f", fp32_val, train_log["val_loss_mxfp4_reloaded"])


def report_only(args: argparse.Namespace) -> None:
    """Recompute the analysis of an already trained checkpoint and rewrite TRAINING.md."""
    torch.set_num_threads(args.threads)
    out_dir = Path(args.out)
    train_log = json.loads((out_dir / "train_log.json").read_text(encoding="utf-8"))
    if "wall_s" not in train_log and "train_wall_s" in train_log:
        train_log["wall_s"] = train_log.pop("train_wall_s")  # schema 1 before the rename
    data = prepare(train_log["seed"], tokenizer_dir=out_dir)
    if data.info["file_list_sha256"] != train_log["file_list_sha256"]:
        raise SystemExit("the stdlib file list differs from the one the model was trained on")
    analyze(out_dir, data, train_log, seed=train_log["seed"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="re-analyze the checkpoint in --out (no training) and rewrite TRAINING.md",
    )
    args = parser.parse_args()
    if args.steps < 1 or args.threads < 1:
        parser.error("--steps and --threads must be positive integers")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    report_only(args) if args.report_only else train(args)


if __name__ == "__main__":
    main()
