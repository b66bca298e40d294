"""Plain exceptions raised by `versa_kernels` (the GPU side), mirroring the host's error tree.

`versa_kernels` must not import `versa_runner` (the boundary in DESIGN.md), so it keeps its own
small tree with the same shape: one root, each error carrying a `hint` that says what to do next.
The notebook prints the message and the hint; the launcher turns the failing cell into the job's
exit code.

    KernelError                 root; `hint` says what to do next
    ├── ParameterError          a parameter value is not allowed (names the parameter and values)
    ├── DataError               calibration data is missing, unreadable or has no usable text
    └── CheckpointFormatError   a checkpoint or output directory is not what the code needs
"""

from __future__ import annotations


class KernelError(Exception):
    """Root of every expected failure raised by `versa_kernels`."""

    default_hint: str = ""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint if hint is not None else self.default_hint

    def __str__(self) -> str:
        return f"{self.message} (hint: {self.hint})" if self.hint else self.message


class ParameterError(KernelError, ValueError):
    """A parameter is out of range or a combination of parameters cannot be satisfied."""

    default_hint = "Change the named parameter to one of the allowed values."


class DataError(KernelError):
    """Calibration data is missing, unreadable, or has no text the task can use."""

    default_hint = "Check the pack files (parquet with a text column of Harmony-formatted rows)."


class CheckpointFormatError(KernelError):
    """A checkpoint or output directory does not have the layout the code needs."""

    default_hint = (
        "Point the parameter at a gpt-oss checkpoint directory (config.json + safetensors)."
    )
