"""`validate_expert_math_toy`: our gpt-oss MoE math and MXFP4 decode against transformers.

Two checks, both with explicit pass/fail criteria (the earlier harness had none and drew router
indices with replacement, eaftreap_spec.md §1.7 and §11.4):

1. MoE block. For several toy configs (E, k, H, I), seeds and trials, random reference-
   orientation weights go through `expert_math.moe_reference` (or an injected `expert_fn`) and,
   mapped to transformers' orientation (`gate_up_proj = gate_up^T`, `down_proj = down^T`),
   through `transformers`' `GptOssMLP` with each experts implementation it offers (eager,
   batched_mm, grouped_mm). Both sides route the same inputs with the real router (top-k of the
   logits, softmax over those k), so every token has k DISTINCT experts. Weights are scaled so
   the SwiGLU clamps (limit 7) are actually hit; the report states the fraction clamped.
2. MXFP4. `mxfp4.decode_mxfp4` against `transformers.integrations.mxfp4.convert_moe_packed_tensors`
   on random blocks and realistic scale bytes: equal bit for bit (after its transpose).

Tolerances (`TOLERANCES`): float32 requires max |ours - transformers| <= 1e-5 absolute (outputs
are O(1); fp32 accumulation-order noise measured at ~3e-6, gptoss_reference.md §1.9). Half
precisions are judged on the error relative to the largest output, because both sides round
every intermediate: bfloat16 keeps 8 significant bits (unit roundoff 2^-8 = 3.9e-3), and a
different rounding point or accumulation order (grouped GEMM vs. per-expert loop, bf16
`index_add_` of gate-weighted outputs) moves intermediates by an ulp, which the down projection
and the k-way sum carry into the output. Measured on CPU over 4 cases: bfloat16 max 1.9e-2
(5 seeds x 20 trials), float16 max 2.1e-3 (3 seeds x 5 trials). The limits, 5e-2 (bf16) and
1e-2 (fp16), leave ~2.5x and ~5x headroom and stay >= 7x below what wrong
formulas score (no `+1` on up: 0.38; softmax before top-k: 0.63).

The report is written (atomically) before anything raises; a FAIL raises `ExpertMathMismatch`
so the notebook, and with it the run, fails.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from versa_kernels.errors import KernelError, ParameterError
from versa_kernels.fsio import atomic_write_text
from versa_kernels.gptoss.expert_math import SWIGLU_ALPHA, SWIGLU_LIMIT, moe_reference
from versa_kernels.gptoss.mxfp4 import BYTES_PER_BLOCK, VALUES_PER_BLOCK, decode_mxfp4

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")
EXPERT_IMPLEMENTATIONS = ("eager", "batched_mm", "grouped_mm")
DEFAULT_REPORT = "reports/validate_gpt_oss_expert_math_toy.md"
DEFAULT_COMMAND = "versa-run --task validate_expert_math_toy"
REL_FLOOR = 1e-8  # denominator floor of the element-wise relative error (spec §1.7)
GATE_UP_GAIN = 3.0  # h = W1 x has std ~3 for x ~ N(0, 1): a few percent of values pass the clamp
DOWN_GAIN = 0.1  # keeps the MoE output O(1), the scale the float32 absolute tolerance assumes
MXFP4_SCALE_BYTES = (110, 135)  # around the real 20b's observed 118-124, both directions


@dataclass(frozen=True)
class Tolerance:
    """Pass when `metric` ("abs": max |diff|; "scaled": max |diff| / max |ref|) <= `limit`."""

    metric: str
    limit: float

    def passes(self, max_abs: float, scaled: float) -> bool:
        return (max_abs if self.metric == "abs" else scaled) <= self.limit

    def describe(self) -> str:
        name = "max abs error" if self.metric == "abs" else "max abs error / max |reference|"
        return f"{name} <= {self.limit:.0e}"


TOLERANCES = {
    torch.float32: Tolerance("abs", 1e-5),
    torch.bfloat16: Tolerance("scaled", 5e-2),
    torch.float16: Tolerance("scaled", 1e-2),
}


@dataclass(frozen=True)
class ToyCase:
    """One toy MoE shape: E experts, top-k, hidden H, intermediate I, T tokens per trial."""

    experts: int
    top_k: int
    hidden: int
    intermediate: int
    tokens: int


TOY_CASES = (
    ToyCase(experts=8, top_k=2, hidden=256, intermediate=512, tokens=8),  # the original toy (§1.7)
    ToyCase(experts=8, top_k=4, hidden=64, intermediate=96, tokens=16),
    ToyCase(experts=32, top_k=4, hidden=128, intermediate=64, tokens=32),  # 20b's E and k
    ToyCase(experts=5, top_k=4, hidden=64, intermediate=64, tokens=12),  # E not a multiple of 4
)


@dataclass
class CaseResult:
    """Worst errors of one (case, experts implementation) over all seeds and trials."""

    case: ToyCase
    implementation: str
    max_abs: float = 0.0
    max_rel: float = 0.0
    scaled: float = 0.0
    clamped_frac: float = 0.0
    routing_equal: bool = True
    skipped: str | None = None


@dataclass
class ValidationResult:
    """What `run_validation` measured and concluded."""

    passed: bool
    device: str
    dtype: str
    tolerance: str
    max_abs: float
    max_rel: float
    scaled: float
    mxfp4_exact: bool
    cases: list[CaseResult] = field(default_factory=list)
    torch_version: str = ""
    transformers_version: str = ""
    report_path: str = ""


class ExpertMathMismatch(KernelError):
    """Our expert math or MXFP4 decode disagrees with transformers beyond the tolerance."""

    default_hint = "Read the report's per-case table; a formula (top-k/softmax order, clamps, +1, interleave) differs."


ExpertFn = Callable[..., torch.Tensor]


def run_validation(
    *,
    seeds: Sequence[int] = (0, 1, 2),
    trials: int = 5,
    device: str = "auto",
    dtype: str = "auto",
    report_path: str | os.PathLike[str] = DEFAULT_REPORT,
    command: str = DEFAULT_COMMAND,
    expert_fn: ExpertFn | None = None,
    cases: Sequence[ToyCase] = TOY_CASES,
) -> ValidationResult:
    """Compare the MoE math and MXFP4 decode with transformers; write the report; raise on FAIL.

    `expert_fn` replaces `moe_reference` (same signature) so a test can prove a wrong formula is
    reported as FAIL. `device="auto"` picks CUDA when present; `dtype="auto"` is float32 on CPU
    and bfloat16 on CUDA.
    """
    torch_device, torch_dtype = _resolve(seeds, trials, device, dtype)
    fn = expert_fn or moe_reference
    threads = torch.get_num_threads()
    if torch_device.type == "cpu":
        # Toy shapes gain nothing from intra-op threads, and on a busy 2-core CI box the pool's
        # wake-ups dominate: index_add_ on [8, 256] measured 65 ms with 2 threads, 4 us with 1.
        torch.set_num_threads(1)
    try:
        return _validate(seeds, trials, torch_device, torch_dtype, report_path, command, fn, cases)
    finally:
        torch.set_num_threads(threads)


def _validate(
    seeds: Sequence[int], trials: int, torch_device: torch.device, torch_dtype: torch.dtype,
    report_path: str | os.PathLike[str], command: str, fn: ExpertFn, cases: Sequence[ToyCase],
) -> ValidationResult:  # fmt: skip
    import transformers

    results = [
        _run_case(case, impl, seeds, trials, torch_device, torch_dtype, fn)
        for case in cases
        for impl in EXPERT_IMPLEMENTATIONS
    ]
    ran = [r for r in results if r.skipped is None]
    if not any(r.implementation == "eager" for r in ran):
        raise RuntimeError("transformers' eager experts path did not run; nothing was compared")
    mxfp4_exact = all(_mxfp4_exact(case, seed, torch_device) for case in cases for seed in seeds)
    tolerance = TOLERANCES[torch_dtype]
    max_abs, scaled = max(r.max_abs for r in ran), max(r.scaled for r in ran)
    result = ValidationResult(
        passed=mxfp4_exact
        and all(r.routing_equal and tolerance.passes(r.max_abs, r.scaled) for r in ran),
        device=_device_name(torch_device),
        dtype=str(torch_dtype).removeprefix("torch."),
        tolerance=tolerance.describe(),
        max_abs=max_abs,
        max_rel=max(r.max_rel for r in ran),
        scaled=scaled,
        mxfp4_exact=mxfp4_exact,
        cases=results,
        torch_version=torch.__version__,
        transformers_version=transformers.__version__,
        report_path=str(report_path),
    )
    atomic_write_text(
        Path(report_path), render_report(result, seeds=seeds, trials=trials, command=command)
    )
    if not result.passed:
        raise ExpertMathMismatch(
            f"validate_expert_math_toy FAILED: max abs {max_abs:.3e}, scaled {scaled:.3e} "
            f"({tolerance.describe()}), MXFP4 bit-exact: {mxfp4_exact}; see {report_path}"
        )
    return result


def _resolve(
    seeds: Sequence[int], trials: int, device: str, dtype: str
) -> tuple[torch.device, torch.dtype]:
    """Validate parameters (one-line errors naming the allowed values) before any work."""
    if device not in DEVICES:
        raise ParameterError(f"device must be one of {list(DEVICES)}, got {device!r}")
    if dtype not in DTYPES:
        raise ParameterError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    if trials < 1:
        raise ParameterError(f"trials must be >= 1, got {trials}")
    if not seeds or any(int(s) < 0 for s in seeds):
        raise ParameterError(
            f"seeds must be a non-empty list of integers >= 0, got {list(seeds)!r}"
        )
    cuda = torch.cuda.is_available()
    if device == "cuda" and not cuda:
        raise ParameterError(
            "device='cuda' but no CUDA device is visible; use device='auto' or 'cpu'"
        )
    resolved = torch.device("cuda" if device == "cuda" or (device == "auto" and cuda) else "cpu")
    if dtype == "auto":
        return resolved, torch.bfloat16 if resolved.type == "cuda" else torch.float32
    return resolved, getattr(torch, dtype)


def _run_case(
    case: ToyCase, implementation: str, seeds: Sequence[int], trials: int,
    device: torch.device, dtype: torch.dtype, fn: ExpertFn,
) -> CaseResult:  # fmt: skip
    """Worst-case errors of `fn` vs. transformers' GptOssMLP for one case and implementation."""
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP

    hf_config = GptOssConfig(
        hidden_size=case.hidden, intermediate_size=case.intermediate, num_local_experts=case.experts,
        num_experts_per_tok=case.top_k, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=4, head_dim=16, vocab_size=32, swiglu_limit=SWIGLU_LIMIT, swiglu_alpha=SWIGLU_ALPHA,
    )  # fmt: skip
    hf_config._experts_implementation = implementation
    out = CaseResult(case=case, implementation=implementation)
    clamped = total = 0
    for seed in seeds:
        case_seed = int(seed) * 1_000_003 + case.experts * 1009 + case.hidden
        gen = torch.Generator().manual_seed(case_seed)
        for _ in range(trials):
            w = _random_weights(case, gen)
            x = torch.randn(case.tokens, case.hidden, generator=gen)  # [T, H]
            w = {k: v.to(device=device, dtype=dtype) for k, v in w.items()}
            x = x.to(device=device, dtype=dtype)
            mlp = _hf_mlp(GptOssMLP, hf_config, w, device, dtype)
            # an optional fast path missing on this build is reported as skipped, not passed
            try:
                with torch.no_grad():
                    theirs, _scores = mlp(x[None])  # [1, T, H]
                    _logits, _s, hf_indices = mlp.router(x)  # [T, K]
            except Exception as exc:
                if implementation == "eager":
                    raise
                out.skipped = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
                return out
            with torch.no_grad():
                ours = fn(x, w["router_w"], w["router_b"], w["gate_up"], w["gate_up_bias"], w["down"], w["down_bias"],
                          top_k=case.top_k, alpha=SWIGLU_ALPHA, limit=SWIGLU_LIMIT)  # fmt: skip
                logits = torch.nn.functional.linear(x, w["router_w"], w["router_b"])  # [T, E]
                our_indices = torch.topk(logits, case.top_k, dim=-1).indices  # [T, K]
                h = torch.einsum("th,eoh->teo", x.float(), w["gate_up"].float())  # [T, E, 2I]
                h = h + w["gate_up_bias"].float()[None]  # [T, E, 2I]
            _update(out, ours.float(), theirs[0].float())
            same = torch.equal(our_indices.sort(-1).values, hf_indices.sort(-1).values)
            out.routing_equal &= bool(same)
            gate, up = h[..., 0::2], h[..., 1::2]  # [T, E, I] each
            clamped += int((gate > SWIGLU_LIMIT).sum() + (up.abs() > SWIGLU_LIMIT).sum())
            total += h.numel()
    out.clamped_frac = clamped / max(total, 1)
    return out


