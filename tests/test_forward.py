"""The project's gpt-oss forward vs transformers' GptOssForCausalLM, and what it exposes.

All on the generated tiny checkpoints (real MXFP4 layout) of `versa_kernels.fixtures`: 4 layers,
8 experts, top-4, sliding window 4 on even layers, YaRN, non-trivial sinks/biases/norms; the
sequences are longer than the window. transformers loads the same files with
`Mxfp4Config(dequantize=True)` and eager attention.
"""

from __future__ import annotations

import pytest
import torch
from transformers import GptOssForCausalLM, Mxfp4Config
from versa_kernels.errors import CheckpointFormatError, ParameterError
from versa_kernels.fixtures.model import make_tiny_checkpoint
from versa_kernels.gptoss.attention import sdpa_with_sinks, sdpa_with_sinks_fused
from versa_kernels.gptoss.expert_math import expert_forward, moe_grouped, moe_reference
from versa_kernels.gptoss.export import save_mxfp4_checkpoint
from versa_kernels.gptoss.model import GptOssModel

FP32_LOGIT_TOLERANCE = 1e-4  # issue 3: ours vs transformers, fp32, CPU
BF16_REL_TOLERANCE = 0.05  # bf16 vs fp32: max |diff| / max |fp32 logit| (bf16 has 8 mantissa bits)
CUDA_BF16_MEAN_REL_TOLERANCE = 0.01  # mean |bf16 CUDA - fp32 CPU| / max |fp32 logit|
SEQ = 29  # > sliding window (4) and > the query chunk used below


def _hf(path, **overrides) -> GptOssForCausalLM:
    model = GptOssForCausalLM.from_pretrained(
        path,
        quantization_config=Mxfp4Config(dequantize=True),
        attn_implementation="eager",
        dtype=torch.float32,
        **overrides,
    )
    return model.eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> object:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("fwd") / "tiny", seed=3)


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 1000, (2, SEQ), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def ours(tiny) -> GptOssModel:
    return GptOssModel.from_checkpoint(tiny)


