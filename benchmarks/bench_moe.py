"""One gpt-oss-20b MoE layer: the project's grouped path against transformers' GptOssMLP.

What it measures: wall time of one MoE block (router, top-4, clamped SwiGLU experts, combine) on
`--tokens` tokens with gpt-oss-20b shapes (E=32, D=F=2880, bf16 on CUDA, fp32 on CPU), for

- `moe_grouped` (what the project's forward runs; it also returns each routed expert's output
  norm for REAP scoring, which transformers does not compute),
- `moe_reference` (the plain loop the tests hold everything to),
- transformers' `GptOssMLP` with the same weights (the baseline; its default experts
  implementation on this machine).

It first checks that all three agree (max abs diff printed), then prints a median time per call
and the ratio against the transformers baseline measured in the same run.

Run: python benchmarks/bench_moe.py [--tokens 4096] [--experts 32] [--hidden 2880] [--repeats 10]
"""

from __future__ import annotations

import argparse

import torch
from timing import median_seconds
from versa_kernels.gptoss.expert_math import moe_grouped, moe_reference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=2880)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument(
        "--hf-impl", default="grouped_mm", help="transformers experts implementation (eager, "
        "batched_mm, grouped_mm); the baseline"
    )  # fmt: skip
    args = parser.parse_args()

    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    E, D, F, K = args.experts, args.hidden, args.hidden, args.top_k
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int, std: float) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * std).to(device=device, dtype=dtype)

    x = rand(args.tokens, D, std=1.0)  # [T, D]
    router_w, router_b = rand(E, D, std=D**-0.5), rand(E, std=0.1)
    gate_up, gate_up_bias = rand(E, 2 * F, D, std=D**-0.5), rand(E, 2 * F, std=0.1)
    down, down_bias = rand(E, D, F, std=F**-0.5), rand(E, D, std=0.1)
    weights = (router_w, router_b, gate_up, gate_up_bias, down, down_bias)

    config = GptOssConfig(
        hidden_size=D, intermediate_size=F, num_local_experts=E, num_experts_per_tok=K
    )
    config._experts_implementation = args.hf_impl
    hf = GptOssMLP(config).to(device=device, dtype=dtype).eval()
    with torch.no_grad():
        hf.router.weight.copy_(router_w)
        hf.router.bias.copy_(router_b)
        hf.experts.gate_up_proj.copy_(gate_up.transpose(1, 2))  # HF stores [E, D, 2F]
        hf.experts.gate_up_proj_bias.copy_(gate_up_bias)
        hf.experts.down_proj.copy_(down.transpose(1, 2))  # HF stores [E, F, D]
        hf.experts.down_proj_bias.copy_(down_bias)

    def run_hf() -> torch.Tensor:
        out = hf(x[None])  # [1, T, D] (a tuple (out, router scores) in some versions)
        return (out[0] if isinstance(out, tuple) else out)[0]

    with torch.inference_mode():
        ours = moe_grouped(x, *weights, top_k=K)[0]
        ref = moe_reference(x, *weights, top_k=K)
        base = run_hf()
        print(f"device {device} ({torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}), "
              f"dtype {dtype}, tokens {args.tokens}, E={E}, D=F={D}, top-{K}")  # fmt: skip
        print(f"max |grouped - reference| = {(ours - ref).abs().max().item():.3e}")
        print(f"max |grouped - transformers| = {(ours - base).abs().max().item():.3e}")
        t_hf = median_seconds(run_hf, args.repeats, sync)
        t_grouped = median_seconds(lambda: moe_grouped(x, *weights, top_k=K), args.repeats, sync)
        t_ref = median_seconds(lambda: moe_reference(x, *weights, top_k=K), args.repeats, sync)
    for label, t in ((f"transformers ({args.hf_impl})", t_hf), ("moe_grouped", t_grouped),
                     ("moe_reference", t_ref)):  # fmt: skip
        print(f"{label:24s} {t * 1e3:9.2f} ms  {args.tokens / t:12.0f} tok/s  "
              f"speed vs transformers {t_hf / t:5.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
