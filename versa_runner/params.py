"""Task parameters, declared once: each `Param` yields its flag, help, validation and notebook line.

A task (`versa_runner.tasks`) lists its `Param`s; from that one list come
- the command-line flags (`task_parser`, an argparse parser: `--flag V`, `--flag=V`, and
  `--flag` / `--no-flag` for booleans), with help text stating the allowed values and default;
- validation (`coerce` per value, then `validate` for defaults, required flags and the task's
  cross-field check), all before anything is staged; a number is always finite (NaN and the
  infinities pass every range comparison, so they are refused by name);
- the checks of inputs that live where the job runs (`input_checks`: a checkpoint directory,
  pack files, top-k against the checkpoint's experts), run by preflight before any GPU time;
- the notebook's parameters cell (`parameters_cell`), which a test compares with each notebook,
  so a notebook parameter without a flag (or a flag the notebook ignores) fails CI.

Flags keep the playbook's names (`--keep-frac`); papermill receives them in snake_case
(`keep_frac`), plus `run_id`.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import yaml

from versa_runner.errors import UsageError

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")
KINDS = ("int", "float", "str", "bool", "choice", "int_csv", "float_csv", "str_csv")
RUN_ID = "run_id"  # added by the runner to every notebook's parameters
CELL_LIST_WIDTH = 60  # a longer list default is written one item per line
TARGET_CHECKS = ("checkpoint", "pack_files", "experts_per_token", "keep_per_layer")
"""What `input_checks` can ask the target to check (see `versa_runner.target.inputs`)."""


@dataclass(frozen=True)
class Param:
    """One task parameter. `kind`: int, float, str, bool, choice, int_csv, float_csv, str_csv.

    `default` is the typed value, or for csv kinds the command-line text (`"1024,2048"`).
    """

    flag: str
    kind: str
    default: Any
    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # True: the lower bound itself is not allowed, e.g. keep_frac in (0, 1]
    choices: tuple[str, ...] = ()
    required: bool = False
    target_check: str = ""
    """One of TARGET_CHECKS: what preflight checks of this value where the job runs."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"{self.flag}: kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.target_check and self.target_check not in TARGET_CHECKS:
            raise ValueError(f"{self.flag}: target_check {self.target_check!r} is not one of "
                             f"{', '.join(TARGET_CHECKS)}")  # fmt: skip
        if "=" in self.help:  # papermill cannot parse a parameters line whose comment has `=`
            raise ValueError(f"{self.flag}: help text must not contain '=' ({self.help!r})")

    @property
    def name(self) -> str:
        """The papermill parameter name: `--keep-frac` -> `keep_frac`."""
        return self.flag.lstrip("-").replace("-", "_")

    def allowed(self) -> str:
        """Human text of what values are allowed (used in every error about this flag)."""
        if self.choices:
            return "one of " + ", ".join(self.choices)
        number = {"int": "an integer", "float": "a number", "int_csv": "comma-separated integers",
                  "float_csv": "comma-separated numbers", "bool": "true or false",
                  "str_csv": "comma-separated names"}.get(self.kind, "a string")  # fmt: skip
        if self.low is None and self.high is None:
            # a range excludes NaN and the infinities by its brackets; an open one says so
            return number.replace("number", "finite number")
        left = "(" if self.low_open else "["
        low = "-inf" if self.low is None else _fmt(self.low)
        high = "inf)" if self.high is None else _fmt(self.high) + "]"
        each = ", each in " if "csv" in self.kind else " in "
        return f"{number}{each}{left}{low}, {high}"

    def default_value(self) -> Any:
        """The typed default (csv defaults are given as command-line text)."""
        if isinstance(self.default, str) and self.kind.endswith("_csv"):
            return coerce(self, self.default)
        return self.default


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _coerce_one(param: Param, text: str, kind: str) -> Any:
    try:
        value: Any = {"int": int, "float": float}.get(kind, str)(text.strip())
    except ValueError:
        raise UsageError(f"{param.flag}: expected {param.allowed()}, got {text!r}") from None
    if kind == "float" and not math.isfinite(value):  # NaN passes every comparison below
        raise UsageError(f"{param.flag}: expected {param.allowed()}, got {text!r}")
    if kind in ("int", "float"):
        too_low = param.low is not None and (
            value <= param.low if param.low_open else value < param.low
        )
        too_high = param.high is not None and value > param.high
        if too_low or too_high:
            raise UsageError(f"{param.flag}: expected {param.allowed()}, got {text!r}")
    return value


def coerce(param: Param, text: str) -> Any:
    """Turn the command-line text of one flag into its typed value, or raise UsageError."""
    if param.kind == "bool":
        if text.lower() in TRUE_WORDS:
            return True
        if text.lower() in FALSE_WORDS:
            return False
        raise UsageError(f"{param.flag}: expected {param.allowed()}, got {text!r}")
    if param.kind == "choice":
        if text not in param.choices:
            raise UsageError(f"{param.flag}: expected {param.allowed()}, got {text!r}")
        return text
    if param.kind.endswith("_csv"):
        items = [item for item in text.split(",") if item.strip()]
        if not items:
            raise UsageError(f"{param.flag}: expected {param.allowed()}, got {text!r}")
        item_kind = param.kind.removesuffix("_csv")
        values = [_coerce_one(param, item, item_kind) for item in items]
        return [v.strip() for v in values] if item_kind == "str" else values
    return _coerce_one(param, text, param.kind)


def did_you_mean(word: str, candidates: Sequence[str]) -> str:
    """` (did you mean --x?)` when one candidate is close to `word`, else ``."""
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


