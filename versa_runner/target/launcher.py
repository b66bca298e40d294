"""The program that runs a job on the target: `python launcher.pyz <run_dir>` in its own session.

Standard library only: this package is uploaded as a zip app (`launcher.pyz`, built by
`target.bundle`) into `versa_runs/<run_id>/` on targets that may not have `versa_runner`
installed, so it imports only its siblings (versa_spec §8.4, §8.5). From a checkout the same
module runs as `python -m versa_runner.target.launcher <run_dir>`.

What it does, in order (each step leaves evidence before anything can fail later):

1. writes `status.json` `{state: running, started_at, pid, pgid, host}` (atomic tmp + rename);
2. loads `secrets.env` (mode 0600, one `NAME=<json string>` per line) into the job environment
   and DELETES it at once; only the secret *names* are ever logged;
3. runs the bootstrap steps listed in `launch.json` (each with its own timeout, output appended
   to `run.log`); the first failure ends the run as `bootstrap_failed`, exit code 5;
4. runs papermill in a new process session with output appended to `run.log`, touching
   `heartbeat` every `heartbeat_interval_s` while it runs;
5. on SIGTERM/SIGINT terminates papermill's group *and* every process descended from it (the
   Jupyter kernel starts its own session, and a notebook's subprocesses live in the kernel's group),
   escalating to SIGKILL after `kill_grace_s`, and records `killed`;
6. writes `exit_code`, then the final `status.json`.

`launch.json` (all keys optional): `cwd`, `pythonpath` (list), `env` (non-secret dict),
`bootstrap` (list of `{argv, timeout_s}`), `heartbeat_interval_s`, `kill_grace_s`,
`kernel_name`, `execution_timeout_s`, `job_timeout_s`, `notebook_copy` (path under cwd where
the executed notebook is copied when the job ends).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import signal
import socket
import subprocess
import sys
import time

from . import fileops, files, proc
from .layout import (
    EXIT_CODE_FILE,
    HEARTBEAT_FILE,
    INPUT_NOTEBOOK,
    LAUNCH_FILE,
    LOG_FILE,
    OUTPUT_DIRS,
    OUTPUT_NOTEBOOK,
    PARAMS_FILE,
    SECRETS_FILE,
    STATUS_FILE,
    WRITTEN_FILE,
)
from .notebook import QUIET_WARNINGS

DEFAULT_HEARTBEAT_INTERVAL_S = 15.0
DEFAULT_KILL_GRACE_S = 10.0
AUTOSAVE_CELL_EVERY_S = 30
BOOTSTRAP_EXIT_CODE = 5  # ExitCode.BOOTSTRAP of the host (versa_spec §8.6)
TIMEOUT_EXIT_CODE = 124  # same convention as coreutils `timeout`
SIGNAL_EXIT_BASE = 128  # a job ended by signal N exits 128 + N, like a shell reports it
POLL_S = 0.2
LOG_PREFIX = "[versa-runner]"
# Bootstrap steps that run this package's own modules (`packages`) find it through these two
# variables: the sys.path entry holding the package, and its name (`versa_target` in the zip
# app, `versa_runner.target` in a checkout).
TARGET_PATH_ENV = "VERSA_TARGET_PATH"
TARGET_PACKAGE_ENV = "VERSA_TARGET_PACKAGE"


# `python -c NOTEBOOK_BOOT <package path> <package name> <json>` runs `notebook.main` from the
# same copy of this package the launcher runs from (zip app or checkout).
NOTEBOOK_BOOT = (
    "import importlib, sys; sys.path.insert(0, sys.argv[1]); "
    "sys.exit(importlib.import_module(sys.argv[2] + '.notebook').main(sys.argv[3:]))"
)


def utc_now() -> str:
    """ISO-8601 UTC timestamp with a trailing Z."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def package_location() -> tuple[str, str]:
    """(sys.path entry that holds this package, the package's dotted name)."""
    package = __package__ or "versa_target"
    path = os.path.dirname(os.path.abspath(__file__))
    for _ in package.split("."):
        path = os.path.dirname(path)
    return path, package


