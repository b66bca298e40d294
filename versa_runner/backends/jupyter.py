"""The Jupyter target: jupyter_server's REST API and kernel websocket, as Kaggle exposes them.

Transport only (see `backends.base`). Files move through the contents API and `/files/`
(`jupyter_http`); `run_python` runs short snippets on a launcher kernel (`jupyter_ws`) that this
backend creates, or reuses with `--kernel-id`, and deletes on `close()` if it made it. Jobs never
depend on that kernel after launch (versa_spec §8.3): commands that only read files (`status`,
`logs`, `sync` downloads) never start one, provided the root is known (from the journal).

Uploads go to a temporary `<name>.versa-<hex>.part` (never `.<name>`: hidden names are refused),
are checked by sha256 on the target (`?hash=1`, else a snippet), then renamed: a contents PATCH
for a fresh name, `os.replace` on the kernel when overwriting (PATCH refuses to). A file that
must be private (`mode=0o600`, secrets) is created with that mode by the kernel *before* any
byte arrives; chunked PUTs rewrite it in place, keeping the mode.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import secrets
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from versa_runner import snippets
from versa_runner.backends.base import SENTINEL, ProgressFn, RemoteStat
from versa_runner.backends.jupyter_http import (
    DOWNLOAD_READ_BYTES,
    UPLOAD_CHUNK_BYTES,
    JupyterHttp,
    RetryPolicy,
    contents_path,
)
from versa_runner.backends.jupyter_url import JupyterTarget, parse_server_url, redact
from versa_runner.backends.jupyter_ws import KernelChannel
from versa_runner.errors import AuthError, TargetError, TransferError

log = logging.getLogger(__name__)

ROOT_TIMEOUT_S = 60.0
HASH_TIMEOUT_S = 600.0
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
            code = ROOT_SNIPPET.replace("__PROBE__", repr(probe)).replace(
                "__SENTINEL__", repr(SENTINEL)
            )
            found = json.loads(_sentinel_json(self.run_python(code, timeout_s=ROOT_TIMEOUT_S)))
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
        """Bytes of `path` from `offset` via `/files/` with Range; None when absent."""
        self._check_open()
        return self.http.read_range(path, offset, length)

    def download(
        self, path: str, dest: Path, *, offset: int = 0, progress: ProgressFn | None = None
    ) -> None:
        """Append `path` from `offset` to `dest` (Range resume across dropped connections)."""
        self._check_open()
        self.http.download(path, dest, offset, progress)

    def stat(self, path: str) -> RemoteStat | None:
        """Size and mtime from `GET /api/contents/<path>?content=0`; None when absent."""
        self._check_open()
        return self.http.stat(path)

    def run_python(self, code: str, *, timeout_s: float) -> str:
        """Execute `code` on the launcher kernel (silent, no history) and return its stdout."""
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
        return self.http.request("GET", "/api/status").json()

    def delete_kernel(self, kernel_id: str) -> None:
        """Delete a kernel by id; a job it launched keeps running (own process session)."""
        self._check_open()
        self.http.request("DELETE", f"/api/kernels/{kernel_id}", ok=(204, 404))
        if kernel_id == self._kernel_id:
            if self._channel is not None:
                self._channel.close()
            self._channel, self._kernel_id, self._owns_kernel = None, None, False

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
            self._python_on_paths(
                "os.close(os.open(a, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, m)); os.chmod(a, m)",
                a=tmp,
                m=mode,
            )
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
                self._python_on_paths("os.replace(a, b)", a=tmp, b=str(final))
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
                self._python_on_paths("os.path.exists(a) and os.unlink(a)", a=path)
            else:
                self.http.remove(path)
        except (TargetError, RuntimeError) as exc:
            log.warning("could not remove temporary %s: %s", path, exc)

    def _remote_sha256(self, path: str) -> str:
        """`?hash=1` when the server offers sha256 (jupyter_server >= 2.11), else a snippet."""
        model = self.http.model(path, with_hash=True) or {}
        if model.get("hash") and model.get("hash_algorithm") == "sha256":
            return str(model["hash"])
        code = (
            "h = hashlib.sha256()\nwith open(a, 'rb') as f:\n"
            "    for blk in iter(lambda: f.read(1 << 20), b''):\n        h.update(blk)\n"
            f"print({SENTINEL!r} + json.dumps(h.hexdigest()))"
        )
        return json.loads(_sentinel_json(self._python_on_paths(code, a=path)))

    def _python_on_paths(self, body: str, **names: str | int) -> str:
        """Run `body` with root-relative path arguments bound to absolute paths (ints as is)."""
        lines = ["import hashlib, json, os", f"r = {self.root()!r}"]
        for name, value in names.items():
            bound = f"os.path.join(r, {value!r})" if isinstance(value, str) else f"{value:#o}"
            lines.append(f"{name} = {bound}")
        return self.run_python("\n".join([*lines, body]), timeout_s=HASH_TIMEOUT_S)

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
            )
        return self._channel

    def _interrupt(self) -> None:
        try:
            self.http.request("POST", f"/api/kernels/{self._kernel_id}/interrupt", ok=(200, 204))
        except TargetError as exc:
            log.warning("interrupt of kernel %s failed: %s", self._kernel_id, exc)


# Finds the directory holding the probe file the contents API just wrote, and removes the probe.
ROOT_SNIPPET = r"""
import json, os
probe, found = __PROBE__, None
parts = os.getcwd().split(os.sep)
candidates = [os.sep.join(parts[:i]) or os.sep for i in range(len(parts), 0, -1)]
for candidate in candidates + ["/kaggle/working"]:
    if os.path.isfile(os.path.join(candidate, probe)):
        found = candidate
        os.unlink(os.path.join(candidate, probe))
        break