class _TaskParser(argparse.ArgumentParser):
    """argparse for one task's flags; errors become one-line UsageErrors naming the flag."""

    def __init__(self, *, task_name: str, params: Sequence[Param], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.task_name = task_name
        self.by_flag = {p.flag: p for p in params}

    def error(self, message: str) -> NoReturn:
        missing = re.match(r"argument (--[\w-]+).*: expected one argument", message)
        if missing and missing.group(1) in self.by_flag:
            flag = missing.group(1)
            allowed = self.by_flag[flag].allowed()
            raise UsageError(f"{flag}: missing value (expected {allowed})")
        raise UsageError(f"task {self.task_name}: {message}")


def _help_line(param: Param) -> str:
    default = "required" if param.required else f"default {param.default!r}"
    return f"{param.help} ({param.allowed()}; {default})"


def task_parser(task_name: str, params: Sequence[Param], *, description: str = "",
                epilog: str = "") -> argparse.ArgumentParser:  # fmt: skip
    """The argparse parser of one task's flags (values typed and range-checked by `coerce`)."""
    parser = _TaskParser(
        task_name=task_name, params=params, prog=f"versa-run --task {task_name}",
        description=description, epilog=epilog, add_help=False, allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    for param in params:
        typed = _typed(param)
        if param.kind == "bool":
            parser.add_argument(param.flag, dest=param.name, nargs="?", const=True, type=typed,
                                default=argparse.SUPPRESS, metavar="BOOL", help=_help_line(param))  # fmt: skip
            parser.add_argument("--no-" + param.flag[2:], dest=param.name, action="store_false",
                                default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # fmt: skip
        else:
            parser.add_argument(param.flag, dest=param.name, type=typed, default=argparse.SUPPRESS,
                                metavar=param.kind.upper(), help=_help_line(param))  # fmt: skip
    return parser


def _typed(param: Param) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        return coerce(param, text)

    convert.__name__ = param.kind  # argparse names the type in its own messages
    return convert


def parse_flags(task_name: str, params: Sequence[Param], argv: Sequence[str]) -> dict[str, Any]:
    """The flags given in `argv`, typed (defaults not filled in: see `validate`)."""
    parser = task_parser(task_name, params)
    given, unknown = parser.parse_known_args(list(argv))
    if unknown:
        flag = unknown[0].partition("=")[0]
        flags = [p.flag for p in params]
        raise UsageError(
            f"task {task_name} does not take {flag!r}{did_you_mean(flag, flags)}",
            hint=f"its flags: {', '.join(flags)} (`versa-run --task {task_name} --help` "
            "explains them)",
        )
    return vars(given)


def validate(
    task_name: str, params: Sequence[Param], given: dict[str, Any],
    check: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Fill defaults, check required flags and the cross-field rule; returns every parameter."""
    values: dict[str, Any] = {}
    for param in params:
        if param.name in given:
            values[param.name] = given[param.name]
        elif param.required:
            raise UsageError(f"{param.flag} is required for task {task_name} ({param.help})")
        else:
            values[param.name] = param.default_value()
    if check is not None:
        check(values)
    return values


def input_checks(params: Sequence[Param], values: dict[str, Any]) -> list[dict[str, Any]]:
    """The checks preflight runs on the target for these values (`target.inputs`): one per
    parameter with a `target_check` and a value to check. A pack list is read together with
    `calib_packs_repo`, an expert count with the checkpoint at `model_path` (else `model_id`)."""
    checks: list[dict[str, Any]] = []
    for param in params:
        value = values.get(param.name)
        if not param.target_check or value in (None, "", []):
            continue
        check: dict[str, Any] = {"check": param.target_check, "flag": param.flag}
        if param.target_check == "checkpoint":
            check["path"] = value
        elif param.target_check == "pack_files":
            check.update(files=list(value), repo=values.get("calib_packs_repo") or "")
        else:
            path = values.get("model_path") or values.get("model_id")
            if not path:
                continue
            check.update(value=value, path=path)
        checks.append(check)
    return checks


def literal_value(name: str, text: str) -> Any:
    """A `-p NAME VALUE` value for a notebook run, read as YAML; a number must be finite."""
    value = yaml.safe_load(text)
    items = value if isinstance(value, list) else [value]
    if any(isinstance(item, float) and not math.isfinite(item) for item in items):
        raise UsageError(f"-p {name}: expected a finite number, got {text!r}")
    return value


def parameters_cell(params: Sequence[Param]) -> str:
    """The notebook's `parameters` cell for these parameters: `name = default  # help` per line,
    then `run_id` (a required parameter's placeholder is its empty value)."""
    lines = []
    for param in params:
        value = param.default_value()
        if value is None and param.required:
            value = ""
        lines.append(_assignment(param.name, value, param.help))
    lines.append(f'{RUN_ID} = ""  # set by versa-run')
    return "\n".join(lines)


def _assignment(name: str, value: Any, comment: str) -> str:
    """`name = value  # comment`, a long list one item per line (the comment on its first)."""
    if isinstance(value, list) and len(repr(value)) > CELL_LIST_WIDTH:
        items = "".join(f"    {_literal(item)},\n" for item in value)
        return f"{name} = [  # {comment}\n{items}]"
    return f"{name} = {_literal(value)}  # {comment}"


def _literal(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value)  # double quotes, as the notebooks are written
    if isinstance(value, list):
        return "[" + ", ".join(_literal(item) for item in value) + "]"
    return repr(value)


__all__ = [
    "Param",
    "coerce",
    "did_you_mean",
    "input_checks",
    "literal_value",
    "parameters_cell",
    "parse_flags",
    "task_parser",
    "validate",
]
