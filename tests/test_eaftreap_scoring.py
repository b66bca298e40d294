"""EAFT-REAP accumulators: brute force through transformers, label position, resume."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from versa_kernels.eaftreap.profile import CalibExample, prepare_examples, profile_experts
from versa_kernels.eaftreap.scoring import (
    EaftWeights,
    ExpertAccumulators,
    kendall_tau,
    split_half_tau,
)

NUM_ROWS = 4
MAX_SEQ = 80
ACC_NAMES = list(ExpertAccumulators.zeros(1, 1).state())


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    from transformers import AutoTokenizer
    from versa_kernels.fixtures import make_calib_packs, make_tiny_checkpoint
    from versa_kernels.gptoss.model import GptOssModel
    from versa_kernels.packs import load_packs

    root = tmp_path_factory.mktemp("scoring")
    ckpt = make_tiny_checkpoint(root / "tiny", layers=2, experts=8, top_k=2)
    packs = make_calib_packs(root / "packs", rows=8)
    sample = load_packs(packs, num_rows=NUM_ROWS, seed=3407)
    tok = AutoTokenizer.from_pretrained(ckpt)
    texts = [r.text for r in sample.rows]
    examples = prepare_examples(texts, tok, max_seq_length=MAX_SEQ)
    return ckpt, GptOssModel.from_checkpoint(ckpt), examples, texts, tok


def _transformers_pass(ckpt: Path, examples: list[CalibExample]) -> list[tuple]:
    """Per example: p, H of each prediction and, per layer and position, every expert's route.

    Loops over every expert through transformers' own router and experts modules (the MoE
    inputs are captured with a test-only pre-hook), so each norm is computed independently of
    the project's grouped forward.
    """
    from transformers import GptOssForCausalLM, Mxfp4Config

    hf = GptOssForCausalLM.from_pretrained(
        ckpt, quantization_config=Mxfp4Config(dequantize=True), dtype=torch.float32
    ).eval()
    layers = hf.model.layers
    num_experts = layers[0].mlp.experts.num_experts
    captured: dict[int, torch.Tensor] = {}
    hooks = [
        layer.mlp.register_forward_pre_hook(
            lambda mod, args, i=i: captured.__setitem__(i, args[0].reshape(-1, args[0].shape[-1]))
        )
        for i, layer in enumerate(layers)
    ]
    per_example = []
    with torch.no_grad():
        for ex in examples:
            logits = hf(ex.input_ids[None]).logits[0]  # [T, V]
            pos = ex.positions
            z = logits[pos]  # [N, V] predictions of tokens pos + 1
            p = z.softmax(-1).gather(1, ex.input_ids[pos + 1][:, None])[:, 0]
            q = z.topk(20, dim=-1).values.double().softmax(-1)  # [N, 20]
            h = (-(q * q.log()).sum(-1) / math.log(20)).float()
            routes = []
            for i, layer in enumerate(layers):
                x = captured[i]  # [T, D] MoE input at every position
                _, gates, idx = layer.mlp.router(x)  # [T, K], [T, K]
                ones = torch.ones(len(x), 1)
                y = torch.stack(
                    [
                        layer.mlp.experts(x, torch.full((len(x), 1), e), ones)
                        for e in range(num_experts)
                    ]
                )  # [E, T, D]: each expert's output for every token
                routes.append((idx, gates, y.norm(dim=-1).T.gather(1, idx)))  # norms [T, K]
            per_example.append((pos, p, h, routes))
    for hook in hooks:
        hook.remove()
    return per_example


def _brute_force(per_example: list[tuple], shift: int) -> dict[str, np.ndarray]:
    """Accumulate with each prediction's label attached at position t + shift."""
    weights = EaftWeights()
    p_all = torch.cat([e[1] for e in per_example])
    thr = weights.thresholds(p_all, torch.cat([e[2] for e in per_example]))
    num_layers, num_experts = len(per_example[0][3]), 8
    acc = ExpertAccumulators.zeros(num_layers, num_experts)
    for pos, p, h, routes in per_example:
        _, w = weights.token_weights(p, h, thr)
        for i, (idx, gates, norms) in enumerate(routes):
            at = pos + shift
            acc.add(i, idx[at], gates[at], norms[at], w)
    return acc.state()


def _profile(model, examples, **kwargs):
    return profile_experts(model, examples, num_layers=2, num_experts=8, batch_size=2, **kwargs)


def test_accumulators_equal_brute_force_and_the_label_sits_at_the_predicting_position(
    setup,
) -> None:
    ckpt, model, examples, _, _ = setup
    # Drop the last predicting position so position t + 1 exists for the shifted variant.
    examples = [
        CalibExample(e.input_ids, e.positions[e.positions < len(e.input_ids) - 2]) for e in examples
    ]
    ours = _profile(model, examples).acc.state()
    assert ours["count"].sum() == 2 * 2 * sum(len(e.positions) for e in examples)  # L * K * N
    assert ours["neg_count"].sum() > 0  # confident conflicts exist, so the -2 weight is exercised
    per_example = _transformers_pass(ckpt, examples)
    right = _brute_force(per_example, shift=0)
    for name in ACC_NAMES:
        scale = np.abs(right[name]).max()
        np.testing.assert_allclose(
            ours[name], right[name], rtol=1e-4, atol=1e-4 * scale, err_msg=name
        )
    # Attaching each label one position later (the original code's off-by-one) differs.
    late = _brute_force(per_example, shift=1)
    diff = np.abs(late["eaft_gate_norm_sum"] - ours["eaft_gate_norm_sum"]).max()
    assert diff > 1e-2 * np.abs(ours["eaft_gate_norm_sum"]).max()


