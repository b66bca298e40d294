"""Recipe `extends`: resolve parents, deep-merge, detect cycles, check keys (eaftreap_spec §9.5).

A recipe is a YAML mapping. `extends` (a string or a list of strings) names parent recipes by
path relative to the **child file's directory**. Resolution:

1. Each parent is resolved recursively; parents merge left to right into an empty mapping, then
   the child merges on top.
2. Merge: when both sides hold a mapping under a key, merge recursively; otherwise the override
   replaces the value (lists are replaced, never concatenated).
3. The result has no `extends` key and keeps key order (dumped with `sort_keys=False`).
4. Every file's keys are checked against its kind's schema (`recipes.schema`): its own `kind`,
   else the kind its parents resolve to. The merged recipe must name a known kind and a
   schema_version that kind supports.

Cycle detection follows the current chain of files only, so a diamond (two parents extending
the same base) is allowed; the predecessor's shared "seen" set misreported it as a cycle
(§11.4 item 27). `collector_runs` applies `collector_overrides` onto `collector_defaults` and
expands `run_matrix`, the step the predecessor left to a consumer that never existed.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from versa_runner.errors import ConfigError
from versa_runner.recipes.schema import check_keys, check_kind

EXTENDS_KEY = "extends"
MAX_EXTENDS_DEPTH = 32  # far beyond any real recipe; stops pathological chains early

__all__ = ["collector_runs", "dump_recipe", "load_recipe", "merge_recipes"]


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Load a recipe, resolve its `extends` chain into one mapping (no `extends` left) and
    check it: known kind, supported schema_version, no unknown key in any file."""
    resolved = Path(path).resolve()
    recipe = _resolve(resolved, chain=())
    check_kind(recipe, where=str(path))
    return recipe


def merge_recipes(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge: mappings merge key by key; any other override value replaces the base's."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if key == EXTENDS_KEY:
            continue
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge_recipes(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def dump_recipe(recipe: Mapping[str, Any]) -> str:
    """YAML text of a resolved recipe, keys in their original order."""
    return yaml.safe_dump(dict(recipe), sort_keys=False, allow_unicode=True)


def collector_runs(recipe: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Effective collector parameters per run: defaults + overrides, one entry per matrix row.

    A recipe without `run_matrix` yields one run named after the recipe.
    """
    defaults = recipe.get("collector_defaults") or {}
    base = merge_recipes(defaults, recipe.get("collector_overrides") or {})
    matrix = recipe.get("run_matrix")
    if matrix is None:
        return [(str(recipe.get("name", "default")), base)]
    if not isinstance(matrix, list) or not all(
        isinstance(r, Mapping) and "name" in r for r in matrix
    ):
        raise ConfigError(
            "run_matrix must be a list of mappings, each with a 'name'",
            hint="Write run_matrix as `- name: ...` entries with collector_overrides.",
        )
    return [
        (str(r["name"]), merge_recipes(base, r.get("collector_overrides") or {})) for r in matrix
    ]


def _resolve(path: Path, *, chain: tuple[Path, ...]) -> dict[str, Any]:
    if path in chain:
        cycle = " -> ".join(p.name for p in (*chain[chain.index(path) :], path))
        raise ConfigError(
            f"recipe extends itself: {cycle}",
            hint="Remove one `extends` entry so the chain ends in a base recipe.",
        )
    if len(chain) >= MAX_EXTENDS_DEPTH:
        raise ConfigError(
            f"recipe {chain[0]}: extends chain deeper than {MAX_EXTENDS_DEPTH}",
            hint="Flatten the recipe hierarchy.",
        )
    recipe = _read_mapping(path, child=chain[-1] if chain else None)
    parents = recipe.get(EXTENDS_KEY, [])
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(p, str) and p for p in parents):
        raise ConfigError(
            f"recipe {path}: 'extends' must be a path or a list of paths, got {parents!r}",
            hint="Write `extends: eval-base.yaml` or `extends: [a.yaml, b.yaml]`.",
        )
    merged: dict[str, Any] = {}
    for parent in parents:
        parent_path = (path.parent / parent).resolve()
        merged = merge_recipes(merged, _resolve(parent_path, chain=(*chain, path)))
    kind = recipe.get("kind", merged.get("kind"))
    if kind is None:
        raise ConfigError(
            f"recipe {path}: no `kind` (in it or in a file it extends)",
            hint="Add `kind:` (reap_recipe, reap_scores, eval_base, eval_recipe or playbook).",
        )
    check_keys(recipe, str(kind), where=str(path))
    return merge_recipes(merged, recipe)


def _read_mapping(path: Path, *, child: Path | None) -> dict[str, Any]:
    where = f" (extended by {child})" if child is not None else ""
    if not path.is_file():
        raise ConfigError(
            f"recipe {path} not found{where}",
            hint="`extends` paths are relative to the directory of the recipe that names them.",
        )
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(
            f"recipe {path}{where}: not readable YAML ({exc})", hint="Fix the YAML syntax."
        ) from exc
    if not isinstance(data, dict):
        raise ConfigError(
            f"recipe {path}{where}: top level must be a mapping, got {type(data).__name__}",
            hint="A recipe is a YAML mapping (key: value lines at the top level).",
        )
    return data
