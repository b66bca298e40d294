"""validate_expert_math_toy: PASS with the real math, FAIL (and a FAIL report) with a wrong one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from versa_kernels.errors import ParameterError
from versa_kernels.gptoss.expert_math import moe_reference, router_logits
from versa_kernels.validate import TOY_CASES, ExpertMathMismatch, ToyCase, run_validation

SMALL_CASE = (ToyCase(experts=8, top_k=4, hidden=64, intermediate=64, tokens=16),)


def _moe_without_plus_one(
    x, router_w, router_b, gate_up, gate_up_bias, down, down_bias, *, top_k, alpha, limit
):
    """Wrong: SwiGLU without the `+ 1` on the up half."""
    gates, indices = torch.topk(router_logits(x, router_w, router_b), top_k, dim=-1)  # [T, K]
    gates = gates.softmax(-1)
    out = torch.zeros_like(x)  # [T, D]
    for slot in range(top_k):
        e = indices[:, slot]  # [T]
        h = torch.einsum("td,tod->to", x, gate_up[e]) + gate_up_bias[e]  # [T, 2F]
        gate, up = h[:, 0::2].clamp(max=limit), h[:, 1::2].clamp(-limit, limit)
        z = gate * torch.sigmoid(alpha * gate) * up  # missing (up + 1)
        y = torch.einsum("tf,tdf->td", z, down[e]) + down_bias[e]  # [T, D]
        out += gates[:, slot, None] * y
    return out


def _moe_softmax_before_topk(
    x, router_w, router_b, gate_up, gate_up_bias, down, down_bias, *, top_k, alpha, limit
):
    """Wrong: softmax over all E experts, then top-k, without renormalising."""
    probs = router_logits(x, router_w, router_b).softmax(-1)  # [T, E]
    gates, indices = torch.topk(probs, top_k, dim=-1)  # [T, K], weights no longer sum to 1
    # sum_k p_k y_k with p = softmax over all E equals the exact output times the kept mass sum_k p_k
    exact = moe_reference(
        x,
        router_w,
        router_b,
        gate_up,
        gate_up_bias,
        down,
        down_bias,
        top_k=top_k,
        alpha=alpha,
        limit=limit,
    )
    return exact * gates.sum(-1, keepdim=True)


def test_validation_passes_on_cpu_and_writes_report(tmp_path: Path) -> None:
    report = tmp_path / "reports" / "validate_gpt_oss_expert_math_toy.md"
    result = run_validation(
        seeds=[0],
        trials=1,
        device="cpu",
        dtype="auto",
        report_path=report,
        command="versa-run --task validate_expert_math_toy --trials 1",
    )
    assert result.passed and result.mxfp4_exact and result.dtype == "float32"
    assert result.max_abs <= 1e-5
    ran = [c for c in result.cases if c.skipped is None]
    assert {c.implementation for c in ran} >= {"eager"} and len({c.case for c in ran}) == len(
        TOY_CASES
    )
    assert all(c.routing_equal and c.clamped_frac > 0.001 for c in ran)  # the clamps are exercised
    text = report.read_text()
    for needle in ("**Result: PASS**", "| device | cpu", "| torch | ", "| transformers | ", "max_abs_error",
                   "max_rel_error", "max abs error <= 1e-05", "versa-run --task validate_expert_math_toy --trials 1"):  # fmt: skip
        assert needle in text, needle


@pytest.mark.parametrize("wrong", [_moe_without_plus_one, _moe_softmax_before_topk])
def test_wrong_formula_is_reported_as_fail(tmp_path: Path, wrong) -> None:
    report = tmp_path / "r.md"
    with pytest.raises(ExpertMathMismatch, match="FAILED"):
        run_validation(
            seeds=[0], trials=1, device="cpu", report_path=report, expert_fn=wrong, cases=SMALL_CASE
        )
    assert "**Result: FAIL**" in report.read_text()


def test_wrong_formula_fails_in_bfloat16_too(tmp_path: Path) -> None:
    result = run_validation(
        seeds=[0],
        trials=1,
        device="cpu",
        dtype="bfloat16",
        report_path=tmp_path / "ok.md",
        cases=SMALL_CASE,
    )
    assert result.passed and result.scaled <= 5e-2
    with pytest.raises(ExpertMathMismatch):
        run_validation(seeds=[0], trials=1, device="cpu", dtype="bfloat16", report_path=tmp_path / "bad.md",
                       expert_fn=_moe_without_plus_one, cases=SMALL_CASE)  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"device": "tpu"}, "device must be one of \\['auto', 'cpu', 'cuda'\\]"),
        ({"dtype": "int8"}, "dtype must be one of"),
        ({"trials": 0}, "trials must be >= 1"),
        ({"seeds": []}, "seeds must be a non-empty list"),
    ],
)
def test_bad_parameters_fail_before_work(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ParameterError, match=message):
        run_validation(report_path=tmp_path / "r.md", **kwargs)
    assert not (tmp_path / "r.md").exists()


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (bf16 GPU tolerance)"
)
class TestGpu:
    def test_validation_passes_on_gpu_bf16(self, tmp_path: Path) -> None:
        result = run_validation(
            seeds=[0, 1], trials=3, device="cuda", dtype="bfloat16", report_path=tmp_path / "r.md"
        )
        assert result.passed, f"max abs {result.max_abs:.3e}, scaled {result.scaled:.3e}"

    def test_validation_passes_on_gpu_fp32(self, tmp_path: Path) -> None:
        result = run_validation(
            seeds=[0], trials=3, device="cuda", dtype="float32", report_path=tmp_path / "r.md"
        )
        assert result.passed, f"max abs {result.max_abs:.3e}, mean-free scaled {result.scaled:.3e}"
