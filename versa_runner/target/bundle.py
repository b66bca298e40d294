"""How this package travels to a target (host side, standard library only).

Two forms, both built from the package's own source files:

- `program(call, args)`: Python source for `Backend.run_python` that installs the package's
  modules under the name `versa_target` (in memory, no files written), calls one op, e.g.
  `ops.kill` or `fileops.manifest`, with `args` and prints its result as the reply line;
- `launcher_archive()`: the bytes of `launcher.pyz`, a zip app of the package whose
  `__main__` runs `launcher.main`; it is uploaded into each run directory.
"""

from __future__ import annotations

import inspect
import io
import json
import types
import zipfile
from pathlib import Path

PACKAGE = "versa_target"
PROGRAM_NAME = "<versa_target program>"
HERE = Path(__file__).resolve().parent
# Install order: each module's sibling imports come before it.
MODULES = (
    "layout", "reply", "files", "proc", "packages", "notebook", "fileops", "inputs", "ops",
    "launcher",
)  # fmt: skip
ZIP_MAIN = f"import sys\nfrom {PACKAGE}.launcher import main\nsys.exit(main(sys.argv))\n"
ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed member times: the same sources give the same archive


def install(package: str, modules: list[tuple[str, str]]) -> types.ModuleType:
    """Install `modules` ((name, source) pairs, in dependency order) as submodules of an
    in-memory package named `package`; returns the package. Runs first in every program (its
    own source is shipped with `inspect.getsource`), so it uses only `sys` and `types`."""
    import sys
    import types

    pkg = types.ModuleType(package)
    pkg.__path__ = []
    sys.modules[package] = pkg
    for name, source in modules:
        module = types.ModuleType(f"{package}.{name}")
        module.__package__ = package
        module.__file__ = f"<{package}/{name}.py>"
        sys.modules[module.__name__] = module
        exec(compile(source, module.__file__, "exec"), module.__dict__)  # noqa: S102 (our own modules)
        setattr(pkg, name, module)
    return pkg


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
    # `_pkg.<module>.<function>(` appears verbatim in the program: tests that forge a target's
    # reply to one op recognise the op by it.
    body = (
        "from __future__ import annotations\n"
        "import json\n"
        f"{inspect.getsource(install)}\n"
        f"_pkg = install({PACKAGE!r}, {sources!r})\n"
        f"_pkg.reply.emit(_pkg.{module}.{function}(json.loads({json.dumps(args)!r})))\n"
    )
    # Its own globals: on a kernel the user also works in (--kernel-id), nothing is left behind.
    return f"exec(compile({body!r}, {PROGRAM_NAME!r}, 'exec'), {{'__name__': {PROGRAM_NAME!r}}})\n"


def launcher_archive() -> bytes:
    """`launcher.pyz`: this package as a zip app that runs the launcher (reproducible bytes)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(zipfile.ZipInfo("__main__.py", ZIP_DATE), ZIP_MAIN)
        archive.writestr(zipfile.ZipInfo(f"{PACKAGE}/__init__.py", ZIP_DATE), "")
        for name in MODULES:
            archive.writestr(zipfile.ZipInfo(f"{PACKAGE}/{name}.py", ZIP_DATE), module_source(name))
    return buffer.getvalue()
