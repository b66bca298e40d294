"""Task registry: name -> notebook, parameters (declared once, as `params.Param`), host-side
validation, declared outputs.

Each task runs one notebook from `notebooks/`. Its flags, their help, their validation and the
notebook's parameters cell all come from the task's `Param` list (`versa_runner.params`); a test
checks every notebook against it. Every value is typed, range-checked and cross-checked here, on
the host, before anything is staged or uploaded (DESIGN.md "Tasks"): a flag a task does not take
is an error naming the flag, never ignored. Defaults come from the playbook (seeds/000) and
eaftreap_spec Appendix A.
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from versa_runner import params
from versa_runner.errors import ConfigError, UsageError
from versa_runner.params import Param, did_you_mean, parse_flags, task_parser

NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"
KAGGLE_20B_PATH = "/kaggle/input/gpt-oss-20b/transformers/default/1"
CALIB_PACKS_REPO = "radna0/harmony-qwen3-calib-packs-v2-20260113"
CALIB_PACK_FILES = (
    "packs/reasoning_style_10k_v2/reasoning_style_10k_v2.parquet,"
    "tool_agentic_10k_v6.parquet,"
    "packs/calib_prompt_10000_v2/calib_prompt_10000_v2.parquet"
)
SEED = 3407
SCORE_KEYS = (
    "eaft_gate_norm_sum", "gate_norm_sum", "eaft_saliency_mean", "saliency_mean",
    "pos_gate_norm_sum", "norm_sum", "gate_sum", "count",
)  # fmt: skip


@dataclass(frozen=True)
class Task:
    """A named job: which notebook runs it, which flags it takes, what it writes."""

    name: str
    notebook: str
    summary: str
    params: tuple[Param, ...]
    outputs: tuple[str, ...]
    check: Callable[[dict[str, Any]], None] | None = None

    def notebook_path(self, notebooks_dir: Path | None = None) -> Path:
        """The task's notebook (in the repository's `notebooks/` unless told otherwise)."""
        return (notebooks_dir or NOTEBOOKS_DIR) / f"{self.notebook}.ipynb"

    def param(self, flag: str) -> Param | None:
        """The parameter with this flag, or None."""
        return next((p for p in self.params if p.flag == flag), None)


def parse_task_args(task: Task, argv: Sequence[str]) -> dict[str, Any]:
    """Parse a task's flags (`--flag value`, `--flag=value`, `--bool-flag`, `--no-bool-flag`) into
    validated parameters, defaults filled in."""
    return validate(task, parse_flags(task.name, task.params, argv))


def validate(task: Task, given: dict[str, Any]) -> dict[str, Any]:
    """Fill defaults, check required flags and the task's cross-field rules; returns all params."""
    return params.validate(task.name, task.params, given, task.check)


def input_checks(task: Task, values: dict[str, Any]) -> list[dict[str, Any]]:
    """What preflight checks where the job runs (checkpoint, pack files, top-k), before any
    GPU time; see `params.input_checks` and `versa_runner.target.inputs`."""
    return params.input_checks(task.params, values)


def get_task(name: str) -> Task:
    """The registered task called `name`; an unknown name lists the known ones."""
    try:
        return TASKS[name]
    except KeyError:
        raise UsageError(
            f"unknown task {name!r}{did_you_mean(name, list(TASKS))}; known tasks: "
            f"{', '.join(TASKS)}",
            hint="`versa-run --task TASK --help` shows a task's flags.",
        ) from None


def notebook_owner(notebook: str) -> Task:
    """The task whose defaults a shared notebook's parameters cell shows (the first registered)."""
    return next(task for task in TASKS.values() if task.notebook == notebook)


def parameters_cell(task: Task) -> str:
    """The parameters cell `task`'s notebook carries, generated from the declaration."""
    return params.parameters_cell(task.params)


