"""HTTP side of the Jupyter target: authenticated REST calls, contents API, `/files/` downloads.

Facts this module relies on (versa_spec §2.1, §3.5; orchestration_anchors §5.1; verified on
jupyter_server 2.21):
- Auth goes on every call: `Authorization: token <t>` when a token is set. A server with auth
  disabled (Kaggle's proxy style, the URL is the credential) instead enforces XSRF on unsafe
  methods and a same-host Referer on GETs: we fetch its `_xsrf` cookie once and echo it.
- A contents PUT does not create parents (500), so callers run `mkdirs` first; PUT of an existing
  directory is a no-op.
- Chunked PUT: `chunk` 1 creates/truncates, any other number *appends*, -1 marks the last. An
  append whose answer was lost may or may not have happened, so a failed chunk is settled by
  reading the remote size: applied, not applied (resend), or neither (restart the file). A cut
  connection therefore costs at most one chunk.
- `/files/` honours `Range` (206); a 200 to a ranged request means "start over".
- Hidden names (a leading `.` in any component) are refused over both APIs (404/400).
"""

from __future__ import annotations

import base64
import json
import logging
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO
from urllib.parse import quote, urlsplit

import requests
import urllib3

from versa_runner.backends.base import ProgressFn, RemoteStat
from versa_runner.backends.jupyter.url import JupyterTarget
from versa_runner.errors import AuthError, TargetError, TransferError, UnreachableError

log = logging.getLogger(__name__)

