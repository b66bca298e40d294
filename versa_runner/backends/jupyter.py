"""The Jupyter target: jupyter_server's REST API and kernel websocket, as Kaggle exposes them.

Transport only (see `backends.base`). Files move through the contents API (chunked PUT, sha256
check, rename) and `/files/` (Range resume); `run_python` runs short snippets on a launcher kernel
that this backend creates (or reuses with `--kernel-id`) and deletes on `close()` if it made it.
Jobs never depend on that kernel after launch (versa_spec §8.3).

Facts this module relies on (versa_spec §2.1, §3.5; orchestration_anchors §5.1, verified on
jupyter_server 2.21):
- A contents PUT does not create parents (500), so the mkdir chain runs first.
- Chunked PUT: `chunk` 1 creates/truncates, any other number *appends*, -1 marks the last. An
  append whose answer was lost may or may not have happened, so a failed chunk is settled by
  reading the remote size: applied, not applied (resend), or neither (restart the file).
- The server refuses hidden files (a leading `.` anywhere) over both APIs, so temporaries are
  `<name>.versa-<hex>.part`, never `.<name>`.
- A server with auth disabled (Kaggle's proxy style) enforces XSRF on unsafe methods and a Referer
  on GETs; we fetch its `_xsrf` cookie once and echo it. Token auth skips both checks.
- A contents PATCH refuses to overwrite, so replacing an existing file uses `os.replace` on the
  kernel; fresh names (the common case) need no kernel.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import random
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import BinaryIO
from urllib.parse import quote

import requests

from versa_runner.backends.base import SENTINEL, ProgressFn, RemoteStat
from versa_runner.backends.jupyter_url import JupyterTarget, parse_server_url, redact
from versa_runner.backends.jupyter_ws import KernelChannel
from versa_runner.errors import AuthError, TargetError, TransferError, UnreachableError

log = logging.getLogger(__name__)

UPLOAD_CHUNK_BYTES = 8 << 20
"""Raw bytes per contents PUT (~11 MiB of base64): a cut connection re-sends at most this."""
DOWNLOAD_READ_BYTES = 1 << 20
RETRY_STATUSES = frozenset({429, 502, 503, 504})


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter for idempotent HTTP calls."""

    attempts: int = 5
    base_delay_s: float = 0.5
    max_delay_s: float = 8.0
    request_timeout_s: float = 30.0
    """Bounds connect and each read; a large download may take far longer in total."""

    def delay_s(self, attempt: int) -> float:
        """Sleep before retry number `attempt` (1-based): full jitter under the capped backoff."""
        return random.uniform(0, min(self.max_delay_s, self.base_delay_s * 2 ** (attempt - 1)))