def _random_weights(case: ToyCase, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Reference-orientation weights; gate/up large enough that the clamps engage."""
    E, H, I = case.experts, case.hidden, case.intermediate  # noqa: E741 - the paper's symbols
    return {
        "router_w": torch.randn(E, H, generator=gen) / H**0.5,  # [E, H]
        "router_b": torch.randn(E, generator=gen) * 0.5,  # [E]
        "gate_up": torch.randn(E, 2 * I, H, generator=gen) * GATE_UP_GAIN / H**0.5,  # [E, 2I, H]
        "gate_up_bias": torch.randn(E, 2 * I, generator=gen) * 0.5,  # [E, 2I]
        "down": torch.randn(E, H, I, generator=gen) * DOWN_GAIN / I**0.5,  # [E, H, I]
        "down_bias": torch.randn(E, H, generator=gen) * 0.1,  # [E, H]
    }


def _hf_mlp(
    cls: type, config: object, w: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype
) -> torch.nn.Module:
    """transformers' GptOssMLP holding the same weights in its own orientation."""
    mlp = cls(config).to(device=device, dtype=dtype).eval()
    with torch.no_grad():
        mlp.router.weight.copy_(w["router_w"])
        mlp.router.bias.copy_(w["router_b"])
        mlp.experts.gate_up_proj.copy_(w["gate_up"].transpose(1, 2))  # [E, H, 2I]
        mlp.experts.gate_up_proj_bias.copy_(w["gate_up_bias"])
        mlp.experts.down_proj.copy_(w["down"].transpose(1, 2))  # [E, I, H]
        mlp.experts.down_proj_bias.copy_(w["down_bias"])
    return mlp


def _update(out: CaseResult, ours: torch.Tensor, theirs: torch.Tensor) -> None:
    diff = (ours - theirs).abs()
    out.max_abs = max(out.max_abs, float(diff.max()))
    out.max_rel = max(out.max_rel, float((diff / theirs.abs().clamp_min(REL_FLOOR)).max()))
    out.scaled = max(out.scaled, float(diff.max() / theirs.abs().max().clamp_min(REL_FLOOR)))
    if not torch.isfinite(ours).all():
        out.max_abs = out.scaled = out.max_rel = float("inf")


def _mxfp4_exact(case: ToyCase, seed: int, device: torch.device) -> bool:
    """decode_mxfp4 == transformers' convert_moe_packed_tensors (transposed), bit for bit."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    gen = torch.Generator().manual_seed(int(seed))
    groups = case.hidden // VALUES_PER_BLOCK
    shape = (case.experts, 2 * case.intermediate, groups)
    blocks = torch.randint(0, 256, (*shape, BYTES_PER_BLOCK), dtype=torch.uint8, generator=gen).to(
        device
    )
    scales = torch.randint(*MXFP4_SCALE_BYTES, shape, dtype=torch.uint8, generator=gen).to(device)
    ours = decode_mxfp4(blocks, scales, dtype=torch.bfloat16)  # [E, 2I, H]
    theirs = convert_moe_packed_tensors(
        blocks.clone(), scales.clone(), dtype=torch.bfloat16
    )  # [E, H, 2I]
    return bool(
        torch.equal(
            ours.transpose(1, 2).contiguous().view(torch.int16),
            theirs.contiguous().view(torch.int16),
        )
    )


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()})"


def render_report(
    result: ValidationResult, *, seeds: Sequence[int], trials: int, command: str
) -> str:
    """The markdown report: environment, tolerance, per-case table, verdict, reproduce command."""
    verdict = "PASS" if result.passed else "FAIL"
    lines = [
        "# validate_gpt_oss_expert_math_toy",
        "",
        "Checks `versa_kernels.gptoss.expert_math.moe_reference` (router with bias, top-k then softmax over k, "
        "interleaved clamped SwiGLU with `+1`, down bias, weighted sum) against transformers' `GptOssMLP` "
        "(each experts implementation), and `decode_mxfp4` against `convert_moe_packed_tensors`.",
        "",
        f"**Result: {verdict}**",
        "",
        "| field | value |",
        "|---|---|",
        f"| device | {result.device} |",
        f"| dtype | {result.dtype} |",
        f"| torch | {result.torch_version} |",
        f"| transformers | {result.transformers_version} |",
        f"| seeds x trials | {list(seeds)} x {trials} |",
        f"| max_abs_error | {result.max_abs:.3e} |",
        f"| max_rel_error (element-wise, floor {REL_FLOOR:g}) | {result.max_rel:.3e} |",
        f"| max abs error / max abs reference | {result.scaled:.3e} |",
        f"| tolerance | {result.tolerance} |",
        f"| MXFP4 decode bit-exact vs transformers | {'yes' if result.mxfp4_exact else 'NO'} |",
        "",
        "| E | k | H | I | tokens | experts impl | max abs | max rel | abs / max ref | clamped | routing equal | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result.cases:
        c = r.case
        status = f"skipped ({r.skipped})" if r.skipped else "ok"
        lines.append(
            f"| {c.experts} | {c.top_k} | {c.hidden} | {c.intermediate} | {c.tokens} | {r.implementation} | "
            f"{r.max_abs:.3e} | {r.max_rel:.3e} | {r.scaled:.3e} | {r.clamped_frac:.2%} | {'yes' if r.routing_equal else 'NO'} | {status} |"
        )
    lines += [
        "",
        "Router indices come from the real router (top-k of random logits), so each token has k distinct "
        "experts. The element-wise relative error is large where outputs cross zero; the pass criterion "
        "uses the absolute error (float32) or the error relative to the largest output (half precision).",
        "",
        "Reproduce:",
        "",
        "```",
        command,
        "```",
        "",
    ]
    return "\n".join(lines)