UPLOAD_CHUNK_BYTES = 8 << 20
"""Raw bytes per contents PUT (~11 MiB of base64): a cut connection re-sends at most this."""
DOWNLOAD_READ_BYTES = 1 << 20
RETRY_STATUSES = frozenset({429, 502, 503, 504})
AUTH_STATUSES = frozenset({401, 403})


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter for idempotent HTTP calls."""

    attempts: int = 5
    base_delay_s: float = 0.5
    max_delay_s: float = 8.0
    request_timeout_s: float = 30.0
    """Bounds connect and each read; a large download may take far longer in total."""

    def delay_s(self, attempt: int) -> float:
        """Sleep before retry number `attempt` (1-based)."""
        return random.uniform(0, min(self.max_delay_s, self.base_delay_s * 2 ** (attempt - 1)))


class JupyterHttp:
    """One `requests.Session` to one server; every call authenticated, errors translated."""

    def __init__(self, target: JupyterTarget, *, retry: RetryPolicy | None = None) -> None:
        self.target = target
        self.retry = retry or RetryPolicy()
        self.session = requests.Session()
        # Same-host Referer satisfies jupyter_server's XSRF check on GETs; only scheme://host/,
        # so a redirect elsewhere never carries the path (the credential, on Kaggle).
        parts = urlsplit(target.base_url)
        self.session.headers["Referer"] = f"{parts.scheme}://{parts.netloc}/"
        if target.token:
            self.session.headers["Authorization"] = f"token {target.token}"
        self._xsrf_primed = bool(target.token)
        self._made_dirs: set[str] = set()
        # urllib3 logs every request line at DEBUG (`--debug`), and a Kaggle URL's path is the
        # credential: scrub it from those records while this client lives.
        self._log_filter = _RedactPath(urlsplit(target.base_url).path)
        logging.getLogger("urllib3.connectionpool").addFilter(self._log_filter)
        self.closed = False

    def close(self) -> None:
        """Close pooled connections; later calls raise RuntimeError."""
        self.session.close()
        logging.getLogger("urllib3.connectionpool").removeFilter(self._log_filter)
        self.closed = True

    def request(
        self,
        method: str,
        api_path: str,
        *,
        ok: tuple[int, ...] = (200,),
        idempotent: bool = True,
        **kwargs: object,
    ) -> requests.Response:
        """One REST call; idempotent calls retry on connection errors, timeouts, 429 and 5xx."""
        if self.closed:
            raise RuntimeError("Jupyter HTTP client used after close()")
        if not self._xsrf_primed and method not in ("GET", "HEAD"):
            self._prime_xsrf()
        what = f"{method} {api_path.split('?')[0]}"
        kwargs.setdefault("timeout", self.retry.request_timeout_s)
        kwargs.setdefault("allow_redirects", False)  # an API call redirected = a login page
        attempts = self.retry.attempts if idempotent else 1
        for attempt in range(1, attempts + 1):
            try:
                with self._translate(what):
                    resp = self.session.request(method, self.target.base_url + api_path, **kwargs)  # type: ignore[arg-type]
            except UnreachableError:
                if attempt == attempts:
                    raise
                time.sleep(self.retry.delay_s(attempt))
                continue
            if resp.status_code in AUTH_STATUSES or (
                300 <= resp.status_code < 400 and resp.status_code not in ok
            ):
                raise AuthError(
                    f"{what} on {self.target.redacted_url} answered {resp.status_code}: the URL "
                    f"or token has expired or is wrong ({_message(resp)})"
                )
            if resp.status_code in RETRY_STATUSES and attempt < attempts:
                time.sleep(self.retry.delay_s(attempt))
                continue
            if resp.status_code not in ok:
                error = UnreachableError if resp.status_code >= 500 else TargetError
                raise error(
                    f"{what} on {self.target.redacted_url} answered {resp.status_code}: "
                    f"{_message(resp)}"
                )
            return resp
        raise AssertionError("unreachable: the loop returns or raises")

    @contextmanager
    def _translate(self, what: str) -> Iterator[None]:
        """The one place requests' exceptions become versa_runner errors (URL redacted).

        requests' messages quote the request URL, whose path is the credential on Kaggle, so
        the original is not chained (`from None`; `--debug` would print it); its text is kept
        as context with the base path scrubbed.
        """
        try:
            yield
        except (
            requests.ConnectionError,
            requests.Timeout,
            requests.exceptions.ChunkedEncodingError,
            urllib3.exceptions.HTTPError,  # raw reads of a streamed body (downloads)
        ) as exc:
            raise UnreachableError(
                f"{what} on {self.target.redacted_url} failed: {type(exc).__name__}"
            ).add_context(self._log_filter.scrub(str(exc))) from None
        except requests.RequestException as exc:
            raise TargetError(
                f"{what} on {self.target.redacted_url}: {type(exc).__name__}"
            ).add_context(self._log_filter.scrub(str(exc))) from None

    def _prime_xsrf(self) -> None:
        """Fetch the `_xsrf` cookie that a no-token server demands on unsafe methods.

        Any page answer will do (a proxy may 404 the root); retried like every GET.
        """
        self._xsrf_primed = True
        self.request("GET", "/", ok=tuple(range(200, 500)), allow_redirects=True)
        cookie = self.session.cookies.get("_xsrf")
        if cookie:
            self.session.headers["X-XSRFToken"] = cookie

    def ws_auth(self) -> tuple[dict[str, str], str | None]:
        """Headers and cookie string the websocket handshake needs (same auth as REST)."""
        headers = {k: str(v) for k, v in self.session.headers.items() if k in _WS_HEADERS}
        cookies = "; ".join(f"{c.name}={c.value}" for c in self.session.cookies)
        return headers, cookies or None

    # -- contents API ---------------------------------------------------------------------------

    def model(self, path: str, *, with_hash: bool = False) -> dict[str, Any] | None:
        """The contents model without content (`?content=0`), or None when absent."""
        params = {"content": "0", **({"hash": "1"} if with_hash else {})}
        resp = self.request("GET", contents_path(path), params=params, ok=(200, 404))
        return None if resp.status_code == 404 else resp.json()

    def stat(self, path: str) -> RemoteStat | None:
        """Size and mtime of `path`, None when absent."""
        model = self.model(path)
        if model is None:
            return None
        return RemoteStat(size_bytes=int(model.get("size") or 0), mtime=_mtime(model))

    def mkdirs(self, directory: PurePosixPath) -> None:
        """PUT each ancestor as a directory (a no-op for existing ones), parents first."""
        for parent in reversed([directory, *directory.parents]):
            key = str(parent)
            if key in ("", ".") or key in self._made_dirs:
                continue
            self.request("PUT", contents_path(key), json={"type": "directory"}, ok=(200, 201))
            self._made_dirs.add(key)

    def remove(self, path: str) -> None:
        """DELETE a file (absent is fine)."""
        self.request("DELETE", contents_path(path), ok=(204, 404))

    def rename_fresh(self, tmp: str, final: str) -> bool:
        """PATCH `tmp` to `final` when `final` does not exist; False when it would overwrite."""
        if self.stat(final) is not None:
            return False
        resp = self.request(
            "PATCH", contents_path(tmp), json={"path": final}, ok=(200, 409), idempotent=False
        )
        return resp.status_code == 200

    def put_chunks(
        self,
        source: BinaryIO,
        size: int,
        tmp: str,
        *,
        chunk_bytes: int,
        progress: ProgressFn | None,
    ) -> None:
        """Write `size` bytes of `source` to `tmp` with chunked PUTs (see the module docstring)."""
        offset, failures = 0, 0
        chunks = max(1, -(-size // chunk_bytes))
        while True:
            number = offset // chunk_bytes + 1
            source.seek(offset)
            block = source.read(chunk_bytes)
            body = _chunk_body(block, (-1 if number == chunks else number) if chunks > 1 else None)
            try:
                self.request("PUT", contents_path(tmp), data=body, headers=_JSON,
                             ok=(200, 201), idempotent=False)  # fmt: skip
            except UnreachableError as exc:
                failures += 1
                if failures > self.retry.attempts:
                    raise TransferError(f"upload to {tmp!r} kept failing at byte {offset}") from exc
                time.sleep(self.retry.delay_s(failures))
                info = self.stat(tmp)
                remote_size = info.size_bytes if info else -1
                if remote_size != offset + len(block):  # else: applied, only the answer was lost
                    if remote_size != offset and number != 1:
                        log.info(
                            "upload to %s out of step at %d bytes; restarting", tmp, remote_size
                        )
                        offset = 0
                    continue  # resend this chunk (chunk 1 truncates, so it is always safe)
            failures = 0
            offset += len(block)
            if progress is not None and block:
                progress(len(block))
            if offset >= size:
                return

    # -- /files/ --------------------------------------------------------------------------------

    def read_range(self, path: str, offset: int, length: int | None) -> bytes | None:
        """Bytes of `path` from `offset` (at most `length`), None when absent."""
        if length == 0:
            return b"" if self.stat(path) is not None else None
        headers = dict(_FRESH)
        if offset or length is not None:
            end = "" if length is None else str(offset + length - 1)
            headers["Range"] = f"bytes={offset}-{end}"
        resp = self.request("GET", files_path(path), headers=headers, ok=(200, 206, 404, 416))
        if resp.status_code == 404:
            return None
        if resp.status_code == 416:
            return b""
        body = resp.content
        if resp.status_code == 200 and "Range" in headers:  # the server ignored the range
            body = body[offset:] if length is None else body[offset : offset + length]
        return body

    def download(self, path: str, dest: Path, offset: int, progress: ProgressFn | None) -> None:
        """Append `path` from `offset` to `dest`, resuming with Range after dropped connections.

        A 200 where 206 was asked for means the range was ignored: `dest` restarts from zero
        (huggingface_hub's `http_get` rule). The failure budget resets whenever bytes arrive.
        """
        failures = 0
        while True:
            try:
                self._download_once(path, dest, offset, progress)
                return
            except UnreachableError as exc:
                written = dest.stat().st_size if dest.exists() else 0
                failures = 0 if written > offset else failures + 1
                offset = written
                if failures >= self.retry.attempts:
                    raise TransferError(
                        f"download of {path!r} kept failing at byte {offset}"
                    ) from exc
                log.info("download of %s cut at byte %d; resuming", path, offset)
                if failures:  # a cut after progress is retried at once: the link works
                    time.sleep(self.retry.delay_s(failures))

    def _download_once(
        self, path: str, dest: Path, offset: int, progress: ProgressFn | None
    ) -> None:
        # identity: never ask the server to gzip checkpoints on the fly (CPU, no gain)
        headers = {**_FRESH, "Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        resp = self.request(
            "GET", files_path(path), headers=headers, stream=True, ok=(200, 206, 416)
        )
        with resp:
            if resp.status_code == 416:
                return  # nothing past `offset`: already complete
            if offset and resp.status_code == 200:
                offset = 0
            dest.parent.mkdir(parents=True, exist_ok=True)
            with open(dest, "r+b" if dest.exists() else "wb") as fh:
                fh.seek(offset)
                fh.truncate()
                # read1 hands over what has arrived, so a cut loses no byte already received
                # (iter_content fills a whole block first and drops it on IncompleteRead).
                read = resp.raw.read1
                with self._translate(f"GET /files/{path}"):
                    while block := read(DOWNLOAD_READ_BYTES):
                        fh.write(block)
                        fh.flush()
                        if progress is not None:
                            progress(len(block))


_WS_HEADERS = ("Authorization", "X-XSRFToken")
_JSON = {"Content-Type": "application/json"}
_FRESH = {"Cache-Control": "no-cache"}  # a log or status.json from a proxy's cache is a lie


class _RedactPath(logging.Filter):
    """Replaces the server's base path (the credential, on Kaggle) in log records."""

    def __init__(self, base_path: str) -> None:
        super().__init__()
        self.base_path = base_path.rstrip("/")

    def scrub(self, text: str) -> str:
        """`text` with the base path replaced by `/…`."""
        return text.replace(self.base_path, "/…") if self.base_path else text

    def filter(self, record: logging.LogRecord) -> bool:
        if self.base_path and self.base_path in record.getMessage():
            record.msg, record.args = self.scrub(record.getMessage()), None
        return True


def contents_path(path: str) -> str:
    """REST path of a root-relative file in the contents API."""
    return "/api/contents/" + quote(path.lstrip("/"))


def files_path(path: str) -> str:
    """REST path of a root-relative file under `/files/` (raw bytes, Range-capable)."""
    return "/files/" + quote(path.lstrip("/"))


def _chunk_body(block: bytes, chunk: int | None) -> bytes:
    """The contents-API JSON model of one chunk, built as bytes.

    base64 text never needs JSON escaping, so splicing it in is exact; `json.dumps` of an
    11 MB string cost ~0.1 s per chunk, a third of the server's own time (measured).
    """
    head = {"type": "file", "format": "base64", **({"chunk": chunk} if chunk is not None else {})}
    return json.dumps(head)[:-1].encode() + b', "content": "' + base64.b64encode(block) + b'"}'


def _mtime(model: dict[str, Any]) -> float:
    stamp = str(model.get("last_modified") or "")
    try:
        when = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return 0.0
    # jupyter_server sends UTC; a naive stamp read as local time would skew heartbeat ages
    return (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp()


def _message(resp: requests.Response) -> str:
    """The server's own message (JSON `message`), shortened; never the URL."""
    try:
        text = str(resp.json().get("message") or "")
    except ValueError:
        text = resp.reason or ""
    return text[:300]


__all__ = ["JupyterHttp", "RetryPolicy", "UPLOAD_CHUNK_BYTES", "contents_path", "files_path"]
