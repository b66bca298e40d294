"""The versioned parity gate (`near-lossless-v1`): its file format, thresholds and checks.

The gate lives in a JSON shipped with the package (`near_lossless_gates.json`, schema_version 1)
so a verdict always names the exact rule it applied (eaftreap_spec §7, §11.3 item 17: the
predecessor's markdown and dashboard disagreed on min vs max of the PPL bounds; v1 is `min`).
A missing or malformed gates file is an error, never "all thresholds 0" (§11.4 item 26).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from versa_runner.errors import ConfigError, UsageError

GATES_SCHEMA_VERSION = 1
DEFAULT_GATES_PATH = Path(__file__).with_name("near_lossless_gates.json")
PPL_BOUND_RULES = ("min", "max")
CHECK_NAMES = ("ppl", "cc", "mean_p", "js2d")
THRESHOLD_KEYS = (
    "max_abs_delta_ppl",
    "max_rel_delta_ppl",
    "max_abs_delta_cc_rate",
    "max_abs_delta_mean_prob",
    "max_js2d",
)

__all__ = ["CHECK_NAMES", "DEFAULT_GATES_PATH", "GateCheck", "Gates", "load_gates"]


@dataclass(frozen=True)
class Gates:
    """A versioned gate: hero rows and the thresholds each of them must meet."""

    name: str
    path: str
    primary_pack: str
    primary_seq_lens: tuple[str, ...]
    ppl_bound: str
    max_abs_delta_ppl: float
    max_rel_delta_ppl: float
    max_abs_delta_cc_rate: float
    max_abs_delta_mean_prob: float
    max_js2d: float

    def ppl_limit(self, ppl_left: float) -> float:
        """Allowed |dPPL| for a baseline PPL (min of abs and rel*base under v1)."""
        pick = min if self.ppl_bound == "min" else max
        return pick(self.max_abs_delta_ppl, self.max_rel_delta_ppl * ppl_left)


@dataclass(frozen=True)
class GateCheck:
    """One check of one row: `value` must be <= `limit`."""

    name: str
    value: float
    limit: float

    @property
    def ok(self) -> bool:
        return self.value <= self.limit


def read_json_object(path: Path, *, param: str) -> dict[str, Any]:
    """A JSON file whose top level is an object; missing is a UsageError naming `param`,
    unreadable or not an object a ConfigError."""
    if not path.is_file():
        raise UsageError(
            f"{param} {path}: file not found", hint=f"Pass an existing JSON file to {param}."
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(
            f"{param} {path}: not readable JSON ({exc})", hint="Check the file."
        ) from exc
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{param} {path}: top level must be a JSON object", hint="Check the file."
        )
    return raw


def load_gates(path: str | Path | None = None) -> Gates:
    """Read a gates JSON (default: the packaged near-lossless-v1); malformed is a ConfigError."""
    gates_path = Path(path) if path is not None else DEFAULT_GATES_PATH
    raw = read_json_object(gates_path, param="--gates-json")
    hint = f"Start from the shipped gates file {DEFAULT_GATES_PATH} and change only thresholds."
    if raw.get("schema_version") != GATES_SCHEMA_VERSION:
        raise ConfigError(
            f"--gates-json {gates_path}: schema_version must be {GATES_SCHEMA_VERSION}, "
            f"got {raw.get('schema_version')!r}",
            hint=hint,
        )
    thresholds = raw.get("thresholds")
    keys = THRESHOLD_KEYS
    if not isinstance(thresholds, dict) or any(
        not isinstance(thresholds.get(k), (int, float)) for k in keys
    ):
        raise ConfigError(
            f"--gates-json {gates_path}: 'thresholds' must hold numbers for {', '.join(keys)}",
            hint=hint,
        )
    ppl_bound = raw.get("ppl_bound", "min")
    if ppl_bound not in PPL_BOUND_RULES:
        raise ConfigError(
            f"--gates-json {gates_path}: ppl_bound must be one of {PPL_BOUND_RULES}, got {ppl_bound!r}",
            hint=hint,
        )
    seqs = raw.get("primary_seq_lens")
    if not isinstance(raw.get("primary_pack"), str) or not isinstance(seqs, list) or not seqs:
        raise ConfigError(
            f"--gates-json {gates_path}: needs 'primary_pack' (string) and a non-empty "
            "'primary_seq_lens' list",
            hint=hint,
        )
    return Gates(
        name=str(raw.get("name", gates_path.stem)),
        path=str(gates_path),
        primary_pack=raw["primary_pack"],
        primary_seq_lens=tuple(str(s) for s in seqs),
        ppl_bound=ppl_bound,
        **{k: float(thresholds[k]) for k in keys},
    )
