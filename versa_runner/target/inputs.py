"""Checks of a task's inputs where the job will read them (standard library only).

Run by `ops.preflight` before anything is staged: on the local target that is this machine
(a refusal is a usage error, exit 2), on a remote one the target itself (exit 3), in both cases
before any GPU time. Each check is a dict the host builds from the task's declaration
(`versa_runner.params.input_checks`):

- `{"check": "checkpoint", "flag", "path"}`: a directory holding `config.json`;
- `{"check": "pack_files", "flag", "files", "repo"}`: each pack file that names a local path
  exists and is parquet; the rest are names in the Hugging Face dataset `repo`, which must then
  be set (the job fetches them; they cannot be checked without the network);
- `{"check": "experts_per_token", "flag", "value", "path"}`: at most the experts per layer of
  the checkpoint at `path`, when its `config.json` is readable (a per-layer pruned checkpoint's
  smallest layer bounds it);
- `{"check": "keep_per_layer", "flag", "value", "path"}`: experts kept per layer, between the
  checkpoint's router top-k (never changed) and its experts per layer, when readable.

Relative paths are relative to `root`, the job's working directory. The answer is one line per
problem, naming the flag and what is allowed.
"""

from __future__ import annotations

import json
import os
from typing import Any

CONFIG_FILE = "config.json"
PARQUET_MAGIC = b"PAR1"


def check_inputs(root: str, checks: list[dict[str, Any]]) -> list[str]:
    """One line per input that cannot work (an empty list: every input passed)."""
    problems: list[str] = []
    for check in checks:
        kind = check["check"]
        if kind == "checkpoint":
            problems += _checkpoint(root, check["flag"], check["path"])
        elif kind == "pack_files":
            problems += _pack_files(root, check["flag"], check["files"], check.get("repo") or "")
        elif kind == "experts_per_token":
            problems += _experts_per_token(root, check["flag"], int(check["value"]), check["path"])
        elif kind == "keep_per_layer":
            problems += _keep_per_layer(root, check["flag"], int(check["value"]), check["path"])
        else:
            raise ValueError(f"unknown input check {kind!r}")
    return problems


def _resolve(root: str, path: str) -> str:
    return os.path.join(root, os.path.expanduser(path))


def _checkpoint(root: str, flag: str, path: str) -> list[str]:
    full = _resolve(root, path)
    if not os.path.isdir(full):
        what = "is a file" if os.path.exists(full) else "does not exist"
        return [f"{flag}: {path!r} {what} on the target; expected a checkpoint directory "
                f"holding {CONFIG_FILE}"]  # fmt: skip
    if not os.path.isfile(os.path.join(full, CONFIG_FILE)):
        return [f"{flag}: {path!r} holds no {CONFIG_FILE}; expected a checkpoint directory"]
    return []


def _looks_local(path: str) -> bool:
    """A name the user meant as a path on the target rather than a file in the dataset repo."""
    return os.path.isabs(path) or path.startswith(("./", "../", "~"))


def _pack_files(root: str, flag: str, files: list[str], repo: str) -> list[str]:
    problems = []
    for name in files:
        full = _resolve(root, name)
        if os.path.isfile(full):
            with open(full, "rb") as fh:
                if fh.read(len(PARQUET_MAGIC)) != PARQUET_MAGIC:
                    problems.append(f"{flag}: {name!r} is not a parquet file")
        elif os.path.exists(full):
            problems.append(f"{flag}: {name!r} is not a file; expected parquet pack files")
        elif _looks_local(name):
            problems.append(f"{flag}: {name!r} does not exist on the target")
        elif not repo:
            problems.append(f"{flag}: {name!r} is not a file on the target and "
                            "--calib-packs-repo is empty, so it cannot be fetched")  # fmt: skip
    return problems


def experts_per_layer(config: dict[str, Any]) -> int | None:
    """The fewest experts any layer of this gpt-oss config holds, or None when it says not."""
    per_layer = config.get("num_local_experts_per_layer")
    if isinstance(per_layer, list) and per_layer and all(isinstance(n, int) for n in per_layer):
        return int(min(per_layer))
    for key in ("num_local_experts", "num_experts"):  # HF key, then the original checkpoint's
        if isinstance(config.get(key), int):
            return int(config[key])
    return None


def _read_config(root: str, path: str) -> dict[str, Any]:
    """The checkpoint's config.json, or {} when it is not readable here (the job decides then;
    --model-path is checked on its own)."""
    try:
        with open(os.path.join(_resolve(root, path), CONFIG_FILE), encoding="utf-8") as fh:
            config = json.load(fh)
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def _experts_per_token(root: str, flag: str, value: int, path: str) -> list[str]:
    experts = experts_per_layer(_read_config(root, path))
    if experts is not None and value > experts:
        return [f"{flag}: expected an integer in [1, {experts}] (the checkpoint {path!r} has "
                f"{experts} experts per layer), got {value}"]  # fmt: skip
    return []


def _keep_per_layer(root: str, flag: str, value: int, path: str) -> list[str]:
    config = _read_config(root, path)
    experts = config.get("num_local_experts", config.get("num_experts"))
    top_k = config.get("num_experts_per_tok", config.get("experts_per_token"))
    if not isinstance(experts, int) or not isinstance(top_k, int):
        return []
    if not top_k <= value <= experts:
        return [f"{flag}: expected an integer in [{top_k}, {experts}] (the checkpoint {path!r} "
                f"routes each token to {top_k} of {experts} experts), got {value}"]  # fmt: skip
    return []
