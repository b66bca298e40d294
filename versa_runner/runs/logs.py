"""Reading a run's log and waiting for its end: `logs`, `logs --follow` and `wait`.

Reads are byte-offset Range reads of `run.log` (1 MiB each, versa_spec §8.15); deadlines use
`time.monotonic` and time is injected (`clock`, `sleep`) so tests control them.
"""

from __future__ import annotations

import codecs
import time
from collections.abc import Callable

from versa_runner.backends.base import Backend
from versa_runner.errors import UnreachableError, WaitTimeoutError
from versa_runner.runs.journal import RunRecord
from versa_runner.runs.status import RunState, RunStatus, read_status
from versa_runner.target.layout import LOG_FILE

LOG_READ_BYTES = 1 << 20  # 1 MiB per Range read (versa_spec §8.15)
FOLLOW_PATIENCE_S = 600.0
"""How long `follow` keeps retrying an unreachable target before giving up."""
LOG_POLL_S = 1.0  # follow/wait poll interval (brief: 1-2 s)


class LogReader:
    """Reads run.log from a byte offset, decoding UTF-8 incrementally across reads.

    A multibyte character split by a read boundary is carried to the next read instead of being
    replaced (versa_spec §6 item 12).
    """

    def __init__(self, backend: Backend, record: RunRecord, *, offset: int = 0) -> None:
        self.backend = backend
        self.path = f"{record.run_dir}/{LOG_FILE}"
        self.offset = offset
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def read_new(self) -> str:
        """Everything appended since the last call (reads in 1 MiB Range requests)."""
        parts: list[str] = []
        while True:
            chunk = self.backend.read_bytes(self.path, offset=self.offset, length=LOG_READ_BYTES)
            if not chunk:
                return "".join(parts)
            self.offset += len(chunk)
            parts.append(self._decoder.decode(chunk))
            if len(chunk) < LOG_READ_BYTES:
                return "".join(parts)


def tail_lines(backend: Backend, record: RunRecord, lines: int) -> tuple[str, int]:
    """The last `lines` lines of run.log and the log's size (the offset to follow from)."""
    path = f"{record.run_dir}/{LOG_FILE}"
    info = backend.stat(path)
    if info is None:
        return "", 0
    window = max(LOG_READ_BYTES, lines * 512)
    start = max(0, info.size_bytes - window)
    data = backend.read_bytes(path, offset=start, length=info.size_bytes - start) or b""
    text = data.decode("utf-8", errors="replace")
    kept = text.splitlines(keepends=True)[-lines:] if lines > 0 else []
    return "".join(kept), start + len(data)


def follow(
    backend: Backend,
    record: RunRecord,
    *,
    emit: Callable[[str], None],
    offset: int = 0,
    poll_s: float = LOG_POLL_S,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    patience_s: float = FOLLOW_PATIENCE_S,
    on_offset: Callable[[int], None] | None = None,
) -> RunStatus:
    """Stream run.log until the run is terminal, then do one final read; returns the status.

    A target that stops answering (a dropped proxy, a Kaggle hiccup) is retried from the same
    byte offset for up to `patience_s` seconds before the UnreachableError is raised.
    """
    reader = LogReader(backend, record, offset=offset)
    unreachable_since: float | None = None
    while True:
        status = read_status(backend, record)
        try:
            if status.state is RunState.UNREACHABLE:
                raise UnreachableError(f"run {record.run_id}: the target stopped answering")
            text = reader.read_new()
        except UnreachableError:
            now = clock()
            unreachable_since = now if unreachable_since is None else unreachable_since
            if now - unreachable_since > patience_s:
                raise
            sleep(poll_s)
            continue
        unreachable_since = None
        if text:
            emit(text)
            if on_offset is not None:
                on_offset(reader.offset)
        if status.state.is_terminal:
            text = reader.read_new()  # the launcher's last lines land just before exit_code
            if text:
                emit(text)
                if on_offset is not None:
                    on_offset(reader.offset)
            return status
        sleep(poll_s)


def wait(
    backend: Backend,
    record: RunRecord,
    *,
    timeout_s: float | None,
    poll_s: float = LOG_POLL_S,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    patience_s: float = FOLLOW_PATIENCE_S,
) -> RunStatus:
    """Poll until the run is terminal; WaitTimeoutError when `timeout_s` runs out first.

    A target that stops answering is polled on for `patience_s` seconds (a Kaggle proxy drops
    for a minute now and then), then UnreachableError.
    """
    deadline = None if timeout_s is None else clock() + timeout_s
    unreachable_since: float | None = None
    while True:
        status = read_status(backend, record)
        if status.state.is_terminal:
            return status
        if status.state is RunState.UNREACHABLE:
            now = clock()
            unreachable_since = now if unreachable_since is None else unreachable_since
            if now - unreachable_since >= patience_s:
                raise UnreachableError(f"run {record.run_id}: the target stopped answering "
                                       f"for {now - unreachable_since:.0f} s")  # fmt: skip
        else:
            unreachable_since = None
        if deadline is not None and clock() >= deadline:
            raise WaitTimeoutError(
                f"run {record.run_id} still {status.state.value} after {timeout_s:g} s"
            )
        sleep(poll_s)
