"""How this package travels to a target (host side, standard library only).

Two forms, both built from the package's own source files:

- `program(call, args)`: Python source for `Backend.run_python` that installs the package's
  modules under the name `versa_target` (in memory, no files written), calls one op, e.g.
  `ops.kill` or `fileops.manifest`, with `args` and prints its result as the reply line;
- `launcher_archive()`: the bytes of `launcher.pyz`, a zip app of the package whose
  `__main__` runs `launcher.main`; it is uploaded into each run directory.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

PACKAGE = "versa_target"
HERE = Path(__file__).resolve().parent
# Install order: each module's sibling imports come before it.
MODULES = (
    "layout", "reply", "files", "proc", "packages", "notebook", "fileops", "inputs", "ops",
    "launcher",
)  # fmt: skip
ZIP_MAIN = f"import sys\nfrom {PACKAGE}.launcher import main\nsys.exit(main(sys.argv))\n"
ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed member times: the same sources give the same archive

# Runs on the target before anything else of the program: installs modules given as
# (name, source) pairs as submodules of one in-memory package, then returns the package.
_INSTALL = """
import sys, types
def _versa_install(package, modules):
    pkg = types.ModuleType(package)
    pkg.__path__ = []
    sys.modules[package] = pkg
    for name, source in modules:
        module = types.ModuleType(package + "." + name)
        module.__package__ = package
        module.__file__ = "<" + package + "/" + name + ".py>"
        sys.modules[module.__name__] = module
        exec(compile(source, module.__file__, "exec"), module.__dict__)
        setattr(pkg, name, module)
    return pkg
"""


def module_source(name: str) -> str:
    """The source text of one module of this package."""
    return (HERE / f"{name}.py").read_text(encoding="utf-8")


def program(call: str, args: dict[str, object]) -> str:
    """Source that runs `<module>.<function>(args)` of this package on the target and prints
    the result as the reply line. `args` travel as one JSON literal; never pass a secret."""
    module, _, function = call.partition(".")
    if module not in MODULES or not function:
        raise ValueError(f"unknown target call {call!r}; modules: {', '.join(MODULES)}")
    sources = [(name, module_source(name)) for name in MODULES]
    return (
        f"{_INSTALL}\n"
        f"_pkg = _versa_install({PACKAGE!r}, {sources!r})\n"
        "import json as _json\n"
        f"_pkg.reply.emit(_pkg.{module}.{function}(_json.loads({json.dumps(args)!r})))\n"
    )


def launcher_archive() -> bytes:
    """`launcher.pyz`: this package as a zip app that runs the launcher (reproducible bytes)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(zipfile.ZipInfo("__main__.py", ZIP_DATE), ZIP_MAIN)
        archive.writestr(zipfile.ZipInfo(f"{PACKAGE}/__init__.py", ZIP_DATE), "")
        for name in MODULES:
            archive.writestr(zipfile.ZipInfo(f"{PACKAGE}/{name}.py", ZIP_DATE), module_source(name))
    return buffer.getvalue()
