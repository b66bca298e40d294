"""CLI surface: parsing and validation errors (one line naming the flag), help, no torch at import."""

from __future__ import annotations

import subprocess
import sys

import pytest

from versa_runner import cli, tasks
from versa_runner.errors import UsageError

# A meta-path finder that makes `import torch` fail, as on a host without torch installed.
BLOCK_TORCH = """
import sys
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
        return None
sys.meta_path.insert(0, _NoTorch())
"""


def _run_blocked(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", BLOCK_TORCH + code], capture_output=True, text=True, timeout=60
    )


def test_help_works_without_torch() -> None:
    result = _run_blocked(
        "from versa_runner.cli import main\n"
        "import versa_runner.runs.lifecycle, versa_runner.runs.sync, versa_runner.cli.output, versa_runner.target.launcher\n"
        "assert 'torch' not in sys.modules\n"
        "try:\n    main(['--help'])\nexcept SystemExit as e:\n    sys.exit(e.code)\n"
    )
    assert result.returncode == 0, result.stderr
    assert "submit" in result.stdout and "examples:" in result.stdout
    task_help = _run_blocked(
        "from versa_runner.cli import main\n"
        "sys.exit(main(['--task', 'build_pruned_20b_eaftreap_budgeted', '--help']))\n"
    )
    assert task_help.returncode == 0, task_help.stderr
    assert "--keep-frac" in task_help.stdout and "--calib-pack-sample-strategy" in task_help.stdout


# The `gpu` extra's modules, missing as on a host-only install (`pip install versa-runner`).
BLOCK_GPU_EXTRA = """
import sys
GPU_EXTRA = {"torch", "numpy", "safetensors", "pyarrow", "pandas", "matplotlib", "transformers",
             "huggingface_hub", "tokenizers", "bpe_openai"}
class _NoGpuExtra:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in GPU_EXTRA:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, _NoGpuExtra())
"""


@pytest.mark.parametrize("argv", [["fixtures", "packs"], ["fixtures", "model"]])
def test_gpu_command_on_host_only_install_names_the_extra(argv: list[str], tmp_path) -> None:
    code = (
        f"from versa_runner.cli import main\nsys.exit(main({argv + [str(tmp_path / 'out')]!r}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", BLOCK_GPU_EXTRA + code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "needs the package" in error_lines[0] and "fixtures" in error_lines[0]
    assert "pip install 'versa-runner[gpu]'" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("verb", cli.VERBS)
def test_every_command_help_has_examples(verb: str, capsys: pytest.CaptureFixture[str]) -> None:
    try:
        code = cli.main([verb, "--help"])
    except SystemExit as exc:
        code = exc.code
    assert code == 0
    assert "examples:" in capsys.readouterr().out


def _error_of(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err.splitlines()[0]


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--task", "validate_expert_math_toy", "--keep-frac", "0.5"], "'--keep-frac'"),
        (
            ["--task", "validate_expert_math_toy", "--device", "tpu"],
            "--device: expected one of auto, cpu, cuda",
        ),
        (
            ["--task", "validate_expert_math_toy", "--trials", "0"],
            "--trials: expected an integer in [1, 100000]",
        ),
        (["--task", "validate_expert_math_toy", "--seeds", "1,x"], "--seeds"),
        (
            ["--task", "build_pruned_20b_eaftreap_budgeted", "--keep-frac", "1.5"],
            "--keep-frac: expected a number in (0, 1]",
        ),
        (["--task", "build_pruned_20b_eaftreap_budgeted", "--keep-frac", "0"], "--keep-frac"),
        (
            ["--task", "build_pruned_20b_eaftreap_budgeted", "--min-keep-per-layer", "40"],
            "--min-keep-per-layer (40) is larger than --max-keep-per-layer (32)",
        ),
        (
            [
                "--task",
                "build_pruned_20b_eaftreap_budgeted",
                "--calib-pack-sample-strategy",
                "weighted",
            ],
            "--calib-pack-weights-csv",
        ),
        (["--task", "build_pruned_20b_eaftreap_keepfrac", "--layout", "per-layer"], "--layout"),
        (["--task", "decode_bench", "--name", "x"], "--model-path is required"),
        (
            ["--task", "decode_bench", "--name", "x", "--model-path", "/m", "--batch-sizes", "1,0"],
            "--batch-sizes",
        ),
        (["--task", "eaft_single", "--model-id", "m", "--seq-lens-csv", ""], "--seq-lens-csv"),
        (["--task", "validate_expert_math_toy", "--trials"], "--trials: missing value"),
        (
            ["--task", "no_such_task"],
            "unknown task 'no_such_task'; known tasks: validate_expert_math_toy",
        ),
        (["status", "--bogus"], "unknown argument '--bogus'"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["wait", "--timeout", "soon"], "--timeout: invalid float value: 'soon'"),
        (["kill", "--grace", "-1"], "--grace"),
        (
            ["submit", "--task", "decode_bench", "--notebook", "x.ipynb"],
            "exactly one of --task TASK or --notebook PATH",
        ),
        (["--url", "http://a", "--url-file", "f", "doctor"], "--url"),
    ],
)
def test_bad_input_is_one_line_naming_the_flag(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str], tmp_path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    code, first_line = _error_of(argv, capsys)
    assert code == 2
    assert first_line.startswith("error: ") and needle in first_line, first_line