print(__SENTINEL__ + json.dumps(found))
"""


@dataclass(frozen=True)
class DoctorCheck:
    """One line of `versa-run doctor`: what was checked, whether it passed, what was seen."""

    name: str
    ok: bool
    detail: str


def doctor(backend: JupyterBackend, *, min_free_gb: float = 5.0) -> list[DoctorCheck]:
    """Reachability, auth, kernel, python, papermill, GPUs and free disk of a Jupyter target.

    Stops at the first check the rest depend on (no point starting a kernel on a 403).
    """
    checks: list[DoctorCheck] = []
    url = backend.target.redacted_url
    try:
        version = backend.http.request("GET", "/api").json().get("version", "?")
    except AuthError:
        version = "?"  # some proxies guard even /api; the auth check below says more
    except TargetError as exc:  # unreachable, or a 404 from a proxy that forgot the path
        hint = exc.hint or "Check the URL; a Kaggle URL changes when its session restarts."
        return [DoctorCheck("reachable", False, f"{url}: {exc} -- {hint}")]
    checks.append(DoctorCheck("reachable", True, f"{url} (jupyter_server {version})"))
    try:
        backend.api_status()
    except AuthError as exc:
        return [*checks, DoctorCheck("auth", False, f"{exc} -- {exc.hint}")]
    checks.append(DoctorCheck("auth", True, "token" if backend.target.token else "URL credential"))
    try:
        code = snippets.render(snippets.PREFLIGHT, {"root": backend.root()})
        info = snippets.parse_reply(
            backend.run_python(code, timeout_s=ROOT_TIMEOUT_S), what="doctor"
        )
    except TargetError as exc:
        return [*checks, DoctorCheck("kernel", False, str(exc))]
    checks.append(DoctorCheck("kernel", True, f"launcher kernel {backend.kernel_id}"))
    checks.append(DoctorCheck("python", True, f"{info['python']} ({info['executable']})"))
    checks.append(DoctorCheck("papermill", bool(info["papermill"] and info["ipykernel"]),
                              "papermill + ipykernel importable" if info["papermill"]
                              and info["ipykernel"] else "missing: install or use --profile kaggle"))  # fmt: skip
    checks.append(DoctorCheck("gpus", True, "; ".join(info["gpus"]) or "none visible"))
    free_gb = info["free_bytes"] / 1e9
    checks.append(DoctorCheck("disk", free_gb >= min_free_gb,
                              f"{free_gb:.1f} GB free under {backend.root()} (need {min_free_gb:g})"))  # fmt: skip
    return checks


def _sentinel_json(stdout: str) -> str:
    """The JSON after the one `__VERSA_RUNNER__ ` line of a snippet's stdout."""
    for line in stdout.splitlines():
        if line.startswith(SENTINEL):
            return line[len(SENTINEL) :]
    raise TargetError(f"runner snippet printed no {SENTINEL.strip()} line: {stdout[-300:]!r}")


__all__ = ["DoctorCheck", "JupyterBackend", "doctor", "JupyterTarget", "RetryPolicy", "redact"]
