"""The job's main process: run one notebook with papermill's Python API (on the target).

Run by the launcher as `python -c <BOOT> <json args>` (see `launcher.papermill_argv`), it does
what `python -m papermill IN OUT -f params.yaml --cwd C -k K --log-output --no-progress-bar
--autosave-cell-every N [--execution-timeout S]` does, with one difference: the kernel talks to
papermill over IPC sockets, not TCP, so ipykernel (>= 7) does not warn on every run that TCP is
unencrypted (a warning the user cannot act on). A dead kernel exits 138, as papermill's CLI
does; a failing cell raises (exit 1, traceback in run.log).

Its own imports are the standard library; papermill and yaml (the job's dependencies, checked by
preflight) are imported when it runs.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from typing import Any

DEAD_KERNEL_EXIT = 138  # papermill's CLI code for a kernel that died (not a failing cell)
TRANSPORT = "ipc"
# Warnings the user cannot act on, filtered in every process of the job (the kernel inherits
# PYTHONWARNINGS): tqdm.auto asks for ipywidgets in a headless kernel.
QUIET_WARNINGS = ("ignore:IProgress not found:Warning",)


def run(args: dict[str, Any]) -> int:
    """Execute `args["input"]` into `args["output"]`; returns the process exit status."""
    import nbclient.exceptions
    import papermill
    import yaml
    from traitlets.config import Config

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with open(args["parameters"], encoding="utf-8") as fh:
        parameters = yaml.safe_load(fh) or {}
    config = Config({"KernelManager": {"transport": TRANSPORT}})
    try:
        papermill.execute_notebook(
            args["input"], args["output"], parameters=parameters, cwd=args["cwd"],
            kernel_name=args["kernel_name"], log_output=True, progress_bar=False,
            autosave_cell_every=args["autosave_cell_every_s"],
            execution_timeout=args.get("execution_timeout_s"), config=config,
        )  # fmt: skip
    except nbclient.exceptions.DeadKernelError:
        traceback.print_exc()
        return DEAD_KERNEL_EXIT
    return 0


def main(argv: list[str]) -> int:
    """`<BOOT> <json args>`."""
    return run(json.loads(argv[0]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
