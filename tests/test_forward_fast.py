"""The forward's fast paths against their plain-torch references.

- MXFP4-resident experts (decoded per layer into a shared buffer) vs experts decoded at load:
  bit-identical logits, also after pruning at load.
- Attention on fused kernels (flash + exact sink correction on full layers, banded blocks on
  sliding layers) vs the chunked reference `sdpa_with_sinks`.
- The Triton MXFP4 decode vs `decode_mxfp4` (CUDA only).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import versa_kernels
from versa_kernels.errors import ParameterError
from versa_kernels.fixtures.model import make_tiny_checkpoint
from versa_kernels.gptoss import attention
from versa_kernels.gptoss.attention import (
    banded_attention_with_sinks,
    sdpa_with_sinks,
    sdpa_with_sinks_flash,
)
from versa_kernels.gptoss.expert_math import moe_grouped, swiglu
from versa_kernels.gptoss.experts import Mxfp4Experts
from versa_kernels.gptoss.model import GptOssModel
from versa_kernels.gptoss.mxfp4 import decode_mxfp4
from versa_kernels.gptoss.mxfp4_triton import decode_mxfp4_into, triton_decode_usable

TRAINED = Path(versa_kernels.__file__).parent / "data" / "tiny_moe_trained"
FP32_ATTENTION_TOLERANCE = 1e-5  # fp32 attention outputs are O(1); kernels differ by rounding
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> object:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("fast") / "tiny", seed=7)


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 1000, (2, 23), generator=torch.Generator().manual_seed(1))


def _logits(model: GptOssModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model.logits(model(ids).hidden).float()


def test_mxfp4_resident_experts_equal_decoded_experts_bit_for_bit(tiny, ids) -> None:
    dense = GptOssModel.from_checkpoint(tiny, expert_format="dense")
    packed = GptOssModel.from_checkpoint(tiny, expert_format="mxfp4")
    assert isinstance(packed.model.layers[0].mlp.experts, Mxfp4Experts)
    assert packed.model.layers[0].mlp.experts.gate_up_blocks.dtype == torch.uint8
    assert torch.equal(_logits(dense, ids), _logits(packed, ids))
    keep = [[0, 2, 5, 7], [1, 2, 3, 4, 6], [0, 1, 2, 3], [4, 5, 6, 7]]
    dense_pruned = GptOssModel.from_checkpoint(tiny, expert_format="dense", experts_keep=keep)
    packed_pruned = GptOssModel.from_checkpoint(tiny, expert_format="mxfp4", experts_keep=keep)
    assert packed_pruned.experts_per_layer == (4, 5, 4, 4)
    assert torch.equal(_logits(dense_pruned, ids), _logits(packed_pruned, ids))
    # One workspace serves layers of different widths (the widest sets its size).
    assert packed_pruned.expert_workspace.gate_up is not None
    assert packed_pruned.expert_workspace.gate_up.shape[0] == 5


def test_auto_format_is_dense_on_cpu_and_bad_formats_are_refused(tiny) -> None:
    auto = GptOssModel.from_checkpoint(tiny)
    assert not auto.mxfp4_experts
    with pytest.raises(ParameterError, match="expert_format='fp8' is not allowed"):
        GptOssModel.from_checkpoint(tiny, expert_format="fp8")


@pytest.mark.parametrize(
    ("seq", "window"), [(29, 4), (300, 128), (3, 4), (16, 4), (33, 8), (64, None)]
)
def test_flash_attention_with_sinks_equals_reference(seq: int, window: int | None) -> None:
    gen = torch.Generator().manual_seed(seq)
    B, N, G, d = 2, 8, 2, 16
    q, k, v = (torch.randn(B, h, seq, d, generator=gen) for h in (N, G, G))
    sinks = torch.randn(N, generator=gen) * 2
    ref = sdpa_with_sinks(q, k, v, sinks, sm_scale=d**-0.5, sliding_window=window)
    fast = sdpa_with_sinks_flash(q, k, v, sinks, sm_scale=d**-0.5, sliding_window=window)
    torch.testing.assert_close(fast, ref, atol=FP32_ATTENTION_TOLERANCE, rtol=0)
    if window is not None:
        banded = banded_attention_with_sinks(q, k, v, sinks, sm_scale=d**-0.5, window=window)
        torch.testing.assert_close(banded, ref, atol=FP32_ATTENTION_TOLERANCE, rtol=0)


def test_sinks_change_the_flash_output() -> None:
    """The sink correction is really applied: a huge sink logit takes almost all the mass."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 9, 8, generator=gen) for _ in range(3))
    small = sdpa_with_sinks_flash(
        q, k, v, torch.full((2,), -30.0), sm_scale=0.3, sliding_window=None
    )
    big = sdpa_with_sinks_flash(q, k, v, torch.full((2,), 30.0), sm_scale=0.3, sliding_window=None)
    assert small.abs().max() > 0.1 and big.abs().max() < 1e-6


