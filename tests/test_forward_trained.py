"""The committed trained tiny MoE: loadable everywhere, small, predicts Python, experts specialize."""

from __future__ import annotations

import json
import math
import sysconfig
from pathlib import Path

import pytest
import torch
import versa_kernels
from transformers import AutoTokenizer, GptOssForCausalLM, Mxfp4Config
from versa_kernels.gptoss.model import GptOssModel

TRAINED = Path(versa_kernels.__file__).parent / "data" / "tiny_moe_trained"
MAX_BYTES = 8 * 1024 * 1024  # issue 3: committed in MXFP4, at most 8 MB
HELD_OUT = "logging/handlers.py"  # held out by train_tiny_moe.py (every 20th sorted file)
SEQ = 256


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TRAINED)


@pytest.fixture(scope="module")
def model() -> GptOssModel:
    return GptOssModel.from_checkpoint(TRAINED)


@pytest.fixture(scope="module")
def code_ids(tokenizer) -> torch.Tensor:
    text = (Path(sysconfig.get_paths()["stdlib"]) / HELD_OUT).read_text(encoding="utf-8")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][: 8 * (SEQ + 1)]
    return torch.tensor(ids).view(8, SEQ + 1)  # [8, SEQ+1]


def _loss(model: GptOssModel, ids: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model.logits(model(ids[:, :-1]).hidden).float()  # [B, T, V]
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).item()