class JupyterBackend:
    """Transport to a Jupyter server (token auth, or a base path that is itself the credential)."""

    name = "jupyter"

    def __init__(
        self,
        target: JupyterTarget | str,
        *,
        token: str | None = None,
        kernel_id: str | None = None,
        root: str | None = None,
        retry: RetryPolicy | None = None,
        chunk_bytes: int = UPLOAD_CHUNK_BYTES,
    ) -> None:
        if isinstance(target, str):
            base_url, url_kernel = parse_server_url(target)
            target = JupyterTarget(base_url, token=token, kernel_id=kernel_id or url_kernel)
        self.target = target
        self.retry = retry or RetryPolicy()
        self.chunk_bytes = chunk_bytes
        self._root = root
        self._session = requests.Session()
        self._session.headers["Referer"] = target.base_url + "/"
        if target.token:
            self._session.headers["Authorization"] = f"token {target.token}"
        self._xsrf_primed = bool(target.token)
        self._kernel_id = target.kernel_id
        self._owns_kernel = False
        self._channel: KernelChannel | None = None
        self._made_dirs: set[str] = set()
        self._closed = False

    # -- Backend protocol ---------------------------------------------------------------------

    def describe(self) -> str:
        """`jupyter <scheme://host/…>` (+ kernel id when pinned); never the credential."""
        kernel = f" kernel {self._kernel_id}" if self.target.kernel_id else ""
        return f"jupyter {self.target.redacted_url}{kernel}"

    def root(self) -> str:
        """The server's root directory: the launcher kernel's working directory."""
        if self._root is None:
            code = f"import os, json; print({SENTINEL!r} + json.dumps(os.getcwd()))"
            self._root = json.loads(_sentinel_line(self.run_python(code, timeout_s=60)))
        return self._root

    def put_bytes(self, path: str, data: bytes, *, mode: int | None = None) -> None:
        """Upload `data` to `path` (chunked, sha256-verified, renamed into place)."""
        self._upload(io.BytesIO(data), len(data), path, hashlib.sha256(data).hexdigest(), mode)

    def put_file(self, local_path: Path, path: str, *, progress: ProgressFn | None = None) -> None:
        """Upload a local file to `path` (chunked, sha256-verified, renamed into place)."""
        digest = hashlib.sha256()
        with open(local_path, "rb") as fh:
            while block := fh.read(DOWNLOAD_READ_BYTES):
                digest.update(block)
            size = fh.tell()
            fh.seek(0)
            self._upload(fh, size, path, digest.hexdigest(), None, progress)

    def read_bytes(self, path: str, *, offset: int = 0, length: int | None = None) -> bytes | None:
        """Bytes of `path` from `offset` (`length` at most) via `/files/`; None when absent."""
        if length == 0:
            return b"" if self.stat(path) is not None else None
        headers = {"Range": _range(offset, length)} if offset or length is not None else {}
        resp = self._request("GET", _files_path(path), headers=headers, ok=(200, 206, 404, 416))
        if resp.status_code == 404:
            return None
        if resp.status_code == 416:
            return b""
        body = resp.content
        if resp.status_code == 200 and headers:
            body = body[offset:] if length is None else body[offset : offset + length]
        return body

    def download(
        self, path: str, dest: Path, *, offset: int = 0, progress: ProgressFn | None = None
    ) -> None:
        """Append `path` from `offset` to `dest`, resuming with Range after a dropped connection.

        A 200 where 206 was asked for means the server ignored the range: `dest` is truncated and
        the file restarts from zero (huggingface_hub's `http_get` rule). The retry budget resets
        whenever bytes arrive, so a flaky link only fails after `attempts` empty tries in a row.
        """
        failures = 0
        while True:
            try:
                self._download_once(path, dest, offset, progress)
                return
            except (requests.ConnectionError, requests.Timeout, UnreachableError) as exc:
                written = dest.stat().st_size if dest.exists() else 0
                failures = 0 if written > offset else failures + 1
                offset = written
                if failures >= self.retry.attempts:
                    raise TransferError(
                        f"download of {path!r} kept failing at byte {offset}"
                    ).add_context(self.describe()) from exc
                log.info("download of %s cut at byte %d; resuming", path, offset)
                time.sleep(self.retry.delay_s(failures + 1))

    def stat(self, path: str) -> RemoteStat | None:
        """Size and mtime from `GET /api/contents/<path>?content=0`; None when absent."""
        model = self._model(path)
        if model is None:
            return None
        return RemoteStat(size_bytes=int(model.get("size") or 0), mtime=_mtime(model))

    def run_python(self, code: str, *, timeout_s: float) -> str:
        """Execute `code` on the launcher kernel (silent, no history) and return its stdout."""
        result = self._kernel_channel().execute(code, timeout_s=timeout_s)
        if result.status != "ok":
            tail = "\n".join(result.traceback[-3:])[-1500:]
            raise TargetError(
                f"runner snippet failed on the target: {result.ename}: {result.evalue}",
                hint="This is a versa-run bug or a broken target Python; rerun with -v.",
            ).add_context(tail or self.describe())
        return result.stdout

    def close(self) -> None:
        """Close the websocket and delete the launcher kernel if this backend created it."""
        if self._closed:
            return
        if self._channel is not None:
            self._channel.close()
        if self._owns_kernel and self._kernel_id:
            try:
                self._request("DELETE", f"/api/kernels/{self._kernel_id}", ok=(204, 404))
            except TargetError as exc:
                log.warning("could not delete launcher kernel %s: %s", self._kernel_id, exc)
        self._session.close()
        self._closed = True

    def __enter__(self) -> JupyterBackend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- Jupyter specifics (used by doctor and the tests) ---------------------------------------

    @property
    def kernel_id(self) -> str | None:
        """The launcher kernel's id once one is in use."""
        return self._kernel_id

    def api_status(self) -> dict:
        """`GET /api/status`: the cheapest authenticated call (reachability + auth)."""
        return self._request("GET", "/api/status").json()

    def delete_kernel(self, kernel_id: str) -> None:
        """Delete a kernel by id (the job it launched keeps running)."""
        self._request("DELETE", f"/api/kernels/{kernel_id}", ok=(204, 404))
        if kernel_id == self._kernel_id:
            if self._channel is not None:
                self._channel.close()
            self._channel, self._kernel_id, self._owns_kernel = None, None, False

    def remove(self, path: str) -> None:
        """Delete a file through the contents API (absent is fine)."""
        self._request("DELETE", _contents_path(path), ok=(204, 404))

    # -- HTTP plumbing --------------------------------------------------------------------------

    def _request(
        self,
        method: str,
        api_path: str,
        *,
        ok: tuple[int, ...] = (200,),
        idempotent: bool = True,
        **kwargs: object,
    ) -> requests.Response:
        """One REST call with auth; retries idempotent calls on connection errors and 429/5xx."""
        if self._closed:
            raise RuntimeError("JupyterBackend used after close()")
        if not self._xsrf_primed and method not in ("GET", "HEAD"):
            self._prime_xsrf()
        url = self.target.base_url + api_path
        kwargs.setdefault("timeout", self.retry.request_timeout_s)
        attempts = self.retry.attempts if idempotent else 1
        for attempt in range(1, attempts + 1):
            with self._translate(method, api_path):
                try:
                    resp = self._session.request(method, url, **kwargs)  # type: ignore[arg-type]
                except (requests.ConnectionError, requests.Timeout):
                    if attempt == attempts:
                        raise
                    time.sleep(self.retry.delay_s(attempt))
                    continue
            if resp.status_code in (401, 403):
                raise AuthError(
                    f"{method} {api_path.split('?')[0]} on {self.target.redacted_url} answered "
                    f"{resp.status_code} (the URL or token expired or is wrong): {_message(resp)}"
                )
            if resp.status_code in RETRY_STATUSES and attempt < attempts:
                time.sleep(self.retry.delay_s(attempt))
                continue
            if resp.status_code not in ok:
                error = UnreachableError if resp.status_code >= 500 else TargetError
                raise error(
                    f"{method} {api_path.split('?')[0]} answered {resp.status_code}: "
                    f"{_message(resp)}"
                ).add_context(self.describe())
            return resp
        raise AssertionError("unreachable: the loop returns or raises")

    @contextmanager
    def _translate(self, method: str, api_path: str) -> Iterator[None]:
        """The one place requests' exceptions become versa_runner errors (URL redacted)."""
        try:
            yield
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise UnreachableError(
                f"{method} {api_path.split('?')[0]} on {self.target.redacted_url} failed: "
                f"{type(exc).__name__}"
            ) from exc
        except requests.RequestException as exc:
            raise TargetError(f"HTTP error talking to {self.target.redacted_url}") from exc

    def _prime_xsrf(self) -> None:
        """Fetch the `_xsrf` cookie a no-token server demands on unsafe methods; echo it."""
        self._xsrf_primed = True
        with self._translate("GET", "/"):
            resp = self._session.get(
                self.target.base_url + "/", timeout=self.retry.request_timeout_s
            )
        if resp.status_code in (401, 403):
            raise AuthError(f"{self.target.redacted_url} answered {resp.status_code}")
        cookie = self._session.cookies.get("_xsrf")
        if cookie:
            self._session.headers["X-XSRFToken"] = cookie

    def _model(self, path: str, *, with_hash: bool = False) -> dict | None:
        params = {"content": "0", **({"hash": "1"} if with_hash else {})}
        resp = self._request("GET", _contents_path(path), params=params, ok=(200, 404))
        return None if resp.status_code == 404 else resp.json()

    # -- uploads --------------------------------------------------------------------------------

    def _upload(
        self,
        source: BinaryIO,
        size: int,
        path: str,
        sha256: str,
        mode: int | None,
        progress: ProgressFn | None = None,
    ) -> None:
        """Chunked PUT to a temporary name, verify sha256, then rename onto `path`."""
        final = PurePosixPath(path)
        self._mkdirs(final.parent)
        tmp = str(final.with_name(f"{final.name}.versa-{secrets.token_hex(4)}.part"))
        if mode is not None:
            # Created with `mode` before any byte arrives; chunk 1 rewrites in place, keeping it.
            code = (
                f"import os; p = os.path.join(os.getcwd(), {tmp!r}); "
                f"os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, {mode:#o})); "
                f"os.chmod(p, {mode:#o})"
            )
            self.run_python(code, timeout_s=60)
        try:
            for attempt in range(2):
                self._put_chunks(source, size, tmp, progress)
                remote = self._remote_sha256(tmp)
                if remote == sha256:
                    break
                log.warning("sha256 of %s differs after upload (try %d); restarting", path, attempt)
            else:
                raise TransferError(f"upload of {path!r} failed its sha256 check twice")
            self._rename(tmp, str(final))
        except BaseException:
            self._best_effort_remove(tmp)
            raise

    def _put_chunks(
        self, source: BinaryIO, size: int, tmp: str, progress: ProgressFn | None
    ) -> None:
        offset, failures = 0, 0
        chunks = max(1, -(-size // self.chunk_bytes))
        while offset < size or (offset == 0 and size == 0):
            number = offset // self.chunk_bytes + 1
            source.seek(offset)
            block = source.read(self.chunk_bytes)
            model: dict[str, object] = {
                "type": "file",
                "format": "base64",
                "content": _b64(block),
            }
            if chunks > 1:
                model["chunk"] = -1 if number == chunks else number
            try:
                self._request(
                    "PUT", _contents_path(tmp), json=model, ok=(200, 201), idempotent=False
                )
            except UnreachableError as exc:
                # The append may or may not have happened: the remote size decides.
                failures += 1
                if failures > self.retry.attempts:
                    raise TransferError(f"upload to {tmp!r} kept failing at byte {offset}") from exc
                time.sleep(self.retry.delay_s(failures))
                stat = self.stat(tmp)
                remote_size = stat.size_bytes if stat else -1
                if remote_size == offset + len(block):
                    pass  # applied; only the answer was lost
                elif remote_size == offset or number == 1:
                    continue  # not applied (or chunk 1, which truncates): send it again
                else:
                    log.info("upload to %s out of step (%d bytes); restarting", tmp, remote_size)
                    offset = 0
                    continue
            failures = 0
            offset += len(block)
            if progress is not None and block:
                progress(len(block))
            if size == 0:
                break

    def _remote_sha256(self, path: str) -> str:
        """`?hash=1` when the server offers sha256 (jupyter_server >= 2.11), else a snippet."""
        model = self._model(path, with_hash=True) or {}
        if model.get("hash") and model.get("hash_algorithm") == "sha256":
            return str(model["hash"])
        code = (
            "import hashlib, json, os\n"
            f"h = hashlib.sha256()\nwith open(os.path.join(os.getcwd(), {path!r}), 'rb') as f:\n"
            "    for b in iter(lambda: f.read(1 << 20), b''):\n        h.update(b)\n"
            f"print({SENTINEL!r} + json.dumps(h.hexdigest()))"
        )
        return json.loads(_sentinel_line(self.run_python(code, timeout_s=600)))

    def _rename(self, tmp: str, final: str) -> None:
        if self.stat(final) is None:
            resp = self._request(
                "PATCH", _contents_path(tmp), json={"path": final}, ok=(200, 409), idempotent=False
            )
            if resp.status_code == 200:
                return
        # PATCH will not overwrite; os.replace on the target is atomic and does.
        code = f"import os; r = os.getcwd(); os.replace(os.path.join(r, {tmp!r}), os.path.join(r, {final!r}))"
        self.run_python(code, timeout_s=60)

    def _mkdirs(self, directory: PurePosixPath) -> None:
        """PUT each missing ancestor as a directory (idempotent on jupyter_server)."""
        for parent in reversed([directory, *directory.parents]):
            key = str(parent)
            if key in ("", ".") or key in self._made_dirs:
                continue
            self._request("PUT", _contents_path(key), json={"type": "directory"}, ok=(200, 201))
            self._made_dirs.add(key)

    def _best_effort_remove(self, path: str) -> None:
        try:
            self.remove(path)
        except (TargetError, RuntimeError) as exc:
            log.warning("could not remove temporary %s: %s", path, exc)

    # -- downloads ------------------------------------------------------------------------------

    def _download_once(
        self, path: str, dest: Path, offset: int, progress: ProgressFn | None
    ) -> None:
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        resp = self._request(
            "GET", _files_path(path), headers=headers, stream=True, ok=(200, 206, 416)
        )
        with resp:
            if resp.status_code == 416:
                return  # nothing past `offset`: the file is already complete
            if offset and resp.status_code == 200:
                offset = 0  # the range was ignored: start over
            dest.parent.mkdir(parents=True, exist_ok=True)
            with open(dest, "r+b" if dest.exists() else "wb") as fh:
                fh.seek(offset)
                fh.truncate()
                for block in resp.iter_content(DOWNLOAD_READ_BYTES):
                    fh.write(block)
                    if progress is not None:
                        progress(len(block))

    # -- kernel ---------------------------------------------------------------------------------

    def _kernel_channel(self) -> KernelChannel:
        if self._closed:
            raise RuntimeError("JupyterBackend used after close()")
        if self._channel is None:
            if self._kernel_id:
                self._request("GET", f"/api/kernels/{self._kernel_id}")  # 404 -> clear error
            else:
                body = {"name": "python3", "path": ""}
                resp = self._request(
                    "POST", "/api/kernels", json=body, ok=(200, 201), idempotent=False
                )
                self._kernel_id, self._owns_kernel = resp.json()["id"], True
            ws_base = "ws" + self.target.base_url[len("http") :]
            headers = {k: v for k, v in self._session.headers.items() if k in _WS_HEADERS}
            cookies = "; ".join(f"{c.name}={c.value}" for c in self._session.cookies)
            self._channel = KernelChannel(
                f"{ws_base}/api/kernels/{self._kernel_id}/channels",
                headers=headers,
                cookie=cookies or None,
                redacted_url=self.target.redacted_url,
                on_timeout=self._interrupt,
            )
        return self._channel

    def _interrupt(self) -> None:
        try:
            self._request("POST", f"/api/kernels/{self._kernel_id}/interrupt", ok=(200, 204, 404))
        except TargetError as exc:
            log.warning("interrupt of kernel %s failed: %s", self._kernel_id, exc)


_WS_HEADERS = ("Authorization", "X-XSRFToken")


def _contents_path(path: str) -> str:
    return "/api/contents/" + quote(path.lstrip("/"))


def _files_path(path: str) -> str:
    return "/files/" + quote(path.lstrip("/"))


def _range(offset: int, length: int | None) -> str:
    return f"bytes={offset}-" if length is None else f"bytes={offset}-{offset + length - 1}"


def _b64(block: bytes) -> str:
    return base64.b64encode(block).decode("ascii")


def _mtime(model: dict) -> float:
    stamp = str(model.get("last_modified") or "")
    try:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def _message(resp: requests.Response) -> str:
    """The server's own message (JSON `message`), shortened; never echoes the URL."""
    try:
        text = str(resp.json().get("message") or "")
    except ValueError:
        text = resp.reason or ""
    return text[:300]


def _sentinel_line(stdout: str) -> str:
    """The JSON after the one `__VERSA_RUNNER__ ` line in a snippet's stdout."""
    for line in stdout.splitlines():
        if line.startswith(SENTINEL):
            return line[len(SENTINEL) :]
    raise TargetError(f"runner snippet printed no {SENTINEL.strip()} line: {stdout[-300:]!r}")


__all__ = ["JupyterBackend", "RetryPolicy", "redact"]
