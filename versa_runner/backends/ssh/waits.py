"""Bounded waits on an SSH connection: no call of the SSH backend waits without a deadline.

paramiko's own waits are unbounded in places: a channel's `exec_command` and the SFTP subsystem
request wait for the server's answer forever, opening a channel waits an hour, and an SFTP read
on a connection whose peer stopped answering (a hung host, a stalled network) never returns.
So every SFTP request times out after `io_timeout_s` of silence (a channel timeout), and an exec
or SFTP start runs under `watchdog`, which closes the connection when the block overruns; the
blocked wait then ends with an error the backend reports as UnreachableError (issue 14).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import paramiko

from versa_runner.errors import TargetError, UnreachableError, UsageError
from versa_runner.fsutil import CHUNK_BYTES

IO_TIMEOUT_S = 30.0
"""An SFTP request with no answer for this long fails (the connection is then re-opened)."""
IO_TIMEOUT_ENV = "VERSA_RUNNER_IO_TIMEOUT_S"  # tests shorten it
EXEC_POLL_S = 0.01


def io_timeout_from_env(environ: Mapping[str, str]) -> float:
    """`VERSA_RUNNER_IO_TIMEOUT_S` when set (seconds > 0, finite), else `IO_TIMEOUT_S`."""
    text = environ.get(IO_TIMEOUT_ENV) or str(IO_TIMEOUT_S)
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < float("inf"):  # NaN, the infinities and negatives alike
        raise UsageError(f"{IO_TIMEOUT_ENV}: expected seconds > 0, got {text!r}")
    return seconds


@contextmanager
def watchdog(client: paramiko.SSHClient | None, seconds: float, described: str) -> Iterator[None]:
    """Close `client`'s connection if the block still runs after `seconds`; the wait it was
    stuck in then fails, and that failure is raised as UnreachableError."""
    transport = client.get_transport() if client is not None else None
    fired = threading.Event()

    def fire() -> None:
        fired.set()
        if transport is not None:
            transport.close()

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    try:
        yield
    except (paramiko.SSHException, EOFError, OSError) as exc:
        if fired.is_set():
            raise UnreachableError(f"{described} did not answer within {seconds:.0f} s") from exc
        raise
    finally:
        timer.cancel()


def collect_output(channel: paramiko.Channel, timeout_s: float) -> tuple[bytes, bytes]:
    """Drain stdout and stderr until the command exits; TargetError past `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    stdout, stderr = bytearray(), bytearray()
    while True:
        moved = False
        if channel.recv_ready():
            stdout += channel.recv(CHUNK_BYTES)
            moved = True
        if channel.recv_stderr_ready():
            stderr += channel.recv_stderr(CHUNK_BYTES)
            moved = True
        if moved:
            continue
        if channel.exit_status_ready() and (channel.eof_received or channel.closed):
            return bytes(stdout), bytes(stderr)
        if channel.closed and not channel.exit_status_ready():
            raise EOFError("the SSH channel closed before the snippet finished")
        if time.monotonic() > deadline:
            raise TargetError(f"snippet did not finish within {timeout_s:.0f} s")
        time.sleep(EXEC_POLL_S)


__all__ = ["IO_TIMEOUT_ENV", "IO_TIMEOUT_S", "collect_output", "io_timeout_from_env", "watchdog"]