def notebook_parameters(path: Path) -> dict[str, str]:
    """Names and source text of the assignments in a notebook's `parameters` cell."""
    import nbformat  # only the notebook checks need it; `versa-run --help` stays light

    notebook = nbformat.read(path, as_version=nbformat.NO_CONVERT)  # type: ignore[no-untyped-call]
    cells = [c for c in notebook.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(cells) != 1:
        raise ConfigError(f"{path}: expected one cell tagged `parameters`, found {len(cells)}")
    source = "".join(cells[0].source)
    return {
        target.id: ast.get_source_segment(source, node.value) or ""
        for node in ast.parse(source).body
        if isinstance(node, ast.Assign)
        for target in node.targets
        if isinstance(target, ast.Name)
    }


def notebook_mismatches(task: Task, path: Path | None = None) -> list[str]:
    """How the notebook's parameters cell differs from `task`'s declaration (empty: in step).

    Every notebook parameter needs a flag and every flag a notebook parameter; the notebook's
    owner (`notebook_owner`) must carry exactly the generated cell, defaults included.
    """
    path = path or task.notebook_path()
    found = notebook_parameters(path)
    declared = {p.name for p in task.params} | {params.RUN_ID}
    problems = [f"{path.name}: parameter {name!r} has no flag in task {task.name}"
                for name in sorted(set(found) - declared)]  # fmt: skip
    problems += [f"{path.name}: flag of {name!r} (task {task.name}) is not a notebook parameter"
                 for name in sorted(declared - set(found))]  # fmt: skip
    if not problems and notebook_owner(task.notebook) is task:
        import nbformat

        notebook = nbformat.read(path, as_version=nbformat.NO_CONVERT)  # type: ignore[no-untyped-call]
        cell = next(c for c in notebook.cells if "parameters" in c.metadata.get("tags", []))
        if "".join(cell.source) != parameters_cell(task):
            problems.append(f"{path.name}: parameters cell differs from tasks.parameters_cell"
                            f"({task.name!r}) (defaults or help drifted)")  # fmt: skip
    return problems


def task_help(task: Task) -> str:
    """Help for one task's flags (shown by `versa-run --task T --help`), from its declaration."""
    notebook = f"notebook: notebooks/{task.notebook}.ipynb"
    writes = "writes:\n" + "\n".join(f"  {out}" for out in task.outputs)
    parser = task_parser(task.name, task.params, description=f"{task.summary}\n\n{notebook}",
                         epilog=writes)  # fmt: skip
    return parser.format_help()


# ---- cross-field checks (need no data) -------------------------------------------------------


def _check_build_pruned(values: dict[str, Any]) -> None:
    if values["min_keep_per_layer"] > values["max_keep_per_layer"]:
        raise UsageError(
            f"--min-keep-per-layer ({values['min_keep_per_layer']}) is larger than "
            f"--max-keep-per-layer ({values['max_keep_per_layer']})",
            hint="Lower --min-keep-per-layer or raise --max-keep-per-layer.",
        )
    if values["calib_pack_sample_strategy"] == "weighted":
        weights = values["calib_pack_weights_csv"]
        if not weights:
            raise UsageError("--calib-pack-sample-strategy weighted needs --calib-pack-weights-csv")
        if len(weights) != len(values["calib_pack_files"]):
            raise UsageError(
                f"--calib-pack-weights-csv has {len(weights)} weights for "
                f"{len(values['calib_pack_files'])} --calib-pack-files"
            )
    elif values["calib_pack_weights_csv"]:
        raise UsageError(
            "--calib-pack-weights-csv is only used with --calib-pack-sample-strategy weighted"
        )
    if values["core_pos_top_m"] > values["min_keep_per_layer"]:
        raise UsageError(
            f"--core-pos-top-m ({values['core_pos_top_m']}) exceeds --min-keep-per-layer "
            f"({values['min_keep_per_layer']}): the safety core would not fit"
        )


def _check_keepfrac(values: dict[str, Any]) -> None:
    _check_build_pruned(values)
    if values["layout"] != "uniform":
        raise UsageError(
            "--layout: the keepfrac task keeps the same count in every layer; allowed: uniform",
            hint="Use build_pruned_20b_eaftreap_budgeted for a per-layer layout.",
        )


def _check_plan(values: dict[str, Any]) -> None:
    import json

    try:
        plan = json.loads(values["plan"])
    except ValueError as exc:
        raise UsageError(f"--plan: expected a JSON plan, got {values['plan'][:40]!r} ({exc})",
                         hint="Write plans with `versa-run playbook` or `versa-run recipe run`.") from None  # fmt: skip
    if not isinstance(plan, dict) or not isinstance(plan.get("steps"), list) or not plan["steps"]:
        raise UsageError("--plan: expected a JSON object with a non-empty 'steps' list")


# ---- the registry -----------------------------------------------------------------------------
# One row per flag: (flag, kind, default, help, keyword options). Kept as a table on purpose.

# fmt: off
_MODEL_PATH = Param("--model-path", "str", KAGGLE_20B_PATH, "checkpoint directory on the target",
                    target_check="checkpoint")
_BATCH = Param("--batch-size", "int", 1, "sequences per forward batch", low=1, high=4096)
_PACKS_REPO = Param("--calib-packs-repo", "str", CALIB_PACKS_REPO, "HF dataset repo of calibration packs")
_PACK_FILES = Param("--calib-pack-files", "str_csv", CALIB_PACK_FILES, "pack parquet files in the repo",
                    target_check="pack_files")
_COUNT: dict[str, Any] = {"low": 1, "high": 4096}  # expert counts and multiples
_GPUS = Param("--gpus", "int", 1, "GPUs of the host to spread batches over (torchrun ranks)", low=1, high=64)
_TOKENS: dict[str, Any] = {"low": 1, "high": 1_048_576}  # token lengths
_SAVE_EVERY_S = Param("--save-every-s", "float", 300.0, "seconds between saves of the resumable "
                      "state (what `versa-run resume` continues from)", low=1, high=86_400)


def _build_params(*, keep_frac: Param, layout_default: str) -> tuple[Param, ...]:
    return (
        _MODEL_PATH, _PACKS_REPO, _PACK_FILES,
        Param("--calib-pack-sample-strategy", "choice", "per_file", "how rows are drawn from packs",
              choices=("per_file", "weighted", "concat")),
        Param("--calib-pack-weights-csv", "float_csv", None, "per-file weights (weighted only)", low=0, low_open=True),
        Param("--num-rows", "int", 2000, "calibration rows to profile", low=1, high=10_000_000),
        Param("--seed", "int", SEED, "sampling seed", low=0, high=2**32 - 1),
        Param("--max-seq-length", "int", 4096, "tokens per calibration row", low=16, high=1_048_576),
        _BATCH,
        keep_frac,
        Param("--min-keep-per-layer", "int", 16, "fewest experts kept in a layer", **_COUNT,
              target_check="keep_per_layer"),
        Param("--max-keep-per-layer", "int", 32, "most experts kept in a layer", **_COUNT),
        Param("--core-pos-top-m", "int", 4, "safety core: top experts by positive mass", low=0, high=4096),
        Param("--core-count-top-m", "int", 0, "safety core: top experts by hit count", low=0, high=4096),
        Param("--keep-n-multiple-of", "int", 4, "round kept counts up to a multiple", **_COUNT),
        Param("--layout", "choice", layout_default, "checkpoint layout of the kept experts",
              choices=("per-layer", "uniform")),
        Param("--score-key", "choice", "eaft_gate_norm_sum", "accumulator experts are ranked by", choices=SCORE_KEYS),
        Param("--eaft-cc-quantile", "float", 0.15, "confident-conflict quantile", low=0, high=0.5, low_open=True),
        Param("--eaft-weight-good", "float", 1.0, "token weight of the good class"),
        Param("--eaft-weight-cc", "float", -2.0, "token weight of confident conflicts"),
        Param("--eaft-weight-uncertain", "float", 0.25, "token weight of uncertain tokens"),
        Param("--out-dir", "str", "", "pruned checkpoint directory (default under artifacts/)"),
        Param("--overwrite", "bool", False, "replace an existing --out-dir"),
        Param("--max-tokens-per-row", "int", 0, "cap on completion tokens scored per row "
              "(0: score every completion token)", low=0, high=1_048_576),
        Param("--baseline-eval-rows", "int", 0, "held-out rows for the PPL of EAFT-REAP vs "
              "frequency vs random (0: skip)", low=0, high=1_000_000),
        Param("--baseline-random-seeds", "int", 5, "random prunes averaged in the baseline "
              "comparison", low=1, high=1000),
        Param("--from-scores", "str", "", "re-cut from this reap-scores.yaml: no profile, no "
              "forward (calibration flags are then the file's)"),
        _SAVE_EVERY_S,
        _GPUS,
    )


_BUILD_OUTPUTS = tuple(
    f"artifacts/20b_pruned_models_eaftreap_budgeted/{name}"
    for name in ("manifest.json", "keep_counts_by_layer.json", "core_experts_by_layer.json",
                 "reap-scores.yaml", "reap-recipe.yaml", "scores.parquet")
)

_TASK_LIST = (
    Task(
        "validate_expert_math_toy", "validate_expert_math_toy",
        "Check the per-expert MoE loop against transformers' GptOssExperts on a toy config.",
        (
            Param("--seeds", "int_csv", str(SEED), "random seeds, one pass each", low=0, high=2**32 - 1),
            Param("--trials", "int", 20, "random trials per seed", low=1, high=100_000),
            Param("--device", "choice", "auto", "where the math runs", choices=("auto", "cpu", "cuda")),
            Param("--dtype", "choice", "auto", "compute dtype (auto: float32 on CPU, bfloat16 on CUDA)",
                  choices=("auto", "float32", "bfloat16", "float16")),
        ),
        ("reports/validate_gpt_oss_expert_math_toy.md",),
    ),
    Task(
        "build_pruned_20b_eaftreap_budgeted", "build_pruned",
        "Profile EAFT-REAP scores on calibration packs, allocate a per-layer expert budget with a "
        "safety core, and rewrite the checkpoint.",
        _build_params(keep_frac=Param("--keep-frac", "float", 0.75, "fraction of experts kept overall",
                                      low=0, high=1, low_open=True), layout_default="per-layer"),
        _BUILD_OUTPUTS,
        _check_build_pruned,
    ),
    Task(
        "build_pruned_20b_eaftreap_keepfrac", "build_pruned",
        "Like the budgeted task with the same kept count in every layer; one variant per keep_frac.",
        _build_params(keep_frac=Param("--keep-frac", "float_csv", "0.75", "fractions kept, one variant each",
                                      low=0, high=1, low_open=True), layout_default="uniform"),
        tuple(out.replace("_budgeted", "_keepfrac") for out in _BUILD_OUTPUTS),
        _check_keepfrac,
    ),
    Task(
        "eaft_single", "eaft_single",
        "Collect per-token probability/entropy statistics of one model on fixed blocks.",
        (
            Param("--model-id", "str", None, "label of the model (names the JSON)", required=True),
            Param("--model-path", "str", "", "checkpoint directory (default: resolve --model-id)",
                  target_check="checkpoint"),
            _PACKS_REPO, _PACK_FILES,
            Param("--seq-lens-csv", "int_csv", "1024,2048", "block lengths in tokens", **_TOKENS),
            Param("--num-blocks", "int", 256, "blocks per sequence length", low=1, high=1_000_000),
            _BATCH,
            Param("--sample-points", "int", 200_000, "(p, H) points kept for plots", low=0, high=100_000_000),
            Param("--top-k", "int", 4, "experts routed per token", low=1, high=128,
                  target_check="experts_per_token"),
            Param("--entropy-top-k", "int", 20, "entropy over the top-k renormalized probs", low=2, high=1024),
            _SAVE_EVERY_S,
            _GPUS,
            Param("--block-offset", "int", 0, "skip this many blocks first (num_blocks: disjoint "
                  "blocks of the same size, for the noise floor)", low=0, high=1_000_000),
        ),
        ("artifacts/eaft_models/<run_id>/<model_id>.json",),
    ),
    Task(
        "decode_bench", "decode_bench",
        "Measure decode throughput per batch size (SGLang, vLLM, or the native engine).",
        (
            Param("--name", "str", None, "label of this benchmark (names the outputs)", required=True),
            Param("--model-path", "str", None, "checkpoint directory on the target", required=True,
                  target_check="checkpoint"),
            Param("--prompt-len", "int", 256, "prompt length in tokens (not characters)", **_TOKENS),
            Param("--max-new-tokens", "int", 2048, "tokens generated per request", **_TOKENS),
            Param("--batch-sizes", "int_csv", "1,2,4,8,16,32", "concurrent requests per pass", **_COUNT),
            Param("--engine", "choice", "auto", "decode engine (auto: SGLang, else vLLM, else native)", choices=("auto", "sglang", "vllm", "native")),
            Param("--repeats", "int", 3, "timed passes per batch size (the median is reported)", low=1, high=100),
            Param("--warmup", "int", 1, "untimed passes per batch size before timing", low=0, high=100),
        ),
        ("artifacts/decode_bench/<name>.json", "reports/decode_bench_<name>.md"),
    ),
    Task(
        "playbook", "playbook",
        "Run a plan of steps (validate, build, eaft_single, gate summary, decode_bench) as one "
        "job; written by `versa-run playbook`, `versa-run recipe run` and `versa-run demo`.",
        (Param("--plan", "str", None, "the steps, as JSON (versa_runner.recipes.plan)", required=True),),
        ("reports/playbook_<run_id>.json", "reports/notebooks/<run_id>_<step>.ipynb",
         "every step's outputs"),
        _check_plan,
    ),
)
# fmt: on

TASKS: dict[str, Task] = {task.name: task for task in _TASK_LIST}