def test_checkpoint_is_small_complete_and_mxfp4() -> None:
    files = {p.name: p.stat().st_size for p in TRAINED.iterdir() if p.is_file()}
    assert sum(files.values()) <= MAX_BYTES, f"{sum(files.values())} bytes"
    for name in ("config.json", "model.safetensors.index.json", "tokenizer.json", "train_log.json",
                 "TRAINING.md", "loss_curve.png", "generation_config.json"):  # fmt: skip
        assert name in files, name
    config = json.loads((TRAINED / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "mxfp4"
    assert (
        config["num_hidden_layers"],
        config["num_local_experts"],
        config["num_experts_per_tok"],
    ) == (4, 16, 4)
    weight_map = json.loads((TRAINED / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.0.mlp.experts.gate_up_proj_blocks" in weight_map
    log = json.loads((TRAINED / "train_log.json").read_text())
    assert len(log["curve"]) == log["steps"] and log["curve"][-1]["loss"] < log["curve"][0]["loss"]


def test_transformers_loads_it_and_agrees(model, code_ids) -> None:
    hf = GptOssForCausalLM.from_pretrained(
        TRAINED,
        quantization_config=Mxfp4Config(dequantize=True),
        attn_implementation="eager",
        dtype=torch.float32,
    ).eval()
    ids = code_ids[:2, :-1]
    with torch.no_grad():
        expected = hf(ids).logits
        got = model.logits(model(ids).hidden)
    assert (got - expected).abs().max().item() < 1e-4


def test_predicts_held_out_python_far_better_than_chance(model, code_ids) -> None:
    loss = _loss(model, code_ids)
    chance = math.log(model.config.vocab_size)
    shuffled = code_ids[
        :, torch.randperm(code_ids.shape[1], generator=torch.Generator().manual_seed(0))
    ]
    shuffled_loss = _loss(model, shuffled)
    print(f"held-out loss {loss:.4f}, shuffled {shuffled_loss:.4f}, chance {chance:.4f}")
    assert loss < 0.6 * chance, f"held-out loss {loss:.3f} vs chance {chance:.3f}"
    assert loss < shuffled_loss - 1.0  # it models order, not just token frequencies


def _untrained_like(model: GptOssModel) -> GptOssModel:
    """The same architecture at the training script's initialisation (normal 0.02, zero biases)."""
    torch.manual_seed(0)
    fresh = GptOssModel(model.config)
    with torch.no_grad():
        for name, param in fresh.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith("bias") or name.endswith("sinks"):
                param.zero_()
            else:
                param.normal_(0.0, 0.02)
    return fresh.eval()


def _mutual_information_bits(labels: torch.Tensor, experts: torch.Tensor, n_experts: int) -> float:
    joint = torch.zeros(int(labels.max()) + 1, n_experts, dtype=torch.float64)
    joint.index_put_(
        (labels, experts), torch.ones(len(labels), dtype=torch.float64), accumulate=True
    )
    joint /= joint.sum()
    outer = joint.sum(1, keepdim=True) @ joint.sum(0, keepdim=True)
    nz = joint > 0
    return float((joint[nz] * (joint[nz] / outer[nz]).log2()).sum())


def test_experts_specialize_by_token_kind(model, tokenizer, code_ids) -> None:
    """Routing carries more information about the token's kind than at initialisation.

    A random router already depends on the token, so the yardstick is the same architecture at
    its untrained initialisation on the same tokens: training must raise MI(expert; kind).
    """
    ids = code_ids[:, :-1]
    texts = [tokenizer.decode([t]) for t in ids.reshape(-1).tolist()]
    kinds = torch.tensor(
        [0 if s.strip() == "" else 1 if s.strip().isidentifier() else 2 for s in texts]
    )
    with torch.no_grad():
        trained = model(ids, collect_moe=True).moe
        untrained = _untrained_like(model)(ids, collect_moe=True).moe
    ratios = []
    for after, before in zip(trained, untrained, strict=True):
        n = model.experts_per_layer[after.layer]
        labels = kinds.repeat_interleave(after.indices.shape[1])  # one label per routed slot
        mi_after = _mutual_information_bits(labels, after.indices.reshape(-1), n)
        mi_before = _mutual_information_bits(labels, before.indices.reshape(-1), n)
        assert mi_after > 1.5 * mi_before, (
            f"layer {after.layer}: MI {mi_after:.4f} vs init {mi_before:.4f}"
        )
        ratios.append(mi_after / mi_before)
    assert sum(ratios) / len(ratios) > 2.0, ratios
    # And routing is not collapsed: every expert of every layer receives some tokens.
    for trace in trained:
        assert torch.bincount(trace.indices.reshape(-1), minlength=16).min() > 0


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (run by the lead on an H100)"
)
class TestTrainedCudaBf16:
    """bf16 CUDA vs fp32 CPU on the trained model.

    Documented tolerance: mean |diff| <= 1% of the largest |fp32 logit| and the held-out loss
    within 0.02 nats. The max is reported, not asserted: bf16 router near-ties flip an expert for
    a few tokens (CPU bf16 on the same windows: max 1.76 = 12% of max |logit|, mean 0.017, loss
    2.9110 -> 2.9101).
    """

    def test_cuda_bf16_matches_cpu_fp32(self, model, code_ids) -> None:
        cuda = GptOssModel.from_checkpoint(TRAINED, dtype=torch.bfloat16, device="cuda")
        ids = code_ids[:, :-1]
        with torch.no_grad():
            got = cuda.logits(cuda(ids.cuda()).hidden).float().cpu()
            reference = model.logits(model(ids).hidden)
        diff = (got - reference).abs()
        scale = reference.abs().max().item()
        loss_fp32, loss_bf16 = _loss(model, code_ids), _loss(cuda, code_ids.cuda())
        report = (
            f"trained tiny MoE bf16 CUDA vs fp32 CPU: max abs diff {diff.max().item():.4e}, "
            f"mean abs diff {diff.mean().item():.4e}, max |fp32 logit| {scale:.3f}, "
            f"loss fp32 {loss_fp32:.4f} vs bf16 CUDA {loss_bf16:.4f}"
        )
        print(report)  # the lead copies this line into BENCHMARKS.md
        assert diff.mean().item() <= 0.01 * scale, report
        assert abs(loss_bf16 - loss_fp32) <= 0.02, report
