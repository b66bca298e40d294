"""The hand-written MoE math equals transformers' GptOss router, experts and MLP (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch
from transformers import GptOssConfig
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts, GptOssMLP
from versa_kernels.gptoss.expert_math import (
    expert_forward,
    moe_reference,
    route_topk,
    swiglu,
)

TOLERANCE = 1e-5
D, F, E, K = 64, 96, 8, 4


def _hf_config(num_experts: int = E, top_k: int = K) -> GptOssConfig:
    cfg = GptOssConfig(
        hidden_size=D,
        intermediate_size=F,
        num_local_experts=num_experts,
        num_experts_per_tok=top_k,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        vocab_size=32,
    )
    cfg._experts_implementation = "eager"
    return cfg


def _random_weights(seed: int, num_experts: int = E) -> dict[str, torch.Tensor]:
    """Reference-orientation weights large enough that both SwiGLU clamps are hit."""
    g = torch.Generator().manual_seed(seed)
    return {
        "router_w": torch.randn(num_experts, D, generator=g),
        "router_b": torch.randn(num_experts, generator=g),
        "gate_up": torch.randn(num_experts, 2 * F, D, generator=g) * 0.5,
        "gate_up_bias": torch.randn(num_experts, 2 * F, generator=g),
        "down": torch.randn(num_experts, D, F, generator=g) * 0.1,
        "down_bias": torch.randn(num_experts, D, generator=g),
    }


def _load_hf_mlp(w: dict[str, torch.Tensor], cfg: GptOssConfig) -> GptOssMLP:
    mlp = GptOssMLP(cfg)
    with torch.no_grad():
        mlp.router.weight.copy_(w["router_w"])
        mlp.router.bias.copy_(w["router_b"])
        # transformers keeps the input-major transposes: [E, D, 2F] and [E, F, D].
        mlp.experts.gate_up_proj.copy_(w["gate_up"].transpose(1, 2))
        mlp.experts.gate_up_proj_bias.copy_(w["gate_up_bias"])
        mlp.experts.down_proj.copy_(w["down"].transpose(1, 2))
        mlp.experts.down_proj_bias.copy_(w["down_bias"])
    return mlp


def test_route_topk_is_softmax_over_kept_logits_only() -> None:
    logits = torch.tensor([[3.0, 1.0, 2.0, -5.0, 0.5]])
    gates, indices = route_topk(logits, 2)
    assert indices.tolist() == [[0, 2]]
    expected = torch.softmax(torch.tensor([3.0, 2.0]), dim=0)
    torch.testing.assert_close(gates[0], expected)
    # A softmax over all five first would give smaller (not renormalized) weights.
    assert not torch.allclose(gates[0], torch.softmax(logits[0], dim=0)[[0, 2]])


def test_route_topk_rejects_k_beyond_experts() -> None:
    with pytest.raises(ValueError, match="k must be in"):
        route_topk(torch.zeros(3, 4), 5)


def test_swiglu_clamps_and_interleave() -> None:
    # gate = even positions, up = odd positions.
    h = torch.tensor([[10.0, -10.0, 1.0, 2.0]])
    z = swiglu(h, alpha=1.702, limit=7.0)
    gate = torch.tensor([7.0, 1.0])  # 10 clamped to 7 from above
    up = torch.tensor([-7.0, 2.0])  # -10 clamped to -7
    torch.testing.assert_close(z[0], gate * torch.sigmoid(1.702 * gate) * (up + 1))
    # The gate has no lower clamp: a very negative gate passes through unclamped.
    z_neg = swiglu(torch.tensor([[-20.0, 0.0]]))
    torch.testing.assert_close(z_neg, torch.tensor([[-20.0 * torch.sigmoid(torch.tensor(-34.04))]]))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_moe_reference_matches_transformers_mlp(seed: int) -> None:
    w = _random_weights(seed)
    mlp = _load_hf_mlp(w, _hf_config())
    x = torch.randn(2, 13, D, generator=torch.Generator().manual_seed(100 + seed))
    with torch.no_grad():
        expected, _ = mlp(x)
        got = moe_reference(x.reshape(-1, D), **w, top_k=K).reshape(2, 13, D)
    diff = (got - expected).abs().max().item()
    assert diff < TOLERANCE, f"max abs diff {diff:.3e}"
    # The weights were chosen large enough that the clamps matter for this check.
    h = torch.einsum("td,efd->tef", x.reshape(-1, D), w["gate_up"])  # [T, E, 2F]
    assert (h[..., 0::2] > 7.0).any() and (h[..., 1::2].abs() > 7.0).any()


def test_expert_forward_matches_transformers_experts_per_expert() -> None:
    w = _random_weights(7)
    experts = _load_hf_mlp(w, _hf_config()).experts
    x = torch.randn(5, D, generator=torch.Generator().manual_seed(8))
    for expert in range(E):
        # Route every token to `expert` alone with weight 1: transformers returns y_e itself.
        indices = torch.full((5, 1), expert)
        weights = torch.ones(5, 1)
        with torch.no_grad():
            expected = experts(x, indices, weights)
            got = expert_forward(
                x,
                w["gate_up"][expert],
                w["gate_up_bias"][expert],
                w["down"][expert],
                w["down_bias"][expert],
            )
        assert (got - expected).abs().max().item() < TOLERANCE


def test_router_matches_transformers_router() -> None:
    w = _random_weights(3)
    mlp = _load_hf_mlp(w, _hf_config())
    x = torch.randn(11, D, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        _, hf_scores, hf_indices = mlp.router(x)
        gates, indices = route_topk(x @ w["router_w"].T + w["router_b"], K)
    assert torch.equal(indices, hf_indices)
    torch.testing.assert_close(gates, hf_scores, atol=TOLERANCE, rtol=0)


def test_hf_experts_class_is_the_one_compared() -> None:
    """Guard: the comparison above must go through GptOssExperts, not a patched class."""
    assert isinstance(_load_hf_mlp(_random_weights(0), _hf_config()).experts, GptOssExperts)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the grouped-GEMM path needs CUDA")
class TestGroupedGemmCuda:
    """`moe_grouped`'s CUDA bf16 path (two torch._grouped_mm calls) against the expert loop."""

    def test_grouped_gemm_equals_the_loop(self) -> None:
        from versa_kernels.gptoss.expert_math import _grouped_gemm_usable, moe_grouped

        w = {k: v.to("cuda", torch.bfloat16) for k, v in _random_weights(7, num_experts=32).items()}
        args = (
            w["router_w"],
            w["router_b"],
            w["gate_up"],
            w["gate_up_bias"],
            w["down"],
            w["down_bias"],
        )
        x = torch.randn(300, D, generator=torch.Generator().manual_seed(1)).to(
            "cuda", torch.bfloat16
        )
        with torch.inference_mode():
            assert _grouped_gemm_usable(x, w["gate_up"])
            fast = moe_grouped(x, *args, top_k=K)
        with torch.enable_grad():  # autograd on: the loop path
            assert not _grouped_gemm_usable(x, w["gate_up"])
            loop = moe_grouped(x, *args, top_k=K)
        assert torch.equal(fast[1], loop[1]) and torch.equal(fast[2], loop[2])  # same routing
        scale = loop[0].float().abs().max().item()
        out_diff = (fast[0].float() - loop[0].float()).abs().max().item()
        norm_diff = (fast[3] - loop[3]).abs().max().item() / loop[3].max().item()
        print(f"grouped GEMM vs loop, bf16: max |dout| {out_diff:.3e} (max |out| {scale:.3f}), "
              f"max relative |dnorm| {norm_diff:.3e}")  # fmt: skip
        assert out_diff <= 2e-2 * scale and norm_diff <= 2e-2