def test_missing_notebook_is_a_clear_error(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tasks, "NOTEBOOKS_DIR", tmp_path / "no_notebooks")
    code, first_line = _error_of(
        ["--task", "decode_bench", "--name", "b", "--model-path", "/m"], capsys
    )
    assert code == 2
    assert "decode_bench" in first_line and "does not exist yet" in first_line
    assert not (tmp_path / "versa_runs").exists()  # nothing was staged


def test_defaults_are_typed_and_flags_snake_cased() -> None:
    params = tasks.parse_task_args(tasks.get_task("validate_expert_math_toy"), [])
    assert params == {"seeds": [3407], "trials": 20, "device": "auto", "dtype": "auto"}
    build = tasks.parse_task_args(
        tasks.get_task("build_pruned_20b_eaftreap_budgeted"),
        ["--keep-frac=0.5", "--eaft-weight-cc", "-1", "--overwrite", "--calib-pack-sample-strategy",
         "weighted", "--calib-pack-weights-csv", "1,3,1"],
    )  # fmt: skip
    assert (
        build["keep_frac"] == 0.5 and build["eaft_weight_cc"] == -1.0 and build["overwrite"] is True
    )
    assert build["calib_pack_files"][1] == "tool_agentic_10k_v6.parquet"
    assert build["calib_pack_weights_csv"] == [1.0, 3.0, 1.0]
    assert build["min_keep_per_layer"] == 16 and build["core_pos_top_m"] == 4
    keepfrac = tasks.parse_task_args(
        tasks.get_task("build_pruned_20b_eaftreap_keepfrac"), ["--keep-frac", "0.75,0.6"]
    )
    assert keepfrac["keep_frac"] == [0.75, 0.6] and keepfrac["layout"] == "uniform"
    bench = tasks.parse_task_args(
        tasks.get_task("decode_bench"), ["--name", "b", "--model-path", "/m", "--engine", "native"]
    )
    assert bench["batch_sizes"] == [1, 2, 4, 8, 16, 32] and bench["engine"] == "native"


def test_registry_matches_design_table() -> None:
    expected = {
        "validate_expert_math_toy": "validate_expert_math_toy",
        "build_pruned_20b_eaftreap_budgeted": "build_pruned",
        "build_pruned_20b_eaftreap_keepfrac": "build_pruned",
        "eaft_single": "eaft_single",
        "decode_bench": "decode_bench",
        "playbook": "playbook",
    }
    assert {name: task.notebook for name, task in tasks.TASKS.items()} == expected
    with pytest.raises(UsageError, match="known tasks"):
        tasks.get_task("summarize_eaft_pair_typo")


def test_preflight_refuses_before_staging(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VERSA_RUNNER_MIN_FREE_GB", "1e12")  # more than any disk has
    for name in ("REMOTE_JUPYTER_URL", "VERSA_RUN_URL", "KAGGLE_URL"):
        monkeypatch.delenv(name, raising=False)
    code, first_line = _error_of(["--task", "validate_expert_math_toy"], capsys)
    assert code == 3
    assert first_line.startswith("error: only ") and "GB free" in first_line
    assert not (tmp_path / "versa_runs").exists() and not (tmp_path / ".versa_runner").exists()


def test_implicit_submit_finds_the_verb() -> None:
    implicit = cli.with_implicit_submit
    assert implicit(["--task", "decode_bench", "--name", "status"])[0] == "submit"
    assert implicit(["--output-dir", "status", "--task", "x"])[0] == "submit"
    assert implicit(["--json", "status", "RUN"]) == ["--json", "status", "RUN"]
    assert implicit(["--output-dir", "o", "logs", "--tail", "3"])[2] == "logs"
    assert implicit([]) == [] and implicit(["frobnicate"]) == ["frobnicate"]