def _logits(model: GptOssModel, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model.logits(model(ids, **kwargs).hidden).float()


def test_logits_match_transformers_fp32(tiny, ours, ids) -> None:
    hf = _hf(tiny)
    with torch.no_grad():
        expected = hf(ids).logits
    got = _logits(ours, ids)  # the fused attention (the default)
    ours.query_chunk, ours.fused_attention = 8, False  # reference: several windowed query chunks
    try:
        got_reference = _logits(ours, ids)
    finally:
        ours.query_chunk, ours.fused_attention = 1024, True
    for label, logits in (("fused", got), ("reference", got_reference)):
        diff = (logits - expected).abs().max().item()
        assert diff < FP32_LOGIT_TOLERANCE, f"max |ours ({label}) - transformers| = {diff:.3e}"
    # The comparison is meaningful: logits vary, sinks are non-zero, later layers matter.
    assert expected.std().item() > 0.1
    assert all(layer.self_attn.sinks.abs().min() > 0 for layer in ours.model.layers)
    assert ours.model.layers[0].self_attn.sliding_window == 4 < SEQ


def test_fused_attention_and_query_chunks_agree_with_reference(ours, ids) -> None:
    fused = _logits(ours, ids)
    ours.fused_attention = False
    try:
        reference = _logits(ours, ids)
        ours.query_chunk = 3
        chunked = _logits(ours, ids)
    finally:
        ours.query_chunk, ours.fused_attention = 1024, True
    assert (chunked - reference).abs().max().item() < 1e-5
    assert (fused - reference).abs().max().item() < 1e-4


@pytest.mark.parametrize("window", [None, 5])
def test_sdpa_fused_matches_reference_with_grads(window) -> None:
    gen = torch.Generator().manual_seed(1)
    Q = torch.randn(2, 4, 17, 8, generator=gen, requires_grad=True)
    K = torch.randn(2, 2, 17, 8, generator=gen, requires_grad=True)
    V = torch.randn(2, 2, 17, 8, generator=gen, requires_grad=True)
    S = torch.randn(4, generator=gen, requires_grad=True)
    ref = sdpa_with_sinks(Q, K, V, S, sm_scale=0.35, sliding_window=window, query_chunk=4)
    grads_ref = torch.autograd.grad(ref.square().sum(), (Q, K, V, S))
    fused = sdpa_with_sinks_fused(Q, K, V, S, sm_scale=0.35, sliding_window=window)
    grads_fused = torch.autograd.grad(fused.square().sum(), (Q, K, V, S))
    torch.testing.assert_close(fused, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads_fused, grads_ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_grouped_moe_equals_plain_reference() -> None:
    gen = torch.Generator().manual_seed(2)
    E, D, F, T = 6, 32, 32, 40
    w = [
        torch.randn(E, D, generator=gen),
        torch.randn(E, generator=gen),
        torch.randn(E, 2 * F, D, generator=gen) * 0.5,
        torch.randn(E, 2 * F, generator=gen),
        torch.randn(E, D, F, generator=gen) * 0.2,
        torch.randn(E, D, generator=gen),
    ]
    x = torch.randn(T, D, generator=gen)
    out, indices, gates, norms = moe_grouped(x, *w, top_k=3)
    torch.testing.assert_close(out, moe_reference(x, *w, top_k=3), atol=1e-5, rtol=1e-5)
    assert indices.shape == gates.shape == norms.shape == (T, 3)


def test_moe_trace_equals_brute_force(ours, ids) -> None:
    """Per token and slot: top-k of W x + b, softmax over those k, ||y_e|| of that expert alone."""
    captured: dict[int, torch.Tensor] = {}
    hooks = [
        layer.mlp.register_forward_pre_hook(lambda m, args, i=i: captured.__setitem__(i, args[0]))
        for i, layer in enumerate(ours.model.layers)
    ]
    try:
        with torch.no_grad():
            traces = ours(ids, collect_moe=True).moe
    finally:
        for hook in hooks:
            hook.remove()
    assert traces is not None and [t.layer for t in traces] == [0, 1, 2, 3]
    for trace in traces:
        mlp = ours.model.layers[trace.layer].mlp
        x = captured[trace.layer]  # [B*T, D] MoE input (post-attention RMSNorm)
        assert trace.indices.shape == (ids.numel(), ours.top_k)
        for t in range(0, x.shape[0], 7):  # every 7th token keeps the brute force fast
            logits = mlp.router.weight @ x[t] + mlp.router.bias  # [E]
            order = sorted(range(len(logits)), key=lambda e: -logits[e].item())[: ours.top_k]
            assert trace.indices[t].tolist() == order
            top = torch.stack([logits[e] for e in order])
            torch.testing.assert_close(trace.gates[t], torch.softmax(top, 0), atol=1e-6, rtol=1e-5)
            e_ = mlp.experts
            for k, e in enumerate(order):
                y = expert_forward(
                    x[t : t + 1], e_.gate_up[e], e_.gate_up_bias[e], e_.down[e], e_.down_bias[e]
                )
                assert abs(trace.expert_out_norm[t, k].item() - y.norm().item()) < 1e-4


def test_router_mask_equals_physically_sliced_experts(tiny, ours, ids) -> None:
    keep = [[0, 2, 3, 5, 7], [1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 6, 7], [2, 4, 5, 6, 7]]
    masks = [torch.zeros(8, dtype=torch.bool).index_fill_(0, torch.tensor(k), True) for k in keep]
    masked = _logits(ours, ids, router_mask=masks)
    sliced = GptOssModel.from_checkpoint(tiny, experts_keep=keep)
    assert sliced.experts_per_layer == sliced.config.experts_per_layer == (5, 4, 8, 5)
    assert (_logits(sliced, ids) - masked).abs().max().item() < 1e-5
    assert (masked - _logits(ours, ids)).abs().max().item() > 1e-3  # masking changed something


def test_per_layer_expert_counts_round_trip_through_mxfp4_files(tmp_path, tiny, ids) -> None:
    keep = [[0, 1, 2, 3, 4, 5], [1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 6, 7], [3, 4, 5, 6, 7]]
    sliced = GptOssModel.from_checkpoint(tiny, experts_keep=keep)
    path = save_mxfp4_checkpoint(sliced, tmp_path / "per_layer")
    reloaded = GptOssModel.from_checkpoint(path)
    assert reloaded.config.experts_per_layer == (6, 4, 8, 5)
    out = reloaded(ids, collect_moe=True)
    assert all(int(t.indices.max()) < n for t, n in zip(out.moe, (6, 4, 8, 5), strict=True))
    # Expert weights were already MXFP4 values, so re-encoding is exact; others are bf16 on disk.
    assert (_logits(reloaded, ids) - _logits(sliced, ids)).abs().max().item() < 1e-5


def test_top_k_override_matches_transformers_and_rejects_bad_values(tiny, ids) -> None:
    ours_k2 = GptOssModel.from_checkpoint(tiny, top_k=2)
    with torch.no_grad():
        expected = _hf(tiny, num_experts_per_tok=2)(ids).logits
    assert (_logits(ours_k2, ids) - expected).abs().max().item() < FP32_LOGIT_TOLERANCE
    assert ours_k2(ids, collect_moe=True).moe[0].indices.shape[1] == 2
    with pytest.raises(ParameterError, match="top_k must be between 1 and 8"):
        GptOssModel.from_checkpoint(tiny, top_k=9)
    with pytest.raises(ParameterError, match="top_k must be between 1 and 4"):
        GptOssModel.from_checkpoint(tiny, top_k=5, experts_keep=[[0, 1, 2, 3]] * 4)
    with pytest.raises(ParameterError, match="router_mask\\[1\\] keeps 3 experts"):
        mask = torch.tensor([True, True, True] + [False] * 5)
        ours_k2.set_top_k(4)
        ours_k2(ids, router_mask=[None, mask, None, None])


def test_bf16_runs_and_is_close_to_fp32(tiny, ours, ids) -> None:
    bf16 = GptOssModel.from_checkpoint(tiny, dtype=torch.bfloat16)
    assert bf16.model.layers[0].mlp.experts.gate_up.dtype == torch.bfloat16
    assert bf16.model.norm.weight.dtype == torch.float32  # norms stay fp32, like transformers
    got, reference = _logits(bf16, ids), _logits(ours, ids)
    rel = (got - reference).abs().max().item() / reference.abs().max().item()
    assert rel < BF16_REL_TOLERANCE, f"bf16 max diff / max logit = {rel:.3e}"


def test_logit_chunks_cover_all_tokens_without_the_full_matrix(ours, ids) -> None:
    with torch.no_grad():
        hidden = ours(ids).hidden
        full = ours.logits(hidden).reshape(-1, ours.config.vocab_size)
        chunks = list(ours.iter_logit_chunks(hidden, 10))
    assert [start for start, _ in chunks] == list(range(0, ids.numel(), 10))
    assert max(c.shape[0] for _, c in chunks) == 10
    torch.testing.assert_close(torch.cat([c for _, c in chunks]), full)
    with pytest.raises(ParameterError, match="chunk_tokens"):
        next(ours.iter_logit_chunks(hidden, 0))


def test_training_path_is_differentiable(ours, ids) -> None:
    ours.zero_grad()
    with torch.enable_grad():
        ours.requires_grad_(True)
        loss = ours.logits(ours(ids).hidden).logsumexp(-1).mean()
        loss.backward()
    grads = [p.grad for p in ours.parameters()]
    ours.requires_grad_(False)
    assert all(g is not None for g in grads)
    assert ours.model.layers[3].mlp.experts.gate_up.grad.abs().sum() > 0
    assert ours.model.layers[0].self_attn.sinks.grad.abs().sum() > 0


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (run by the lead on an H100)"
)
class TestCudaBf16:
    """bf16 on CUDA vs fp32 on CPU.

    Documented tolerance: mean |diff| <= 1% of the largest |fp32 logit|. The max is reported,
    not asserted: in bf16 a router near-tie can pick a different expert for a few tokens, which
    moves those tokens' logits by several percent (CPU bf16 on the trained model: max 12%,
    mean 0.1%).
    """

    def test_cuda_bf16_matches_cpu_fp32(self, tiny, ours, ids) -> None:
        cuda = GptOssModel.from_checkpoint(tiny, dtype=torch.bfloat16, device="cuda")
        got = _logits(cuda, ids.cuda()).cpu()
        reference = _logits(ours, ids)
        diff = (got - reference).abs()
        scale = reference.abs().max().item()
        report = (
            f"tiny fixture bf16 CUDA vs fp32 CPU: max abs diff {diff.max().item():.4e}, "
            f"mean abs diff {diff.mean().item():.4e}, max |fp32 logit| {scale:.3f}"
        )
        print(report)  # the lead copies this line into BENCHMARKS.md
        assert diff.mean().item() <= CUDA_BF16_MEAN_REL_TOLERANCE * scale, report


def test_from_hf_state_dict_matches_transformers_and_load_errors_name_tensors(tiny, ids) -> None:
    hf = _hf(tiny)
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    ours = GptOssModel.from_hf_state_dict(GptOssModel.from_checkpoint(tiny).config, state)
    with torch.no_grad():
        assert (_logits(ours, ids) - hf(ids).logits).abs().max().item() < FP32_LOGIT_TOLERANCE
    del state["model.layers.2.self_attn.sinks"]
    with pytest.raises(
        CheckpointFormatError, match=r"missing \['model.layers.2.self_attn.sinks'\]"
    ):
        GptOssModel.from_hf_state_dict(ours.config, state)


def test_model_moe_block_fast_path_equals_its_reference(ours) -> None:
    x = torch.randn(37, ours.config.hidden_size, generator=torch.Generator().manual_seed(5))
    for layer in ours.model.layers:
        with torch.no_grad():
            fast, *_ = layer.mlp(x, top_k=ours.top_k, expert_mask=None)
            torch.testing.assert_close(
                fast, layer.mlp.reference(x, top_k=ours.top_k), atol=1e-5, rtol=1e-5
            )
