"""The Jupyter target: jupyter_server's REST API and kernel websocket, as Kaggle exposes them.

Transport only (see `backends.base`). Files move through the contents API and `/files/`
(`http`); `run_python` runs target programs on a launcher kernel (`ws`) that this
backend creates, or reuses with `--kernel-id`, and deletes on `close()` if it made it. Jobs never
depend on that kernel after launch (versa_spec §8.3): commands that only read files (`status`,
`logs`, `sync` downloads) never start one, provided the root is known (from the journal).

Uploads go to a temporary `<name>.versa-<hex>.part` (never `.<name>`: hidden names are refused),
are checked by sha256 on the target (`?hash=1`, else `fileops.sha256`), then renamed: a contents PATCH
for a fresh name, `os.replace` on the kernel when overwriting (PATCH refuses to). A file that
must be private (`mode=0o600`, secrets) is created with that mode by the kernel *before* any
byte arrives; chunked PUTs rewrite it in place, keeping the mode.
"""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import secrets
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, BinaryIO

from versa_runner.backends.base import ProgressFn, RemoteStat, call_target
from versa_runner.backends.jupyter.http import (
    DOWNLOAD_READ_BYTES,
    UPLOAD_CHUNK_BYTES,
    JupyterHttp,
    RetryPolicy,
    contents_path,
)
from versa_runner.backends.jupyter.reads import RunFileReader
from versa_runner.backends.jupyter.url import (
    JupyterTarget,
    parse_server_url,
    redact,
    resolve_target,
)
from versa_runner.backends.jupyter.ws import KernelChannel, KernelGone
from versa_runner.errors import TargetError, TransferError, UnreachableError

if TYPE_CHECKING:
    from versa_runner.backends import TargetOptions

log = logging.getLogger(__name__)

