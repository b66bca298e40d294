"""Operations the host runs on a target through `Backend.run_python` (standard library only).

Each op takes one JSON-ready dict and returns one; `versa_runner.target.bundle.program` ships
this package's source with the call and prints the result as the one reply line
(`reply.emit`). Every op is safe to run twice and never sees a secret.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from typing import Any

from . import files, inputs, layout, proc

KILLED_EXIT_CODE = 137  # 128 + SIGKILL: what a shell reports for a job killed outright
KILL_POLL_S = 0.2
NVIDIA_SMI_TIMEOUT_S = 20


def preflight(args: dict[str, Any]) -> dict[str, Any]:
    """Python, papermill/ipykernel presence, free disk under the root, GPUs, host name, and
    what is wrong with the task's inputs here (`inputs.check_inputs` of `args["checks"]`)."""
    root = args["root"]
    os.makedirs(root, exist_ok=True)
    gpus: list[str] = []
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True,
                                 timeout=NVIDIA_SMI_TIMEOUT_S)  # fmt: skip
            gpus = [line.strip() for line in out.stdout.splitlines() if line.strip()]
        except (OSError, subprocess.SubprocessError):
            gpus = []
    return {
        "python": platform.python_version(),
        "executable": sys.executable,
        "papermill": importlib.util.find_spec("papermill") is not None,
        "ipykernel": importlib.util.find_spec("ipykernel") is not None,
        "free_bytes": shutil.disk_usage(root).free,
        "gpus": gpus,
        "host": platform.node(),
        "input_errors": inputs.check_inputs(root, list(args.get("checks") or [])),
    }


def launch(args: dict[str, Any]) -> dict[str, Any]:
    """Start the launcher in its own session. Idempotent: a second call for the same run dir
    reports the first launch (the `pid` file is written right after Popen)."""
    run_dir = args["run_dir"]
    pid_file = os.path.join(run_dir, layout.PID_FILE)
    if os.path.exists(pid_file):
        with open(pid_file, encoding="utf-8") as fh:
            return {"pid": int(fh.read().strip()), "already_launched": True}
    with open(os.path.join(run_dir, layout.LOG_FILE), "ab") as log:
        started = subprocess.Popen(
            [sys.executable, os.path.join(run_dir, layout.LAUNCHER_ARCHIVE), run_dir],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, close_fds=True,
            start_new_session=True, cwd=args["cwd"],
        )  # fmt: skip
    files.atomic_write_text(pid_file, f"{started.pid}\n")
    return {"pid": started.pid, "already_launched": False}


def kill(args: dict[str, Any]) -> dict[str, Any]:
    """SIGTERM the launcher's group (it ends papermill and the kernel), wait the grace period
    for `exit_code`, then SIGKILL whatever of the run is still alive.

    Pids come from status.json and are signalled only while their start time still matches
    (a recycled pid is never signalled). A stale run (launcher dead, papermill alive) has its
    papermill tree ended directly, and `killed` is recorded on the launcher's behalf.
    """
    run_dir = args["run_dir"]
    with open(os.path.join(run_dir, layout.STATUS_FILE), encoding="utf-8") as fh:
        status = json.load(fh)
    pid, pgid = status["pid"], status["pgid"]
    exit_file = os.path.join(run_dir, layout.EXIT_CODE_FILE)
    result = {"signalled": False, "escalated": False, "reason": ""}
    launcher_alive = proc.is_alive(pid, status.get("pid_start_ticks"))
    papermill = status.get("papermill_pid")
    papermill_alive = bool(papermill) and proc.is_alive(
        papermill, status.get("papermill_start_ticks")
    )
    if os.path.exists(exit_file):
        result["reason"] = "already ended"
    elif not launcher_alive and not papermill_alive:
        result["reason"] = "no process of the run is alive (or its pids were reused)"
    else:
        _end_run(args, pid, pgid, papermill, launcher_alive, papermill_alive, exit_file, result)
    if not os.path.exists(exit_file):
        now = time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())
        files.atomic_write_text(exit_file, f"{KILLED_EXIT_CODE}\n")
        status.update(state="killed", exit_code=KILLED_EXIT_CODE, ended_at=now)
        files.atomic_write_text(os.path.join(run_dir, layout.STATUS_FILE),
                                json.dumps(status, indent=2, sort_keys=True))  # fmt: skip
    return result


def _end_run(
    args: dict[str, Any], pid: int, pgid: int, papermill: int | None, launcher_alive: bool,
    papermill_alive: bool, exit_file: str, result: dict[str, Any],
) -> None:  # fmt: skip
    roots = [pid] if launcher_alive else []
    if papermill is not None and papermill_alive:
        roots.append(papermill)
    procs: dict[int, int] = {}
    for root in roots:
        procs.update(proc.descendants(root))
    if launcher_alive:  # the launcher forwards SIGTERM to papermill's group and the kernel's
        proc.send_signal([], [pgid], signal.SIGTERM)
    else:  # stale run: the launcher died, papermill and the kernel may still be running
        if papermill is not None:
            procs[papermill] = papermill
        proc.send_signal(list(procs), set(procs.values()), signal.SIGTERM)
    result["signalled"] = True
    deadline = time.monotonic() + args["grace_s"]
    while time.monotonic() < deadline and not os.path.exists(exit_file):
        for root in roots:
            if proc.start_ticks(root) is not None:
                procs.update(proc.descendants(root))
        if not launcher_alive and all(proc.start_ticks(p) is None for p in procs):
            break
        time.sleep(KILL_POLL_S)
    own = [pid] if launcher_alive else []  # never signal a pid we could not verify
    alive = [p for p in list(procs) + own if proc.start_ticks(p) is not None]
    if alive:
        result["escalated"] = True
        groups = set(procs.values()) | ({pgid} if launcher_alive else set())
        proc.send_signal(alive, groups, signal.SIGKILL)