def test_decode_into_buffer_equals_reference_on_cpu() -> None:
    gen = torch.Generator().manual_seed(3)
    blocks = torch.randint(0, 256, (3, 5, 2, 16), generator=gen).to(torch.uint8)
    scales = torch.randint(110, 135, (3, 5, 2), generator=gen).to(torch.uint8)
    out = torch.empty(3, 5, 64, dtype=torch.bfloat16)
    assert not triton_decode_usable(out.device)
    decode_mxfp4_into(blocks, scales, out)
    assert torch.equal(out, decode_mxfp4(blocks, scales, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="out must be"):
        decode_mxfp4_into(blocks, scales, torch.empty(3, 5, 32, dtype=torch.bfloat16))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU runs the kernels natively")
def test_triton_kernels_in_the_interpreter_equal_the_torch_references() -> None:
    """Where Triton is installed without a GPU, its CPU interpreter runs the real kernels.

    In a fresh process: TRITON_INTERPRET must be set before triton is first imported.
    """
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
    code += "import test_forward_fast as t; t.interpreter_checks()"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def interpreter_checks() -> None:
    """The Triton kernels against their torch references (run by the test above)."""
    from versa_kernels.gptoss import moe_triton, mxfp4_triton

    gen = torch.Generator().manual_seed(8)
    blocks = torch.randint(0, 256, (3, 70, 2, 16), generator=gen).to(torch.uint8)
    scales = torch.randint(100, 140, (3, 70, 2), generator=gen).to(torch.uint8)
    out = torch.empty(3, 70, 64, dtype=torch.bfloat16)
    mxfp4_triton._launch(blocks, scales, out)
    ref = decode_mxfp4(blocks, scales, dtype=torch.bfloat16)
    assert torch.equal(out.view(torch.int16), ref.view(torch.int16))  # -0 stays -0
    S, F, E, D, T, K = 37, 40, 5, 70, 11, 3
    h, bias = torch.randn(S, 2 * F, generator=gen) * 4, torch.randn(E, 2 * F, generator=gen)
    expert = torch.randint(0, E, (S,), generator=gen)
    z = moe_triton.swiglu_bias(h, bias, expert, alpha=1.702, limit=7.0)
    torch.testing.assert_close(z, swiglu(h + bias[expert]), atol=1e-5, rtol=1e-5)
    y, down_bias = torch.randn(T * K, D, generator=gen), torch.randn(E, D, generator=gen)
    idx = torch.randint(0, E, (T, K), generator=gen)
    row_of = torch.randperm(T * K, generator=gen).view(T, K)
    gates = torch.softmax(torch.randn(T, K, generator=gen), dim=-1)
    got, norms = moe_triton.combine(y, down_bias, idx, row_of, gates)
    y_e = y[row_of.reshape(-1)].view(T, K, D) + down_bias[idx]  # [T, K, D]
    torch.testing.assert_close(got, (y_e * gates[..., None]).sum(1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(norms, y_e.norm(dim=-1), atol=1e-5, rtol=1e-5)
    from versa_kernels.signals_triton import logsumexp_rows

    logits = (torch.randn(6, 5000, generator=gen) * 4).bfloat16()
    logits[1] = float("-inf")
    logits[1, 7] = 3.0  # a row with one finite entry
    torch.testing.assert_close(
        logsumexp_rows(logits), torch.logsumexp(logits.float(), -1), atol=1e-5, rtol=1e-6
    )


@pytest.mark.gpu
@needs_cuda
class TestFastPathsCuda:
    def test_triton_decode_is_bit_identical(self) -> None:
        gen = torch.Generator().manual_seed(4)
        blocks = torch.randint(0, 256, (4, 96, 90, 16), generator=gen).to(torch.uint8).cuda()
        scales = torch.randint(100, 140, (4, 96, 90), generator=gen).to(torch.uint8).cuda()
        assert triton_decode_usable(blocks.device), "Triton decode fell back to the reference"
        out = torch.empty(4, 96, 2880, dtype=torch.bfloat16, device="cuda")
        decode_mxfp4_into(blocks, scales, out)
        ref = decode_mxfp4(blocks, scales, dtype=torch.bfloat16)
        assert torch.equal(out.view(torch.int16), ref.view(torch.int16))

    def test_cuda_flash_attention_matches_reference(self) -> None:
        gen = torch.Generator().manual_seed(5)
        B, N, G, d, T = 1, 64, 8, 64, 700
        q, k, v = (torch.randn(B, h, T, d, generator=gen).cuda() for h in (N, G, G))
        sinks = torch.randn(N, generator=gen).cuda()
        for window in (128, None):
            ref = sdpa_with_sinks(q, k, v, sinks, sm_scale=0.125, sliding_window=window)
            fast = sdpa_with_sinks_flash(
                q.bfloat16(), k.bfloat16(), v.bfloat16(), sinks.bfloat16(), sm_scale=0.125,
                sliding_window=window,
            ).float()  # fmt: skip
            err = (fast - ref).abs().max().item() / ref.abs().max().item()
            flash_window = attention._window_flash_usable(q.device, torch.bfloat16)
            print(f"flash bf16 vs fp32 reference, window {window}: max rel err {err:.2e} "
                  f"(flash kernel's own window: {flash_window})")  # fmt: skip
            assert err < 0.02

    def test_cuda_mxfp4_model_equals_dense_model(self, ids) -> None:
        # The committed trained model: no tokenizer build needed on the GPU box.
        dense = GptOssModel.from_checkpoint(
            TRAINED, dtype=torch.bfloat16, device="cuda", expert_format="dense"
        )
        packed = GptOssModel.from_checkpoint(TRAINED, dtype=torch.bfloat16, device="cuda")
        assert packed.mxfp4_experts
        assert torch.equal(_logits(dense, ids.cuda()), _logits(packed, ids.cuda()))

    def test_fused_moe_kernels_match_the_torch_grouped_path(self) -> None:
        gen = torch.Generator().manual_seed(6)
        T, E, D, F, K = 300, 8, 256, 192, 4
        x = torch.randn(T, D, generator=gen)
        weights = [
            torch.randn(E, D, generator=gen) * D**-0.5, torch.randn(E, generator=gen) * 0.1,
            torch.randn(E, 2 * F, D, generator=gen) * D**-0.5, torch.randn(E, 2 * F, generator=gen),
            torch.randn(E, D, F, generator=gen) * F**-0.5, torch.randn(E, D, generator=gen),
        ]  # fmt: skip
        ref, ref_idx, _, ref_norm = moe_grouped(x, *weights, top_k=K)  # fp32 CPU
        xb, wb = x.cuda().bfloat16(), [w.cuda().bfloat16() for w in weights]
        with torch.inference_mode():
            fused = moe_grouped(xb, *wb, top_k=K)
            plain = moe_grouped(xb, *wb, top_k=K, fused=False)
        assert torch.equal(fused[1], plain[1])  # same routing
        with torch.inference_mode():  # experts 3 at a time (how MXFP4 layers are decoded)
            chunked = moe_grouped(
                xb, wb[0], wb[1], None, wb[3], None, wb[5], top_k=K, experts_per_chunk=3,
                weights_for=lambda a, b: (wb[2][a:b], wb[4][a:b]),
            )  # fmt: skip
        torch.testing.assert_close(chunked[0], fused[0], atol=1e-2, rtol=1e-2)
        torch.testing.assert_close(chunked[3], fused[3], atol=1e-2, rtol=1e-2)
        with torch.inference_mode():  # a decode step: 2 tokens, only the hit experts decoded
            one_by_one = moe_grouped(
                xb[:2], wb[0], wb[1], None, wb[3], None, wb[5], top_k=K, experts_per_chunk=1,
                weights_for=lambda a, b: (wb[2][a:b], wb[4][a:b]),
            )  # fmt: skip
            whole = moe_grouped(xb[:2], *wb, top_k=K)
        torch.testing.assert_close(one_by_one[0], whole[0], atol=1e-2, rtol=1e-2)
        scale = ref.abs().max().item()
        for name, got in (("fused", fused), ("torch", plain)):
            same = (got[1].cpu() == ref_idx).all(dim=1)  # tokens routed as in fp32
            out_err = (got[0].float().cpu() - ref)[same].abs().max().item() / scale
            norm_err = ((got[3].cpu() - ref_norm) / ref_norm)[same].abs().max().item()
            print(f"{name} bf16 MoE vs fp32: out {out_err:.2e} of max, norms {norm_err:.2e} rel")
            assert out_err < 0.02 and norm_err < 0.02, name


def test_export_of_an_mxfp4_resident_model_round_trips(tiny, ids, tmp_path) -> None:
    from versa_kernels.gptoss.export import save_mxfp4_checkpoint

    packed = GptOssModel.from_checkpoint(tiny, expert_format="mxfp4")
    out = save_mxfp4_checkpoint(packed, tmp_path / "again", dtype=torch.float32)
    again = GptOssModel.from_checkpoint(out, expert_format="mxfp4")
    assert torch.equal(_logits(packed, ids), _logits(again, ids))
