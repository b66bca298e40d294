"""Every module the project's code imports is its own, the standard library's, or declared.

CI builds a fresh venv from `pyproject.toml` alone (scripts/test.sh), so an import that only a
hand-installed package satisfies fails there; this test names it first, with its file and line.
A module imported inside `try: ... except ImportError` is optional by construction (an engine
used when present, say) and need not be declared.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("tests", "benchmarks", "scripts", "versa_runner", "kernels/versa_kernels")
OWN_PACKAGES = {"versa_runner", "versa_kernels"}
# Notebooks import the GPU side; their code cells are scanned too.
NOTEBOOKS = ROOT / "notebooks"


@dataclass(frozen=True)
class Import:
    module: str  # top-level name, e.g. "yaml" for `import yaml.safe_load`
    where: str  # "path:line"
    optional: bool  # inside try/except ImportError


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    names = {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"}
    kinds = handler.type
    if kinds is None:
        return True
    elements = kinds.elts if isinstance(kinds, ast.Tuple) else [kinds]
    return any(isinstance(e, ast.Name) and e.id in names for e in elements)


def imports_in(source: str, where: str) -> list[Import]:
    """The absolute imports in `source`, each marked optional when an ImportError is caught."""
    tree = ast.parse(source)
    guarded: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(_catches_import_error(h) for h in node.handlers):
            for inner in node.body:
                guarded.update(id(n) for n in ast.walk(inner))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module]
        else:
            continue
        for module in modules:
            found.append(
                Import(module.split(".")[0], f"{where}:{node.lineno}", id(node) in guarded)
            )
    return found


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared_distributions(pyproject: Path) -> set[str]:
    """Normalized names of every distribution in dependencies and every optional extra."""
    project = tomllib.loads(pyproject.read_text())["project"]
    specs = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        specs.extend(extra)
    return {_normalize(re.split(r"[\s<>=!~;\[]", spec, maxsplit=1)[0]) for spec in specs}


def local_modules() -> set[str]:
    """Modules that resolve from the project's own folders (test helpers, benchmark helpers)."""
    names = set(OWN_PACKAGES)
    for folder in ("tests", "benchmarks", "scripts"):
        names.update(p.stem for p in (ROOT / folder).glob("*.py"))
    return names


def project_imports() -> list[Import]:
    found: list[Import] = []
    for folder in SCANNED:
        for path in sorted((ROOT / folder).rglob("*.py")):
            found += imports_in(path.read_text(), str(path.relative_to(ROOT)))
    import nbformat

    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        notebook = nbformat.read(path, as_version=4)
        for index, cell in enumerate(notebook.cells):
            if cell.cell_type == "code":
                source = "\n".join(
                    line
                    for line in cell.source.splitlines()
                    if not line.lstrip().startswith(("%", "!"))
                )
                found += imports_in(source, f"{path.relative_to(ROOT)}[cell {index}]")
    return found


def undeclared(imports: list[Import], declared: set[str], local: set[str]) -> list[Import]:
    """The imports that are neither local, stdlib, nor provided by a declared distribution."""
    providers = importlib.metadata.packages_distributions()
    missing = []
    for imp in imports:
        if imp.optional or imp.module in local or imp.module in sys.stdlib_module_names:
            continue
        # A module not installed here (an engine only a GPU target has) is matched by its name.
        dists = {_normalize(d) for d in providers.get(imp.module, [imp.module])}
        if not dists & declared:
            missing.append(imp)
    return missing


def test_every_import_is_own_stdlib_or_declared() -> None:
    declared = declared_distributions(ROOT / "pyproject.toml")
    missing = undeclared(project_imports(), declared, local_modules())
    lines = [f"{m.where}: {m.module}" for m in missing]
    assert not missing, "imports not declared in pyproject.toml:\n" + "\n".join(lines)


def test_the_check_catches_an_undeclared_import(tmp_path: Path) -> None:
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\nname = "x"\ndependencies = ["PyYAML>=6"]\n')
    source = (
        "import os\nimport yaml\nimport requests\n"
        "try:\n    import vllm\nexcept ImportError:\n    vllm = None\n"
    )
    found = imports_in(source, "probe.py")
    assert [i.module for i in found] == ["os", "yaml", "requests", "vllm"]
    missing = undeclared(found, declared_distributions(pyproject), set())
    # yaml is declared (as PyYAML), os is stdlib, vllm is optional: only requests is reported.
    assert [(m.module, m.where) for m in missing] == [("requests", "probe.py:3")]


@pytest.mark.parametrize(
    "spec", ["torch>=2.4", "bpe-openai>=0.1.4", "jupyter_server >=2", "x[a]==1"]
)
def test_declared_names_are_normalized(tmp_path: Path, spec: str) -> None:
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(f'[project]\nname = "x"\ndependencies = ["{spec}"]\n')
    (name,) = declared_distributions(pyproject)
    assert name == _normalize(re.split(r"[\s<>=\[]", spec)[0])
