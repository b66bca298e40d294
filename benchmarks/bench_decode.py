"""Greedy decode throughput: the project's native KV-cache engine against transformers `generate`.

Both run the same checkpoint (loaded from the same MXFP4 files: ours through
`GptOssModel.from_checkpoint`, transformers with `Mxfp4Config(dequantize=True)`), in bf16 on CUDA
(fp32 on CPU), greedy, exactly `--new-tokens` per sequence with EOS ignored, for each batch size.
Each measurement is the median of `--repeats` timed runs after one warm-up. The baseline is
transformers measured in the same run; the ratio is ours / transformers in generated tokens/s.

Before timing, the first 8 greedy tokens of both engines are compared (printed as the share of
identical tokens; bf16 near-ties may differ).

Run: python benchmarks/bench_decode.py MODEL_DIR [--batch-sizes 1,8,32] [--prompt-len 128]
     [--new-tokens 128] [--repeats 3]
"""

from __future__ import annotations

import argparse

import torch
from timing import median_seconds
from versa_kernels.decode import greedy_generate
from versa_kernels.gptoss.model import GptOssModel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from transformers import GptOssForCausalLM, Mxfp4Config

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    ours = GptOssModel.from_checkpoint(args.model_dir, dtype=dtype, device=device)
    hf = GptOssForCausalLM.from_pretrained(
        args.model_dir,
        quantization_config=Mxfp4Config(dequantize=True),
        dtype=dtype,
        attn_implementation="eager",
    ).to(device)
    hf.eval()
    vocab = ours.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    print(
        f"device {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, dtype {dtype}, "
        f"layers {ours.config.num_hidden_layers}, experts {ours.experts_per_layer[0]}, "
        f"hidden {ours.config.hidden_size}, prompt {args.prompt_len}, new {args.new_tokens}"
    )
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        ids = torch.randint(0, vocab, (batch, args.prompt_len), generator=gen).to(device)

        def run_ours(n: int = args.new_tokens, ids: torch.Tensor = ids) -> torch.Tensor:
            return greedy_generate(ours, ids, n)

        def run_hf(n: int = args.new_tokens, ids: torch.Tensor = ids) -> torch.Tensor:
            with torch.inference_mode():
                out = hf.generate(
                    ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                    do_sample=False, pad_token_id=0,
                )  # fmt: skip
            return out[:, ids.shape[1] :]

        same = (run_ours(8) == run_hf(8)).float().mean().item()
        t_ours = median_seconds(run_ours, args.repeats, sync)
        t_hf = median_seconds(run_hf, args.repeats, sync)
        tokens = batch * args.new_tokens
        print(
            f"batch {batch:3d}: native {tokens / t_ours:9.1f} tok/s, transformers "
            f"{tokens / t_hf:9.1f} tok/s, ratio {t_hf / t_ours:5.2f}x "
            f"(first 8 tokens identical: {same:.0%})"
        )


if __name__ == "__main__":
    main()