def test_profile_resumes_after_a_crash_with_the_same_result(setup, tmp_path: Path) -> None:
    _, model, examples, _, _ = setup
    clean = _profile(model, examples)
    # The two half accumulators (even / odd batches) partition the sums exactly.
    assert np.array_equal(clean.halves[0].count + clean.halves[1].count, clean.acc.count)
    taus = split_half_tau(clean.halves, "eaft_gate_norm_sum")
    assert len(taus) == 2 and all(-1.0 <= t <= 1.0 for t in taus)
    scores = np.array([3.0, 1.0, 2.0, 5.0])
    assert kendall_tau(scores, scores * 7) == pytest.approx(1.0)
    assert kendall_tau(scores, -scores) == pytest.approx(-1.0)
    state = tmp_path / "profile_state.pt"

    def crash(pass_no: int, done: int, total: int) -> None:
        if pass_no == 2 and done == 1:
            raise KeyboardInterrupt  # the process "dies" after the first pass-2 batch

    with pytest.raises(KeyboardInterrupt):
        _profile(model, examples, state_path=state, save_every_batches=1, on_batch=crash)
    assert state.is_file()
    seen: list[tuple[int, int]] = []
    resumed = _profile(
        model, examples, state_path=state, save_every_batches=1,
        on_batch=lambda p, d, t: seen.append((p, d)),
    )  # fmt: skip
    assert resumed.resumed_from_batch == 2 + 1  # both pass-1 batches, 1 pass-2 batch
    assert seen == [(2, 2)]  # only the remaining batch ran
    for name in ACC_NAMES:
        assert np.array_equal(getattr(resumed.acc, name), getattr(clean.acc, name)), name
    assert (resumed.p_lo, resumed.h_lo) == (clean.p_lo, clean.h_lo)
    # A finished state keeps only the sums: re-running the build re-cuts without profiling.
    seen.clear()
    again = profile_experts(
        None, examples, num_layers=2, num_experts=8, batch_size=2, state_path=state,
        model_loader=lambda: pytest.fail("a finished profile must not load the model"),
        on_batch=lambda p, d, t: seen.append(p),
    )  # fmt: skip
    assert seen == [] and np.array_equal(again.acc.eaft_gate_norm_sum, clean.acc.eaft_gate_norm_sum)
    assert (
        "p" in torch.load(state, weights_only=True)
        and not torch.load(state, weights_only=True)["p"]
    )
    # A state written for other inputs is ignored, not silently reused.
    other = _profile(model, examples[:2], state_path=state)
    assert other.resumed_from_batch == 0 and other.acc.count.sum() < clean.acc.count.sum()


def test_max_tokens_per_row_strides_the_scored_positions(setup) -> None:
    _, _, examples, texts, tok = setup
    full = examples[0].positions
    (capped,) = prepare_examples(texts[:1], tok, max_seq_length=MAX_SEQ, max_tokens_per_row=5)
    assert len(full) > 5
    assert capped.positions.tolist() == full[(torch.arange(5) * len(full)) // 5].tolist()
    # Every scored position predicts a completion token: position t is kept iff t + 1 is.
    from versa_kernels.harmony import completion_mask

    ids, mask = completion_mask(texts[0], tok, max_length=MAX_SEQ)
    assert full.tolist() == [t for t in range(len(ids) - 1) if mask[t + 1]]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
class TestOnGpu:
    """The same profile on CUDA: fp32 must match the CPU sums; bf16 must keep the ranking."""

    def test_cuda_profile_matches_cpu(self, setup) -> None:
        from versa_kernels.gptoss.model import GptOssModel

        ckpt, model, examples, _, _ = setup
        cpu = _profile(model, examples).acc
        for dtype, rtol in ((torch.float32, 1e-3), (torch.bfloat16, 5e-2)):
            gpu_model = GptOssModel.from_checkpoint(ckpt, dtype=dtype, device="cuda")
            gpu = _profile(gpu_model, examples).acc
            assert np.array_equal(gpu.count, cpu.count) or dtype == torch.bfloat16
            diff = np.abs(gpu.gate_norm_sum - cpu.gate_norm_sum).max()
            scale = np.abs(cpu.gate_norm_sum).max()
            assert diff <= rtol * scale, (
                f"{dtype}: max diff {diff:.3g}, mean {np.abs(gpu.gate_norm_sum - cpu.gate_norm_sum).mean():.3g}"
            )


def test_score_keys_are_totals_or_per_hit_means() -> None:
    from versa_kernels.eaftreap.scoring import SCORE_KEYS

    acc = ExpertAccumulators.zeros(1, 3)
    idx = torch.tensor([[0, 1], [0, 2], [0, 1]])  # 3 positions, top-2
    gates = torch.tensor([[0.6, 0.4], [0.9, 0.1], [0.5, 0.5]])
    norms = torch.tensor([[2.0, 4.0], [1.0, 8.0], [3.0, 6.0]])
    acc.add(0, idx, gates, norms, torch.tensor([1.0, -2.0, 0.25]))
    assert acc.score("count").tolist() == [[3.0, 2.0, 1.0]]
    assert acc.score("norm_mean") == pytest.approx(np.array([[2.0, 5.0, 8.0]]))  # EAN, no gate
    assert acc.score("saliency_mean") == pytest.approx(np.array([[3.6 / 3, 4.6 / 2, 0.8]]))
    assert acc.score("eaft_gate_norm_sum") == pytest.approx(
        np.array([[1.2 - 1.8 + 0.375, 1.6 + 0.75, -1.6]])
    )
    assert set(SCORE_KEYS) >= {"eaft_gate_norm_sum", "saliency_mean", "count", "norm_mean"}
    with pytest.raises(ValueError, match="score_key"):
        acc.score("nope")
