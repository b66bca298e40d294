"""What a remote target needs besides the notebook: the code tree and a bootstrap plan.

`remote_prepare` returns the `prepare` callback `lifecycle.submit` calls with the preflight
facts; the local target needs neither (the job imports the checkout directly), so it gets None.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from versa_runner.backends.base import Backend, ProgressFn
from versa_runner.runs import bootstrap, codesync
from versa_runner.runs.lifecycle import LaunchAdditions

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # holds kernels/ and notebooks/

TransferProgress = Callable[[str], AbstractContextManager[ProgressFn | None]]
"""Opens a progress display for one transfer (the CLI's `Output.transfer`)."""


def remote_prepare(
    backend: Backend, task_name: str, profile: str, transfer: TransferProgress,
    *, project_root: Path = PROJECT_ROOT, archive: codesync.CodeArchive | None = None,
) -> Callable[[dict[str, Any]], LaunchAdditions] | None:  # fmt: skip
    """The prepare step for `backend`: sync the code tree, plan the bootstrap (remote only).

    `archive`: the code to ship (a resumed run's own), instead of the checkout's current tree.
    """
    if backend.name == "local":
        return None

    def prepare(preflight_info: dict[str, Any]) -> LaunchAdditions:
        with tempfile.TemporaryDirectory(prefix="versa-code-") as work_dir:
            with transfer("uploading code") as progress:
                code_dir = codesync.stage_code(
                    backend, project_root, Path(work_dir), progress=progress, archive=archive
                )
        plan = bootstrap.plan_bootstrap(
            profile=profile,
            python=preflight_info["executable"],
            task=task_name,
            root=backend.root(),
        )
        return LaunchAdditions(
            pythonpath=[*codesync.code_pythonpath(code_dir), *plan.pythonpath],
            env=dict(plan.env),
            bootstrap=list(plan.steps),
        )

    return prepare


__all__ = ["PROJECT_ROOT", "TransferProgress", "remote_prepare"]
