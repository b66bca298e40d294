"""What a remote target gets before papermill starts: the code tree and the bootstrap profile.

The bootstrap tests run the real launcher (`versa_runner/target/launcher.py`) on a run directory whose
`launch.json` comes from `plan_bootstrap`, with real pip (offline: `--no-index`) and papermill.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook
from runner_support import LAUNCHER

from versa_runner.backends.base import call_target
from versa_runner.backends.local import LocalBackend
from versa_runner.errors import UsageError
from versa_runner.runs import codesync
from versa_runner.runs.bootstrap import (
    KAGGLE_ROOT,
    plan_bootstrap,
    requirements_for,
    resolve_profile,
)
from versa_runner.target import launcher

# -- code tree ------------------------------------------------------------------------------


def make_project(root: Path) -> Path:
    (root / "kernels/versa_kernels/__pycache__").mkdir(parents=True)
    (root / "kernels/versa_kernels/.ipynb_checkpoints").mkdir()
    (root / "notebooks").mkdir()
    (root / "kernels/versa_kernels/__init__.py").write_text("VALUE = 1\n")
    (root / "kernels/versa_kernels/__pycache__/x.cpython-311.pyc").write_bytes(b"\0")
    (root / "kernels/versa_kernels/.ipynb_checkpoints/a-checkpoint.py").write_text("old\n")
    (root / "kernels/.env").write_text("HF_TOKEN=hf_secret\n")
    (root / "notebooks/task.ipynb").write_text("{}\n")
    (root / "notebooks/link.ipynb").symlink_to("/etc/passwd")
    (root / "versa_runner").mkdir()  # shipped too: the playbook driver runs on the target
    (root / "versa_runner/__init__.py").write_text("")
    return root


def test_archive_is_reproducible_and_excludes_junk(tmp_path: Path) -> None:
    project = make_project(tmp_path / "project")
    first = codesync.build_archive(project, tmp_path / "a")
    os.utime(project / "notebooks/task.ipynb", (1, 1))  # mtimes never change the archive
    second = codesync.build_archive(project, tmp_path / "b")
    assert first.sha256 == second.sha256 and first.path.read_bytes() == second.path.read_bytes()
    with tarfile.open(first.path) as tar:
        names = [m.name for m in tar.getmembers() if m.isfile()]
        assert {m.mtime for m in tar.getmembers()} == {0}
    assert names == [
        "kernels/versa_kernels/__init__.py",
        "notebooks/task.ipynb",
        "versa_runner/__init__.py",
    ]
    (project / "kernels/versa_kernels/__init__.py").write_text("VALUE = 2\n")
    assert codesync.build_archive(project, tmp_path / "c").sha256 != first.sha256


def test_stage_code_extracts_once_and_refuses_unsafe_archives(tmp_path: Path) -> None:
    project = make_project(tmp_path / "project")
    with LocalBackend(tmp_path / "target") as backend:
        code_dir = Path(codesync.stage_code(backend, project, tmp_path / "work"))
        assert (code_dir / "kernels/versa_kernels/__init__.py").read_text() == "VALUE = 1\n"
        assert codesync.code_pythonpath(str(code_dir)) == [f"{code_dir}/kernels", str(code_dir)]
        stamp = (code_dir / codesync.STATE_FILE).stat().st_mtime_ns
        assert Path(codesync.stage_code(backend, project, tmp_path / "work")) == code_dir
        assert (code_dir / codesync.STATE_FILE).stat().st_mtime_ns == stamp  # skipped

        evil = io.BytesIO()
        with tarfile.open(fileobj=evil, mode="w:gz") as tar:
            info = tarfile.TarInfo("../escaped.txt")
            info.size = 3
            tar.addfile(info, io.BytesIO(b"bad"))
        backend.put_bytes("versa_code/incoming/evil.tar.gz", evil.getvalue())
        args = {
            "root": backend.root(),
            "archive": "versa_code/incoming/evil.tar.gz",
            "code_dir": "versa_code/evil",
            "sha256": hashlib.sha256(evil.getvalue()).hexdigest(),
            "files": 1,
        }
        reply = call_target(backend, "fileops.extract_code", args, timeout_s=60)
    assert "unsafe member" in reply["error"]
    assert not (tmp_path / "target/versa_code/escaped.txt").exists()
    assert not (tmp_path / "target/versa_code/evil").exists()


# -- bootstrap profile ----------------------------------------------------------------------


def test_profile_resolution() -> None:
    assert resolve_profile("auto", KAGGLE_ROOT) == "kaggle"
    assert resolve_profile(None, "/home/me/work") == "none"
    assert resolve_profile("kaggle", "/srv/jupyter") == "kaggle"
    with pytest.raises(UsageError, match="auto, none, kaggle"):
        resolve_profile("colab", KAGGLE_ROOT)
    assert plan_bootstrap(profile="auto", python="python3", task="x", root="/srv").steps == []
    assert {"papermill", "torch", "pyarrow"} <= set(requirements_for("eaft_single"))


def test_kaggle_plan_keeps_scratch_out_of_working_and_sets_gpu_env() -> None:
    plan = plan_bootstrap(profile="auto", python="/opt/conda/bin/python", task="eaft_single",
                          root=KAGGLE_ROOT)  # fmt: skip
    assert plan.profile == "kaggle"
    assert plan.env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert plan.env["TRANSFORMERS_NO_TF"] == "1" and plan.env["PYTHONUNBUFFERED"] == "1"
    for name in ("HF_HOME", "TMPDIR", "TRITON_CACHE_DIR", "PIP_CACHE_DIR"):
        assert not plan.env[name].startswith(KAGGLE_ROOT), name
    assert plan.pythonpath and not plan.pythonpath[0].startswith(KAGGLE_ROOT)
    assert plan.steps[0]["argv"][0] == "/opt/conda/bin/python"
    merged = plan.merge_into({"env": {"TMPDIR": "/mine"}, "pythonpath": ["/code/kernels"]})
    assert merged["env"]["TMPDIR"] == "/mine"  # the job's own values win
    assert merged["pythonpath"] == ["/code/kernels", *plan.pythonpath]


def _wheel(directory: Path, module: str) -> Path:
    """A minimal pure-Python wheel, built by hand so the test needs no network or build backend."""
    dist = f"{module}-0.1.dist-info"
    files = {
        f"{module}/__init__.py": b"WHERE = __file__\n",
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.1\n".encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(
        f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},{len(data)}\n"
        for name, data in files.items()
    )
    path = directory / f"{module}-0.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as whl:
        for name, data in files.items():
            whl.writestr(name, data)
        whl.writestr(f"{dist}/RECORD", record + f"{dist}/RECORD,,\n")
    return path


def _run_launcher(run_dir: Path, launch_config: dict, notebook_source: str) -> int:
    nb = new_notebook()
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nb.cells = [new_code_cell('run_id = ""', metadata={"tags": ["parameters"]}),
                new_code_cell(notebook_source)]  # fmt: skip
    run_dir.mkdir(parents=True)
    nbformat.write(nb, run_dir / "input.ipynb")
    (run_dir / "params.yaml").write_text("run_id: test\n")
    (run_dir / "launch.json").write_text(json.dumps(launch_config))
    proc = subprocess.run([*LAUNCHER, str(run_dir)], timeout=180,
                          stdin=subprocess.DEVNULL, capture_output=True, check=False)  # fmt: skip
    return proc.returncode


def test_missing_package_is_installed_into_the_deps_dir_on_pythonpath(tmp_path: Path) -> None:
    wheel = _wheel(tmp_path, "versa_probe_pkg")
    plan = plan_bootstrap(
        profile="kaggle", python=sys.executable, task="validate_expert_math_toy",
        root=str(tmp_path / "root"), scratch_dir=str(tmp_path / "scratch"),
        extra_requirements={"versa_probe_pkg": str(wheel)}, pip_args=["--no-index"],
        always_target=True,
    )  # fmt: skip
    run_dir = tmp_path / "root/versa_runs/r1"
    config = plan.merge_into({"cwd": str(tmp_path / "root"), "heartbeat_interval_s": 1})
    source = "import versa_probe_pkg, os\nprint('PROBE_AT', versa_probe_pkg.WHERE)\n"
    assert _run_launcher(run_dir, config, source) == 0, (run_dir / "run.log").read_text()
    log_text = (run_dir / "run.log").read_text()
    assert "[versa-bootstrap] installing versa_probe_pkg into" in log_text
    assert f"PROBE_AT {tmp_path}/scratch/pydeps/versa_probe_pkg/__init__.py" in log_text
    assert json.loads((run_dir / "status.json").read_text())["state"] == "succeeded"


def test_bootstrap_failure_is_its_own_state_and_exit_code(tmp_path: Path) -> None:
    plan = plan_bootstrap(
        profile="kaggle", python=sys.executable, task="decode_bench",
        root=str(tmp_path / "root"), scratch_dir=str(tmp_path / "scratch"),
        extra_requirements={"versa_no_such_module": "versa-no-such-package==9.9"},
        pip_args=["--no-index", "--find-links", str(tmp_path)],
    )  # fmt: skip
    run_dir = tmp_path / "root/versa_runs/r2"
    config = plan.merge_into({"cwd": str(tmp_path / "root"), "heartbeat_interval_s": 1})
    assert _run_launcher(run_dir, config, "print('never runs')") == launcher.BOOTSTRAP_EXIT_CODE
    status = json.loads((run_dir / "status.json").read_text())
    assert (status["state"], status["exit_code"]) == ("bootstrap_failed", 5)
    assert (run_dir / "exit_code").read_text().strip() == "5"
    assert "[versa-bootstrap] pip failed" in (run_dir / "run.log").read_text()
    assert not (run_dir / "output.ipynb").exists()  # papermill never started


# -- upload progress ------------------------------------------------------------------------


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_upload_progress_bar_on_terminals_only() -> None:
    from versa_runner.cli.output import Output

    err = _Terminal()
    with Output(stream=io.StringIO(), err_stream=err).transfer("uploading code") as progress:
        assert progress is not None
        for _ in range(3):
            progress(1 << 20)
    assert "uploading code" in err.getvalue() and "3.1" in err.getvalue()  # 3 MiB = 3.1 MB
    piped = io.StringIO()
    with Output(stream=io.StringIO(), err_stream=piped).transfer("uploading code") as progress:
        assert progress is None
    with Output(json_mode=True, stream=io.StringIO(), err_stream=err).transfer("x") as progress:
        assert progress is None
    assert piped.getvalue() == ""
