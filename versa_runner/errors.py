"""Every error versa-run raises on purpose, and the exit code each one maps to.

The tree, drawn once::

    VersaRunError                  exit 1   root; `hint` says what to do next
    ├── UsageError                 exit 2   bad flag, value out of range, unknown task or run
    │   └── MissingExtraError      exit 2   a command needs an optional extra that is not installed
    ├── ConfigError                exit 2   a recipe, gates file or checkpoint config is malformed
    ├── TargetError                exit 3   the target cannot be used
    │   ├── UnreachableError       exit 3   network down, server gone, 5xx after retries
    │   ├── AuthError              exit 3   401/403: the URL credential or token expired
    │   └── PreflightError         exit 3   python/papermill/disk/GPU check refused the target
    ├── TransferError              exit 3   upload/download failed or a checksum did not match
    │   ├── UnsafePathError        exit 3   a remote path escapes its destination
    │   ├── DiskFullError          exit 3   no room for a download (the `.part` is kept)
    │   └── SyncIncompleteError    exit 3   a sync refused or failed some names; the rest is done
    ├── RunStateError              exit 4   run lost (its directory is gone) or stale (no heartbeat)
    ├── JobFailedError             exit 1   the notebook failed; carries the job's exit code
    ├── BootstrapError             exit 5   target bootstrap (pip installs, env) failed
    └── WaitTimeoutError           exit 124 `wait --timeout` ran out before the job ended

Programming mistakes raise TypeError/ValueError/RuntimeError, never these. The CLI maps
`exit_code` to the process status in exactly one place (`cli.main`).
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Process exit statuses of `versa-run` (fixed by the run protocol, versa_spec §8.6)."""

    OK = 0
    """The command (or the job it waited for) succeeded."""
    JOB_FAILED = 1
    """The job ended in failure: a failing cell, a non-zero exit, a gate that failed."""
    USAGE = 2
    """Bad command line or input; nothing was started."""
    TARGET = 3
    """Target unreachable, auth expired, preflight refused, or a transfer failed."""
    LOST = 4
    """The run is lost (its directory vanished) or stale (heartbeat stopped, no exit code)."""
    BOOTSTRAP = 5
    """Installing what the task needs on the target failed."""
    WAIT_TIMEOUT = 124
    """`wait --timeout` expired while the job was still running."""


class VersaRunError(Exception):
    """Root of every expected failure; printed as one line plus its hint."""

    exit_code: int = ExitCode.JOB_FAILED
    default_hint: str = ""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint if hint is not None else self.default_hint
        self.context: list[str] = []

    def add_context(self, text: str) -> VersaRunError:
        """Attach context (run id, target, path) as the error propagates; returns self."""
        self.context.append(text)
        return self

    def __str__(self) -> str:
        text = self.message
        if self.context:
            text += " [" + "; ".join(self.context) + "]"
        return text


class UsageError(VersaRunError):
    """A flag, value, task name or run reference is not acceptable; raised before any work."""

    exit_code = ExitCode.USAGE


class MissingExtraError(UsageError):
    """A command needs a package from an optional extra (e.g. `gpu`) that is not installed."""

    def __init__(self, command: str, package: str, extra: str = "gpu") -> None:
        super().__init__(
            f"{command} needs the package {package!r}, which is not installed",
            hint=f"Install the {extra!r} extra: pip install 'versa-runner[{extra}]'",
        )
        self.package = package
        self.extra = extra


class ConfigError(VersaRunError):
    """A file the user supplied (recipe, gates JSON, checkpoint config) is malformed."""

    exit_code = ExitCode.USAGE


class TargetError(VersaRunError):
    """The target (Jupyter server, SSH host, local machine) cannot be used."""

    exit_code = ExitCode.TARGET


class UnreachableError(TargetError):
    """The target did not answer (connection refused, timeouts, 5xx after retries)."""

    default_hint = (
        "Check that the server is still running; `versa-run doctor` tests the connection."
    )


class AuthError(TargetError):
    """The target answered 401/403."""

    default_hint = (
        "The URL or token has expired: copy a fresh one (Kaggle: a new proxy URL from the "
        "notebook) and pass it with --url-file or REMOTE_JUPYTER_URL."
    )


class PreflightError(TargetError):
    """A preflight check (python, papermill, free disk, GPU) refused the target."""


class TransferError(VersaRunError):
    """An upload or download failed, or its sha256 did not match the manifest."""

    exit_code = ExitCode.TARGET
    default_hint = "Re-run `versa-run sync RUN`; completed files are not transferred again."


class UnsafePathError(TransferError):
    """A remote-supplied path is absolute, contains `..`, or is a link leaving the destination."""

    default_hint = "The remote manifest or archive is not trustworthy; nothing was written."


class DiskFullError(TransferError):
    """The local disk cannot hold what a sync must download (checked first, and on ENOSPC)."""

    default_hint = (
        "Free space there (or pass --dest on a larger disk) and re-run `versa-run sync RUN`: "
        "partial downloads are kept and resumed."
    )


class SyncIncompleteError(TransferError):
    """A sync refused or could not verify some names; every other name is synced and verified."""

    default_hint = "The lines above name each file and why; the rest of the sync is complete."


class RunStateError(VersaRunError):
    """The run is lost (its directory vanished) or stale (no heartbeat and no exit code)."""

    exit_code = ExitCode.LOST


class JobFailedError(VersaRunError):
    """The job ended in failure; `job_exit_code` is the launcher's recorded exit code."""

    exit_code = ExitCode.JOB_FAILED

    def __init__(self, message: str, *, job_exit_code: int = 1, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.job_exit_code = job_exit_code


class BootstrapError(VersaRunError):
    """Installing what the task needs on the target failed."""

    exit_code = ExitCode.BOOTSTRAP
    default_hint = "Read the bootstrap lines in `versa-run logs RUN`; fix the pin or the index URL."


class WaitTimeoutError(VersaRunError):
    """`wait --timeout` expired before the job reached a terminal state."""

    exit_code = ExitCode.WAIT_TIMEOUT
    default_hint = (
        "The job is still running; `versa-run wait RUN` again or `versa-run logs RUN --follow`."
    )