class Launcher:
    """One job's supervisor; state lives in files of `run_dir`, never only in memory."""

    def __init__(self, run_dir: str) -> None:
        self.run_dir = os.path.abspath(run_dir)
        self.config = self._read_launch_config()
        self.heartbeat_interval_s = float(
            self.config.get("heartbeat_interval_s", DEFAULT_HEARTBEAT_INTERVAL_S)
        )
        self.kill_grace_s = float(self.config.get("kill_grace_s", DEFAULT_KILL_GRACE_S))
        self.status: dict[str, object] = {}
        self.stop_signal: int | None = None
        self.started_epoch: float | None = None
        self.log = open(self._path(LOG_FILE), "ab", buffering=0)  # noqa: SIM115 (lives as long as the run)

    def _path(self, name: str) -> str:
        return os.path.join(self.run_dir, name)

    def _read_launch_config(self) -> dict[str, object]:
        path = os.path.join(self.run_dir, LAUNCH_FILE)
        if not os.path.exists(path):
            return {}
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)

    def say(self, text: str) -> None:
        """Append one line to run.log; never called with a secret value."""
        self.log.write(f"{LOG_PREFIX} {utc_now()} {text}\n".encode())

    def write_status(self, **fields: object) -> None:
        """Merge `fields` into status.json and rewrite it atomically."""
        self.status.update(fields)
        files.atomic_write_text(
            self._path(STATUS_FILE), json.dumps(self.status, indent=2, sort_keys=True)
        )

    def touch_heartbeat(self) -> None:
        """Bump the heartbeat's mtime (readers use only the mtime, so no fsync: under load an
        fsync per beat measured seconds on a shared CI disk)."""
        path = self._path(HEARTBEAT_FILE)
        with open(path, "a", encoding="utf-8"):
            pass
        os.utime(path)

    def finish(self, state: str, exit_code: int) -> int:
        """Write `exit_code` first, then the final status (readers key off exit_code's presence)."""
        self.keep_executed_notebook()
        self.record_written()
        files.atomic_write_text(self._path(EXIT_CODE_FILE), f"{exit_code}\n")
        self.write_status(state=state, exit_code=exit_code, ended_at=utc_now())
        self.say(f"state={state} exit_code={exit_code}")
        return exit_code

    def keep_executed_notebook(self) -> None:
        """Copy output.ipynb to `notebook_copy` (e.g. reports/notebooks/<run>_<task>.ipynb) under
        the job cwd, so the executed notebook travels with the job's reports on every target."""
        relative = self.config.get("notebook_copy")
        source = self._path(OUTPUT_NOTEBOOK)
        if not relative or not os.path.exists(source):
            return
        target = os.path.join(str(self.config.get("cwd") or os.getcwd()), str(relative))
        try:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(source, encoding="utf-8") as fh:
                files.atomic_write_text(target, fh.read())
        except OSError as exc:  # evidence first: a failed copy must not lose the exit code
            self.say(f"could not copy the executed notebook to {relative}: {exc}")

    def record_written(self) -> None:
        """List in `written.json` the files under the cwd's artifacts/ and reports/ that changed
        while this run lived: what `sync` brings back for it by default."""
        if self.started_epoch is None:
            return
        cwd = str(self.config.get("cwd") or os.getcwd())
        try:
            found = fileops.walk(cwd, list(OUTPUT_DIRS))
            paths = fileops.modified_since(cwd, found, self.started_epoch)
            record = {"paths": paths, "since": self.started_epoch, "until": time.time()}
            files.atomic_write_text(self._path(WRITTEN_FILE), json.dumps(record, indent=1))
        except OSError as exc:  # evidence first: sync then falls back to the time window
            self.say(f"could not record the files this run wrote: {exc}")

    def load_secrets(self) -> dict[str, str]:
        """Read and delete secrets.env; values go to the job env only."""
        path = self._path(SECRETS_FILE)
        if not os.path.exists(path):
            return {}
        try:
            with open(path, encoding="utf-8") as fh:
                lines = fh.read().splitlines()
        finally:
            os.unlink(path)
        secrets: dict[str, str] = {}
        for line in lines:
            name, sep, encoded = line.partition("=")
            if sep:
                secrets[name] = json.loads(encoded)
        self.say(f"loaded {len(secrets)} secret(s): {', '.join(sorted(secrets)) or '-'}")
        return secrets

    def job_env(self, secrets: dict[str, str]) -> dict[str, str]:
        """The job's environment: ours, launch.json `env`, PYTHONPATH entries, then secrets."""
        env = dict(os.environ)
        env.update({str(k): str(v) for k, v in dict(self.config.get("env", {})).items()})
        extra = [str(p) for p in self.config.get("pythonpath", [])]
        if extra:
            current = env.get("PYTHONPATH", "")
            env["PYTHONPATH"] = os.pathsep.join(extra + ([current] if current else []))
        env["PYTHONUNBUFFERED"] = "1"
        quiet = ",".join(QUIET_WARNINGS)
        env["PYTHONWARNINGS"] = (
            f"{env['PYTHONWARNINGS']},{quiet}" if env.get("PYTHONWARNINGS") else quiet
        )
        env.update(secrets)
        return env

    def on_signal(self, signum: int, _frame: object) -> None:
        """Record a stop request; the supervise loop acts on it (never work in a handler)."""
        self.stop_signal = signum

    def run_bootstrap(self, env: dict[str, str], cwd: str) -> bool:
        """Run the bootstrap steps in order; False at the first failure, timeout or stop signal.

        Each step runs in its own session so a stop signal or its timeout ends everything it
        started (a pip install spawns compilers), not just the step's first process.
        """
        path, package = package_location()
        step_env = {**env, TARGET_PATH_ENV: path, TARGET_PACKAGE_ENV: package}
        for index, step in enumerate(self.config.get("bootstrap", [])):
            argv = [str(a) for a in step["argv"]]
            timeout_s = float(step.get("timeout_s", 600))
            self.say(f"bootstrap step {index + 1}: {argv[0]} (timeout {timeout_s:.0f} s)")
            try:
                step_proc = subprocess.Popen(
                    argv, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    env=step_env, cwd=cwd, start_new_session=True, close_fds=True,
                )  # fmt: skip
            except OSError as exc:
                self.say(f"bootstrap step {index + 1} could not start: {exc}")
                return False
            deadline = time.monotonic() + timeout_s
            code = None
            while code is None:
                try:
                    code = step_proc.wait(timeout=POLL_S)
                except subprocess.TimeoutExpired:
                    if self.stop_signal is not None or time.monotonic() > deadline:
                        self.terminate(step_proc)
                        code = TIMEOUT_EXIT_CODE if self.stop_signal is None else -1
            if code != 0:
                self.say(f"bootstrap step {index + 1} failed with exit code {code}")
                return False
        return True

    def papermill_argv(self, cwd: str) -> list[str]:
        """The job's command line: `notebook.run` of this package, i.e. papermill with the
        options of versa_spec §8.5 (see `notebook`); secrets never appear in it."""
        timeout = self.config.get("execution_timeout_s")
        args = {
            "input": self._path(INPUT_NOTEBOOK), "output": self._path(OUTPUT_NOTEBOOK),
            "parameters": self._path(PARAMS_FILE), "cwd": cwd,
            "kernel_name": str(self.config.get("kernel_name", "python3")),
            "autosave_cell_every_s": AUTOSAVE_CELL_EVERY_S,
            "execution_timeout_s": int(float(str(timeout))) if timeout else None,
        }  # fmt: skip
        path, package = package_location()
        return [sys.executable, "-c", NOTEBOOK_BOOT, path, package, json.dumps(args)]

    def supervise(self, papermill: subprocess.Popen[bytes]) -> tuple[str, int]:
        """Wait for papermill, heartbeating; on a stop signal or deadline end its whole tree."""
        job_timeout_s = self.config.get("job_timeout_s")
        deadline = time.monotonic() + float(job_timeout_s) if job_timeout_s else None
        next_beat = time.monotonic() + self.heartbeat_interval_s
        while True:
            try:
                code = papermill.wait(timeout=POLL_S)
                return ("succeeded", 0) if code == 0 else ("failed", code)
            except subprocess.TimeoutExpired:
                pass
            if self.stop_signal is not None:
                self.say(f"received signal {self.stop_signal}; ending the job's process tree")
                self.terminate(papermill)
                return "killed", SIGNAL_EXIT_BASE + self.stop_signal
            if deadline is not None and time.monotonic() > deadline:
                self.say(f"job ran past job_timeout_s={job_timeout_s}; ending it")
                self.terminate(papermill)
                return "timeout", TIMEOUT_EXIT_CODE
            if time.monotonic() >= next_beat:
                self.touch_heartbeat()
                next_beat = time.monotonic() + self.heartbeat_interval_s

    def terminate(self, papermill: subprocess.Popen[bytes]) -> None:
        """SIGTERM papermill's group and all its descendants, SIGKILL what is left after grace."""
        own_pgid = os.getpgid(0)
        tree = proc.descendants(os.getpid())
        _signal_tree(tree, signal.SIGTERM, own_pgid)
        deadline = time.monotonic() + self.kill_grace_s
        while time.monotonic() < deadline:
            tree.update(proc.descendants(os.getpid()))
            alive = {pid: pgid for pid, pgid in tree.items() if proc.start_ticks(pid) is not None}
            if papermill.poll() is not None and not alive:
                break
            time.sleep(POLL_S)
        tree.update(proc.descendants(os.getpid()))
        _signal_tree(tree, signal.SIGKILL, own_pgid)
        try:
            papermill.wait(timeout=self.kill_grace_s)
        except subprocess.TimeoutExpired:
            self.say("papermill did not exit after SIGKILL")

    def run(self) -> int:
        # Handlers first: a kill that lands while status.json is being written is still recorded.
        """Run the job start to finish; returns the exit code it recorded."""
        signal.signal(signal.SIGTERM, self.on_signal)
        signal.signal(signal.SIGINT, self.on_signal)
        cwd = str(self.config.get("cwd") or os.getcwd())
        self.started_epoch = time.time()
        self.write_status(
            state="running", started_at=utc_now(), pid=os.getpid(), pgid=os.getpgid(0),
            pid_start_ticks=proc.start_ticks(os.getpid()), host=socket.gethostname(),
            heartbeat_interval_s=self.heartbeat_interval_s, job_cwd=cwd,
        )  # fmt: skip
        self.touch_heartbeat()
        env = self.job_env(self.load_secrets())
        self.say(f"launcher pid={os.getpid()} run_dir={self.run_dir} cwd={cwd}")
        bootstrapped = self.run_bootstrap(env, cwd)
        if self.stop_signal is not None:
            return self.finish("killed", SIGNAL_EXIT_BASE + self.stop_signal)
        if not bootstrapped:
            return self.finish("bootstrap_failed", BOOTSTRAP_EXIT_CODE)
        argv = self.papermill_argv(cwd)
        self.say("starting papermill")
        papermill = subprocess.Popen(
            argv, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, cwd=cwd, start_new_session=True, close_fds=True,
        )  # fmt: skip
        self.write_status(
            papermill_pid=papermill.pid, papermill_start_ticks=proc.start_ticks(papermill.pid)
        )
        state, exit_code = self.supervise(papermill)
        return self.finish(state, exit_code)


def _signal_tree(pids: dict[int, int], sig: int, own_pgid: int) -> None:
    """Send `sig` to each process group in `pids` (never our own) and to each pid."""
    proc.send_signal(pids, [pgid for pgid in pids.values() if pgid != own_pgid], sig)


def main(argv: list[str]) -> int:
    """Entry point: `python launcher.py <run_dir>`."""
    if len(argv) != 2:
        sys.stderr.write("usage: python launcher.pyz <run_dir>\n")
        return 2
    launcher = Launcher(argv[1])
    try:
        return launcher.run()
    except Exception as exc:  # the run must end with evidence, whatever went wrong
        launcher.say(f"launcher error: {type(exc).__name__}: {exc}")
        return launcher.finish("failed", 1)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