ROOT_TIMEOUT_S = 60.0
HASH_TIMEOUT_S = 600.0
KERNEL_READ_BYTES = 4 << 20  # ~5.6 MB of base64 per websocket reply
UPLOAD_ATTEMPTS = 2  # whole-file restarts after a sha256 mismatch


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
        self.chunk_bytes = chunk_bytes
        self.http = JupyterHttp(target, retry=retry)
        self._reader = RunFileReader(self.http)
        self._root = root
        self._kernel_id = target.kernel_id
        self._owns_kernel = False
        self._channel: KernelChannel | None = None
        self._closed = False

    # -- Backend protocol ---------------------------------------------------------------------

    def describe(self) -> str:
        """`jupyter <scheme://host/…>`; never the credential."""
        return f"jupyter {self.target.redacted_url}"

    def root(self) -> str:
        """The directory the contents API serves, as an absolute path on the target.

        Not simply the kernel's cwd: a reused notebook kernel may have changed directory. A
        probe file is written through the contents API and looked for from the kernel (its cwd
        and parents, then Kaggle's root); the snippet deletes it.
        """
        if self._root is None:
            probe = f"versa_root_probe-{secrets.token_hex(6)}"
            body = {"type": "file", "format": "text", "content": "probe"}
            self.http.request("PUT", contents_path(probe), json=body, ok=(200, 201))
            found = call_target(
                self, "fileops.find_root", {"probe": probe}, timeout_s=ROOT_TIMEOUT_S
            )
            if not found:
                raise TargetError(
                    "could not locate the Jupyter root from the launcher kernel",
                    hint="Let versa-run create its own kernel (drop --kernel-id).",
                )
            self._root = str(found)
        return self._root

    def put_bytes(self, path: str, data: bytes, *, mode: int | None = None) -> None:
        """Upload `data` to `path` (chunked, sha256-verified, renamed into place)."""
        digest = hashlib.sha256(data).hexdigest()
        self._upload(io.BytesIO(data), len(data), path, digest, mode=mode, progress=None)

    def put_file(self, local_path: Path, path: str, *, progress: ProgressFn | None = None) -> None:
        """Upload a local file to `path` (chunked, sha256-verified, renamed into place)."""
        digest = hashlib.sha256()
        with open(local_path, "rb") as fh:
            while block := fh.read(DOWNLOAD_READ_BYTES):
                digest.update(block)
            size = fh.tell()
            self._upload(fh, size, path, digest.hexdigest(), mode=None, progress=progress)

    def read_bytes(self, path: str, *, offset: int = 0, length: int | None = None) -> bytes | None:
        """Bytes of `path` from `offset` via `/files/` with Range (the contents API when
        `/files/` keeps failing, `jupyter.reads`); None when absent."""
        self._check_open()
        return self._reader.read(path, offset, length)

    def download(
        self, path: str, dest: Path, *, offset: int = 0, progress: ProgressFn | None = None
    ) -> None:
        """Append `path` from `offset` to `dest` (Range resume across dropped connections).

        jupyter_server refuses hidden names (a component starting with `.`) over `/files/`, so
        those come through the kernel in base64 pieces, appended at the same offsets.
        """
        self._check_open()
        if any(part.startswith(".") for part in PurePosixPath(path).parts):
            self._download_via_kernel(path, dest, offset, progress)
        else:
            self.http.download(path, dest, offset, progress)

    def _download_via_kernel(
        self, path: str, dest: Path, offset: int, progress: ProgressFn | None
    ) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with open(dest, "ab") as out:
            out.truncate(offset)
            while True:
                args = {"root": self.root(), "path": path, "offset": offset,
                        "length": KERNEL_READ_BYTES}  # fmt: skip
                piece = call_target(self, "fileops.read_chunk", args, timeout_s=HASH_TIMEOUT_S)
                if piece["missing"]:
                    raise TransferError(f"{path!r} is gone from the target")
                data = base64.b64decode(piece["data"])
                if not data:
                    return
                out.write(data)
                out.flush()  # what arrived survives a cut of the next piece
                offset += len(data)
                if progress is not None:
                    progress(len(data))

    def stat(self, path: str) -> RemoteStat | None:
        """Size and mtime from `GET /api/contents/<path>?content=0`; None when absent."""
        self._check_open()
        return self.http.stat(path)

    def run_python(self, code: str, *, timeout_s: float) -> str:
        """Execute `code` on the launcher kernel (silent, no history) and return its stdout.

        A launcher kernel of ours that vanished (deleted, or the server restarted) is replaced
        and the snippet sent once more (runner snippets are idempotent, versa_spec §8.2); a
        kernel pinned with --kernel-id is never replaced silently.
        """
        try:
            result = self._kernel_channel().execute(code, timeout_s=timeout_s)
        except KernelGone as exc:
            gone = self._kernel_id
            if self.target.kernel_id:
                raise TargetError(
                    f"kernel {gone} (--kernel-id) is gone from {self.target.redacted_url}",
                    hint="Pass the id of a running kernel, or drop --kernel-id to let versa-run "
                    "start its own.",
                ) from exc
            log.warning("launcher kernel %s is gone (%s); starting a new one", gone, exc)
            self._forget_kernel()
            result = self._kernel_channel().execute(code, timeout_s=timeout_s)
        if result.status != "ok":
            tail = "\n".join(result.traceback[-3:])[-1500:]
            raise TargetError(
                f"runner snippet failed on the target: {result.ename}: {result.evalue}",
                hint="A versa-run bug or a broken target Python; rerun with --debug.",
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
                self.http.request("DELETE", f"/api/kernels/{self._kernel_id}", ok=(204, 404))
            except TargetError as exc:
                log.warning("could not delete launcher kernel %s: %s", self._kernel_id, exc)
        self.http.close()
        self._closed = True

    def __enter__(self) -> JupyterBackend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- Jupyter specifics (doctor, tests) ------------------------------------------------------

    @property
    def kernel_id(self) -> str | None:
        """The launcher kernel's id once one is in use."""
        return self._kernel_id

    def api_status(self) -> dict[str, Any]:
        """`GET /api/status`: the cheapest authenticated call (reachability + auth)."""
        self._check_open()
        status: dict[str, Any] = self.http.request("GET", "/api/status").json()
        return status

    def delete_kernel(self, kernel_id: str) -> None:
        """Delete a kernel by id; a job it launched keeps running (own process session)."""
        self._check_open()
        self.http.request("DELETE", f"/api/kernels/{kernel_id}", ok=(204, 404))
        if kernel_id == self._kernel_id:
            self._forget_kernel()

    def remove(self, path: str) -> None:
        """Delete a file through the contents API (absent is fine)."""
        self._check_open()
        self.http.remove(path)

    # -- internals ------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("JupyterBackend used after close()")

    def _upload(
        self,
        source: BinaryIO,
        size: int,
        path: str,
        sha256: str,
        *,
        mode: int | None,
        progress: ProgressFn | None,
    ) -> None:
        """Chunked PUT to a temporary name, verify sha256, then rename onto `path`."""
        self._check_open()
        final = PurePosixPath(path)
        self.http.mkdirs(final.parent)
        tmp = str(final.with_name(f"{final.name}.versa-{secrets.token_hex(4)}.part"))
        if mode is not None:
            self._on_target("fileops.create_private", path=tmp, mode=mode)
        try:
            for _ in range(UPLOAD_ATTEMPTS):
                self.http.put_chunks(
                    source, size, tmp, chunk_bytes=self.chunk_bytes, progress=progress
                )
                if self._remote_sha256(tmp) == sha256:
                    break
                log.warning("sha256 of %s differs after upload; sending it again", path)
            else:
                raise TransferError(f"upload of {path!r} failed its sha256 check twice")
            if not self.http.rename_fresh(tmp, str(final)):
                self._on_target("fileops.replace", source=tmp, dest=str(final))
        except BaseException:
            self._discard(tmp)
            raise

    def _discard(self, path: str) -> None:
        """Best-effort removal of a failed upload's temporary.

        Through the kernel when one is open: a contents DELETE may move the file to the
        server's trash (`delete_to_trash`), which on Kaggle still fills the disk.
        """
        try:
            if self._channel is not None:
                self._on_target("fileops.remove", path=path)
            else:
                self.http.remove(path)
        except (TargetError, RuntimeError) as exc:
            log.warning("could not remove temporary %s: %s", path, exc)

    def _remote_sha256(self, path: str) -> str:
        """`?hash=1` when the server offers sha256 (jupyter_server >= 2.11), else a snippet."""
        model = self.http.model(path, with_hash=True) or {}
        if model.get("hash") and model.get("hash_algorithm") == "sha256":
            return str(model["hash"])
        return str(self._on_target("fileops.sha256", path=path))

    def _on_target(self, call: str, **args: str | int) -> Any:
        """Run a file op of `versa_runner.target` with paths relative to the root."""
        return call_target(self, call, {"root": self.root(), **args}, timeout_s=HASH_TIMEOUT_S)

    def _kernel_channel(self) -> KernelChannel:
        self._check_open()
        if self._channel is None:
            if self._kernel_id:
                # A pinned kernel that is gone is an error, never a silent new kernel
                # (orchestration_anchors §2.4 gap 6).
                self.http.request("GET", f"/api/kernels/{self._kernel_id}")
            else:
                resp = self.http.request(
                    "POST", "/api/kernels", json={"name": "python3", "path": ""},
                    ok=(200, 201), idempotent=False,
                )  # fmt: skip
                self._kernel_id, self._owns_kernel = resp.json()["id"], True
            headers, cookie = self.http.ws_auth()
            ws_base = "ws" + self.target.base_url[len("http") :]
            self._channel = KernelChannel(
                f"{ws_base}/api/kernels/{self._kernel_id}/channels",
                headers=headers,
                cookie=cookie,
                redacted_url=self.target.redacted_url,
                on_timeout=self._interrupt,
                is_alive=self._kernel_alive,
            )
        return self._channel

    def _forget_kernel(self) -> None:
        """Drop the channel and the id of a kernel that no longer exists (nothing to delete)."""
        if self._channel is not None:
            self._channel.close()
        self._channel, self._kernel_id, self._owns_kernel = None, None, False

    def _kernel_alive(self) -> bool:
        """False only when the server says the kernel does not exist; an unanswered check is
        no evidence either way (the snippet's own deadline still bounds the wait)."""
        try:
            resp = self.http.request("GET", f"/api/kernels/{self._kernel_id}", ok=(200, 404))
        except UnreachableError:
            return True
        return resp.status_code != 404

    def _interrupt(self) -> None:
        try:
            self.http.request("POST", f"/api/kernels/{self._kernel_id}/interrupt", ok=(200, 204))
        except TargetError as exc:
            log.warning("interrupt of kernel %s failed: %s", self._kernel_id, exc)


def from_options(options: TargetOptions, *, root: str | None = None) -> JupyterBackend:
    """The Jupyter target the flags (or REMOTE_JUPYTER_URL and friends) name."""
    target = resolve_target(
        url=options.url, url_file=options.url_file, token_file=options.token_file,
        kernel_id=options.kernel_id, environ=options.environ,
    )  # fmt: skip
    return JupyterBackend(target, root=root)


BACKEND_CLASS = JupyterBackend

__all__ = [
    "BACKEND_CLASS",
    "JupyterBackend",
    "from_options",
    "JupyterTarget",
    "RetryPolicy",
    "redact",
]
