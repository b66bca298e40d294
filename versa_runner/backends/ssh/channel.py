"""Reading an SSH exec channel to the end: stdout and stderr drained together, with a deadline."""

from __future__ import annotations

import time

import paramiko

from versa_runner.errors import TargetError
from versa_runner.fsutil import CHUNK_BYTES

EXEC_POLL_S = 0.01


def collect(channel: paramiko.Channel, timeout_s: float) -> tuple[bytes, bytes]:
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
