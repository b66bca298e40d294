"""Expert-specialization numbers, loss-curve plot and TRAINING.md for scripts/train_tiny_moe.py.

Specialization is measured as the mutual information between the expert a token is routed to and
the token's kind (whitespace, word, digits, punctuation, Harmony special) or its domain (code vs
Harmony conversation), per layer, over the fixed validation windows, each of a token's K routed
slots counted once. Zero bits means routing ignores the kind; the same number with the kinds
shuffled across tokens is reported as the chance baseline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from versa_runner.fsutil import atomic_write_text

TOKEN_KINDS = ("space", "word", "digits", "punct", "special")
DOMAINS = ("code", "chat")
SHUFFLE_SEED = 1234
EVAL_BATCH = 16
MIN_LOAD_FRACTION = 0.25  # of the uniform load 1/E, for an expert to be named "most specialized"


def token_kind_table(tokenizer: Any) -> torch.Tensor:
    """Kind index (into TOKEN_KINDS) for every token id -> [V]."""
    special_ids = set(tokenizer.all_special_ids) | {
        i for t, i in tokenizer.get_vocab().items() if t.startswith("<|") and t.endswith("|>")
    }
    kinds = []
    for token_id in range(len(tokenizer)):
        text = tokenizer.decode([token_id])
        if token_id in special_ids:
            kinds.append("special")
        elif text.strip() == "":
            kinds.append("space")
        elif text.strip().isdigit():
            kinds.append("digits")
        elif text.strip().replace("_", "a").isalnum():
            kinds.append("word")
        else:
            kinds.append("punct")
    return torch.tensor([TOKEN_KINDS.index(k) for k in kinds])


def mutual_information_bits(
    labels: torch.Tensor, experts: torch.Tensor, n_labels: int, n_experts: int
) -> float:
    """I(label; expert) in bits from paired samples labels [N], experts [N]."""
    joint = torch.zeros(n_labels, n_experts, dtype=torch.float64)
    joint.index_put_(
        (labels, experts), torch.ones_like(labels, dtype=torch.float64), accumulate=True
    )
    joint /= joint.sum()
    p_label, p_expert = joint.sum(1, keepdim=True), joint.sum(0, keepdim=True)
    nz = joint > 0
    return float((joint[nz] * torch.log2(joint[nz] / (p_label @ p_expert)[nz])).sum())


@torch.no_grad()
def routing_specialization(
    model: Any, tokenizer: Any, val: torch.Tensor, *, chat_rows: int
) -> dict[str, Any]:
    """Per-layer routing statistics over val [N, T+1] (last `chat_rows` rows are conversations)."""
    inputs = val[:, :-1]  # [N, T]
    traces: list[list[torch.Tensor]] = [[] for _ in model.experts_per_layer]
    for start in range(0, len(inputs), EVAL_BATCH):
        out = model(inputs[start : start + EVAL_BATCH], collect_moe=True)
        for layer, trace in enumerate(out.moe):
            traces[layer].append(trace.indices)
    K = model.top_k
    kinds = token_kind_table(tokenizer)[inputs.reshape(-1)]  # [N*T]
    domain = torch.zeros(inputs.shape, dtype=torch.long)
    domain[len(inputs) - chat_rows :] = 1
    domain = domain.reshape(-1)  # [N*T]
    shuffled = kinds[
        torch.randperm(kinds.numel(), generator=torch.Generator().manual_seed(SHUFFLE_SEED))
    ]
    layers = []
    for layer, pieces in enumerate(traces):
        E = model.experts_per_layer[layer]
        experts = torch.cat(pieces).reshape(-1)  # [N*T*K]
        kind_k = kinds.repeat_interleave(K)  # [N*T*K], aligned with experts
        load = torch.bincount(experts, minlength=E).double() / experts.numel()
        best = {}
        for k, name in enumerate(TOKEN_KINDS):
            sel = kind_k == k
            if not sel.any():
                continue
            p_e_given_kind = torch.bincount(experts[sel], minlength=E).double() / sel.sum()
            # Only experts with at least a quarter of the uniform load: a lift over a near-empty
            # expert is noise.
            lift = torch.where(
                load >= MIN_LOAD_FRACTION / E, p_e_given_kind / load.clamp_min(1e-12), 0
            )
            e = int(lift.argmax())
            best[name] = {
                "expert": e,
                "p_given_kind": round(float(p_e_given_kind[e]), 4),
                "p_overall": round(float(load[e]), 4),
                "lift": round(float(lift[e]), 2),
            }
        layers.append(
            {
                "layer": layer,
                "mi_kind_bits": round(
                    mutual_information_bits(kind_k, experts, len(TOKEN_KINDS), E), 4
                ),
                "mi_kind_shuffled_bits": round(
                    mutual_information_bits(
                        shuffled.repeat_interleave(K), experts, len(TOKEN_KINDS), E
                    ),
                    4,
                ),
                "mi_domain_bits": round(
                    mutual_information_bits(domain.repeat_interleave(K), experts, len(DOMAINS), E),
                    4,
                ),
                "load_min": round(float(load.min()), 4),
                "load_max": round(float(load.max()), 4),
                "most_specialized_expert_per_kind": best,
            }
        )
    kind_counts = torch.bincount(kinds, minlength=len(TOKEN_KINDS)).double()
    kind_entropy = float(
        -(p := kind_counts[kind_counts > 0] / kind_counts.sum()).mul(p.log2()).sum()
    )
    return {
        "token_kinds": list(TOKEN_KINDS),
        "kind_entropy_bits": round(kind_entropy, 4),
        "layers": layers,
    }


def plot_loss(out_dir: Path, train_log: dict[str, Any]) -> Path:
    """Training loss (and its 20-step running mean) plus validation loss, as loss_curve.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [c["step"] for c in train_log["curve"]]
    losses = [c["loss"] for c in train_log["curve"]]
    window = 20
    smooth = [
        sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
        for i in range(len(losses))
    ]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, losses, color="0.8", lw=0.8, label="train (per step)")
    ax.plot(steps, smooth, color="C0", label=f"train ({window}-step mean)")
    ax.plot(
        [v["step"] for v in train_log["val_curve"]],
        [v["val_loss"] for v in train_log["val_curve"]],
        "o-",
        color="C1",
        label="validation (held-out files)",
    )
    ax.axhline(
        train_log["val_loss_mxfp4_reloaded"],
        color="C2",
        ls="--",
        lw=1,
        label="validation, MXFP4 re-load",
    )
    ax.set_xlabel("step")
    ax.set_ylabel("cross entropy (nats/token)")
    ax.set_title("tiny gpt-oss MoE on Python stdlib (4 layers, 16 experts, top-4)")
    ax.legend()
    ax.grid(alpha=0.3)
    path = out_dir / "loss_curve.png"
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _median_step_s(train_log: dict[str, Any]) -> float:
    elapsed = [c["elapsed_s"] for c in train_log["curve"]]
    steps = sorted(b - a for a, b in zip(elapsed, elapsed[1:], strict=False))
    return steps[len(steps) // 2] if steps else float("nan")


def write_report(out_dir: Path, train_log: dict[str, Any]) -> None:
    """loss_curve.png and TRAINING.md next to the checkpoint."""
    plot_loss(out_dir, train_log)
    spec = train_log["specialization"]
    untrained = {
        row["layer"]: row["mi_kind_bits"]
        for row in train_log["specialization_untrained_init"]["layers"]
    }
    rows = "\n".join(
        f"| {row['layer']} | {row['mi_kind_bits']:.3f} | {untrained[row['layer']]:.3f} | "
        f"{row['mi_kind_shuffled_bits']:.4f} | {row['mi_domain_bits']:.3f} | "
        f"{row['load_min']:.3f} / {row['load_max']:.3f} | "
        + ", ".join(
            f"{k}: e{v['expert']} x{v['lift']}"
            for k, v in row["most_specialized_expert_per_kind"].items()
        )
        + " |"
        for row in spec["layers"]
    )
    gap = train_log["val_loss_mxfp4_reloaded"] - train_log["val_loss_fp32"]
    text = f"""# tiny_moe_trained: how it was made

A gpt-oss-architecture MoE (4 layers, 16 experts per layer, top-4, hidden 128, expert
intermediate 128, 4 query / 2 KV heads of 32, sinks, sliding window 64 on even layers, YaRN rope
as in the hub config) trained with the project's own forward on Python {train_log["python"]}'s
standard library: {train_log["stdlib_files"]} non-test `.py` files (sorted; every 20th held out,
{train_log["val_files"]} files), plus Harmony conversations built from the same modules' docstrings
and sources ({train_log["chat_fraction"]:.0%} of training windows). Tokenizer: the small Harmony
tokenizer of `versa_kernels.fixtures.tokenizer` (first 1000 o200k ranks + Harmony specials,
vocab 1024).

Command (CPU, {train_log["threads"]} threads, torch {train_log["torch"]}):

    {train_log["command"]}

| | |
|---|---|
| steps x batch x seq | {train_log["steps"]} x {train_log["batch"]} x {train_log["seq_len"]} |
| training tokens seen | {train_log["steps"] * train_log["batch"] * train_log["seq_len"]:,} |
| wall time (tokenizing + training) | {train_log["wall_s"] / 60:.1f} min, median {_median_step_s(train_log):.2f} s/step (CPU shared with other jobs) |
| final train loss (last step) | {train_log["final_train_loss"]:.4f} nats/token |
| validation loss, fp32 weights | {train_log["val_loss_fp32"]:.4f} |
| validation loss, MXFP4 checkpoint re-loaded | {train_log["val_loss_mxfp4_reloaded"]:.4f} (diff {gap:+.4f}) |
| checkpoint directory size | {train_log["checkpoint_bytes"] / 1e6:.2f} MB |

Validation = {train_log["val_windows"]} fixed windows of 256 tokens from the held-out
files (2/3 code, 1/3 conversations). The loss curve is `loss_curve.png`; every step's loss is in
`train_log.json`.

## Do the experts specialize?

Mutual information between a token's routed expert and its kind
({", ".join(spec["token_kinds"])}; kind entropy {spec["kind_entropy_bits"]:.2f} bits), each of
the 4 routed slots counted, on the validation windows. "Shuffled" is the same with kinds permuted
across tokens (chance); "untrained init" is the same model at its random initialisation, whose
routing depends on the token too but was never shaped by the data. "Domain" is code vs
conversation. Lift = P(expert | kind) / P(expert), among experts with at least a quarter of the
uniform load.

| layer | MI(expert; kind) bits | same, untrained init | shuffled kinds | MI(expert; domain) bits | load min / max | most specialized expert per kind (lift) |
|---|---|---|---|---|---|---|
{rows}

Uniform load would be {1 / 16:.4f} per expert.
"""
    atomic_write_text(out_dir / "TRAINING.md", text)
