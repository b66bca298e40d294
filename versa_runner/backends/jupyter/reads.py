"""Reading a run's small files (status.json, exit_code, run.log ranges) off a Jupyter server.

Through `/files/` with Range first. When that handler keeps failing, through the contents API
(`GET /api/contents/<path>?content=1&format=base64`), and for the next `FILES_FALLBACK_S`
without trying `/files/` first, so a follower does not pay the retries on every poll. Kaggle's
proxy has failed `/files/` while the contents API answered (versa_spec §3.4, §3.5, §8.6), and a
follower must go on reading the run's status files whatever happens to the kernel, the
websocket or one handler (issue 14).
"""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Callable

from versa_runner.backends.jupyter.http import JupyterHttp, contents_path
from versa_runner.errors import UnreachableError

log = logging.getLogger(__name__)

FILES_FALLBACK_S = 60.0
_FRESH = {"Cache-Control": "no-cache"}  # a status file from a proxy's cache is a lie


class RunFileReader:
    """`read(path, offset, length)` over `/files/`, falling back to the contents API."""

    def __init__(self, http: JupyterHttp, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.http = http
        self.clock = clock
        self.files_failing_until = 0.0

    def read(self, path: str, offset: int, length: int | None) -> bytes | None:
        """Bytes of `path` from `offset` (at most `length`); None when the file is absent."""
        if self.clock() < self.files_failing_until:
            return self.read_contents(path, offset, length)
        try:
            return self.http.read_range(path, offset, length)
        except UnreachableError as exc:
            log.info("GET /files/%s failed (%s); reading through the contents API", path, exc)
            self.files_failing_until = self.clock() + FILES_FALLBACK_S
            try:
                return self.read_contents(path, offset, length)
            except UnreachableError:
                raise exc from None

    def read_contents(self, path: str, offset: int, length: int | None) -> bytes | None:
        """`path` from `offset` through the contents API (the whole file travels, base64)."""
        params = {"content": "1", "format": "base64", "type": "file"}
        resp = self.http.request("GET", contents_path(path), params=params, headers=_FRESH,
                                 ok=(200, 400, 404))  # fmt: skip
        if resp.status_code != 200:  # 404 absent; 400 a directory or not a readable file
            return None
        body = base64.b64decode(resp.json().get("content") or "")
        return body[offset:] if length is None else body[offset : offset + length]


__all__ = ["FILES_FALLBACK_S", "RunFileReader"]
