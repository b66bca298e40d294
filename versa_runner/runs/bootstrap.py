"""Target bootstrap profiles: what the launcher installs and sets before papermill starts.

A profile turns into three `launch.json` entries the launcher already understands (see
`versa_runner.target.launcher`): `env`, `pythonpath` and `bootstrap` steps (`{argv, timeout_s}`, each
run with its own timeout, output into `run.log`; the first failure ends the run as
`bootstrap_failed` with exit code 5).

The Kaggle profile (on by default when the target root is `/kaggle/working`, versa_spec §4,
§8.10):
- installs what the task imports when it is missing, keeping Kaggle's own torch/CUDA build; when
  site-packages is read-only it installs with `pip --target` into a deps dir that is on the job's
  PYTHONPATH from the start;
- sets the environment the GPU code needs (`PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`,
  `TRANSFORMERS_NO_TF=1`, `TRANSFORMERS_NO_TORCHVISION=1`, `PYTHONUNBUFFERED=1`);
- keeps big scratch (HF cache, Triton cache, temp files, installed deps) out of
  `/kaggle/working`, whose ~20 GB quota is what the outputs need.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from versa_runner.errors import UsageError
from versa_runner.target.launcher import TARGET_PACKAGE_ENV, TARGET_PATH_ENV

KAGGLE_ROOT = "/kaggle/working"
KAGGLE_SCRATCH = "/tmp/versa_scratch"  # outside /kaggle/working: its quota is ~20 GB (§4.1)
PROFILES = ("auto", "none", "kaggle")
BOOTSTRAP_STEP_TIMEOUT_S = 1800.0  # pip installing transformers + deps on a cold session
STEP_NAME = "ensure-packages"
# The step runs `target.packages` from the launcher's own copy of the target package, which the
# launcher names in two environment variables (`target.launcher.TARGET_PATH_ENV`, ...).
ENSURE_PACKAGES_BOOT = (
    "import importlib, os, sys; "
    f"sys.path.insert(0, os.environ[{TARGET_PATH_ENV!r}]); "
    f"sys.exit(importlib.import_module(os.environ[{TARGET_PACKAGE_ENV!r}] + '.packages')"
    ".main(sys.argv[1:]))"
)

# import name -> pip requirement. Every task needs papermill's stack; the GPU side adds more.
RUNNER_REQUIREMENTS: Mapping[str, str] = {
    "papermill": "papermill>=2.5",
    "ipykernel": "ipykernel>=6.25",
    "yaml": "pyyaml>=6",
}
GPU_REQUIREMENTS: Mapping[str, str] = {
    "torch": "torch",
    "numpy": "numpy>=1.26",
    "safetensors": "safetensors>=0.4",
    "matplotlib": "matplotlib>=3.8",
}
DATA_REQUIREMENTS: Mapping[str, str] = {
    "pyarrow": "pyarrow>=14",
    "pandas": "pandas>=2",
    "bpe_openai": "bpe-openai>=0.1.4",
    "huggingface_hub": "huggingface_hub>=0.24",
}
TASK_REQUIREMENTS: Mapping[str, Mapping[str, str]] = {
    "validate_expert_math_toy": GPU_REQUIREMENTS,
    "build_pruned_20b_eaftreap_budgeted": {**GPU_REQUIREMENTS, **DATA_REQUIREMENTS},
    "build_pruned_20b_eaftreap_keepfrac": {**GPU_REQUIREMENTS, **DATA_REQUIREMENTS},
    "eaft_single": {**GPU_REQUIREMENTS, **DATA_REQUIREMENTS},
    "decode_bench": GPU_REQUIREMENTS,
    "playbook": {**GPU_REQUIREMENTS, **DATA_REQUIREMENTS},  # runs every task's notebook
}


@dataclass(frozen=True)
class BootstrapPlan:
    """The launch.json additions of one profile for one task."""

    profile: str
    env: dict[str, str] = field(default_factory=dict)
    pythonpath: list[str] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)

    def merge_into(self, launch_config: dict[str, Any]) -> dict[str, Any]:
        """`launch_config` with this plan's env, pythonpath and steps added (job values win)."""
        merged = dict(launch_config)
        merged["env"] = {**self.env, **dict(launch_config.get("env") or {})}
        merged["pythonpath"] = [*list(launch_config.get("pythonpath") or []), *self.pythonpath]
        merged["bootstrap"] = [*self.steps, *list(launch_config.get("bootstrap") or [])]
        return merged


def resolve_profile(name: str | None, root: str) -> str:
    """`auto` (or None) picks `kaggle` when the target root is /kaggle/working, else `none`."""
    choice = (name or "auto").strip().lower()
    if choice not in PROFILES:
        raise UsageError(f"--profile must be one of {', '.join(PROFILES)}; got {name!r}")
    if choice == "auto":
        return "kaggle" if root.rstrip("/") == KAGGLE_ROOT else "none"
    return choice


def requirements_for(task: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Import name -> pip requirement for `task` (unknown tasks get the GPU baseline)."""
    return {**RUNNER_REQUIREMENTS, **TASK_REQUIREMENTS.get(task, GPU_REQUIREMENTS), **(extra or {})}


def plan_bootstrap(
    *,
    profile: str,
    python: str,
    task: str,
    root: str,
    scratch_dir: str | None = None,
    extra_requirements: Mapping[str, str] | None = None,
    pip_args: Sequence[str] = (),
    always_target: bool = False,
) -> BootstrapPlan:
    """What the launcher must do before papermill for `profile` (see the module docstring).

    `python` is the target interpreter the launcher runs under (preflight's `executable`).
    `always_target` installs into the deps dir even when site-packages is writable (tests, and
    targets whose system packages must not change).
    """
    chosen = resolve_profile(profile, root)
    if chosen == "none":
        return BootstrapPlan(profile="none")
    scratch = (scratch_dir or KAGGLE_SCRATCH).rstrip("/")
    deps_dir = f"{scratch}/pydeps"
    env = {
        "PYTHONUNBUFFERED": "1",
        "TRANSFORMERS_NO_TF": "1",
        "TRANSFORMERS_NO_TORCHVISION": "1",
        "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
        "HF_HOME": f"{scratch}/hf_home",
        "TRITON_CACHE_DIR": f"{scratch}/triton_cache",
        "TMPDIR": f"{scratch}/tmp",
        "MPLCONFIGDIR": f"{scratch}/matplotlib",
        "PIP_CACHE_DIR": f"{scratch}/pip_cache",
    }
    args = {
        "requirements": sorted(requirements_for(task, extra_requirements).items()),
        "deps_dir": deps_dir,
        "make_dirs": sorted(
            {
                deps_dir,
                env["HF_HOME"],
                env["TRITON_CACHE_DIR"],
                env["TMPDIR"],
                env["MPLCONFIGDIR"],
                env["PIP_CACHE_DIR"],
            }
        ),  # fmt: skip
        "pip_args": list(pip_args),
        "always_target": always_target,
    }
    step = {
        "name": STEP_NAME,
        "argv": [python, "-c", ENSURE_PACKAGES_BOOT, json.dumps(args, sort_keys=True)],
        "timeout_s": BOOTSTRAP_STEP_TIMEOUT_S,
    }
    return BootstrapPlan(profile=chosen, env=env, pythonpath=[deps_dir], steps=[step])


__all__ = [
    "BootstrapPlan",
    "KAGGLE_ROOT",
    "PROFILES",
    "plan_bootstrap",
    "requirements_for",
    "resolve_profile",
]
