"""`versa_runner.target`: real stdlib-only modules, shipped as a program or as `launcher.pyz`."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from versa_runner.target import bundle, proc, reply

PACKAGE_DIR = Path(bundle.__file__).resolve().parent
RUNNER_DIR = PACKAGE_DIR.parent
MAX_MODULE_LINES = 400


# What the job itself needs (preflight checks them), imported inside the function that runs it.
JOB_IMPORTS = {"notebook": {"papermill", "yaml", "nbclient", "traitlets"}}


@pytest.mark.parametrize("name", bundle.MODULES)
def test_target_modules_import_only_the_standard_library_and_siblings(name: str) -> None:
    tree = ast.parse((PACKAGE_DIR / f"{name}.py").read_text())
    for node in tree.body:  # module level: the standard library and siblings only
        assert not isinstance(node, (ast.Import, ast.ImportFrom)) or _stdlib_or_sibling(node), (
            f"{name}.py imports {ast.unparse(node)} at module level"
        )
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots = [alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # a sibling: shipped with the package
                assert node.module is None or node.module.split(".")[0] in bundle.MODULES
                continue
            roots = [str(node.module).split(".")[0]]
        else:
            continue
        for root in roots:
            allowed = sys.stdlib_module_names | JOB_IMPORTS.get(name, set())
            assert root in allowed, f"{name}.py imports {root}"


def _stdlib_or_sibling(node: ast.Import | ast.ImportFrom) -> bool:
    if isinstance(node, ast.ImportFrom):
        if node.level:
            return True
        return str(node.module).split(".")[0] in sys.stdlib_module_names | {"__future__"}
    return all(alias.name.split(".")[0] in sys.stdlib_module_names for alias in node.names)


def test_program_runs_an_op_in_a_bare_interpreter(tmp_path: Path) -> None:
    code = bundle.program("ops.preflight", {"root": str(tmp_path)})
    done = subprocess.run(
        [sys.executable, "-I", "-"], input=code, capture_output=True, text=True, timeout=60,
        cwd=tmp_path, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    info = reply.parse(done.stdout)
    assert info["executable"] and info["free_bytes"] > 0
    with pytest.raises(ValueError, match="unknown target call"):
        bundle.program("os.system", {})


def test_reply_parse_needs_the_sentinel_line() -> None:
    assert reply.parse(f'noise {{"a": 1}}\n{reply.SENTINEL}{{"a": 2}}\n') == {"a": 2}
    with pytest.raises(reply.MissingReply) as caught:
        reply.parse('{"a": 1}\nlast\n')
    assert caught.value.tail == ['{"a": 1}', "last"]


def test_launcher_archive_is_reproducible_and_runs(tmp_path: Path) -> None:
    archive = tmp_path / "launcher.pyz"
    archive.write_bytes(bundle.launcher_archive())
    assert bundle.launcher_archive() == archive.read_bytes()
    done = subprocess.run([sys.executable, "-I", str(archive)], capture_output=True, text=True,
                          timeout=60, check=False)  # fmt: skip
    assert done.returncode == 2 and "usage: python launcher.pyz <run_dir>" in done.stderr


def test_proc_reader_sees_this_process_and_its_group() -> None:
    import os

    me = proc.read_stat(os.getpid())
    assert me is not None and me.pid == os.getpid() and me.ppid == os.getppid()
    assert proc.is_alive(os.getpid(), me.start_ticks)
    assert not proc.is_alive(os.getpid(), me.start_ticks + 1)  # a "reused" pid
    assert os.getpid() in proc.group_members(os.getpgid(0))
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert child.pid in proc.descendants(os.getpid())
    finally:
        child.kill()
        child.wait()
    assert proc.start_ticks(child.pid) is None


def test_no_runner_module_is_over_400_lines() -> None:
    long = {
        str(path.relative_to(RUNNER_DIR)): n
        for path in RUNNER_DIR.rglob("*.py")
        if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert long == {}
