"""The Jupyter backend's transport against real jupyter_server instances on loopback.

Two servers per session (see jupyter_fixtures): token auth, and no token under a Kaggle-style
base path whose path segment is the credential. A fault-injecting proxy cuts connections during
uploads and downloads.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import logging
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from faultproxy import FaultProxy, free_port

from versa_runner.backends import get_backend_class
from versa_runner.backends.jupyter.backend import JupyterBackend, RetryPolicy
from versa_runner.backends.jupyter.doctor import doctor
from versa_runner.backends.jupyter.url import (
    normalize_url,
    parse_server_url,
    redact,
    resolve_target,
)
from versa_runner.errors import AuthError, TargetError, UnreachableError, UsageError

if TYPE_CHECKING:
    from jupyter_fixtures import JupyterServer

pytest_plugins = ["jupyter_fixtures"]

FAST_RETRY = RetryPolicy(attempts=6, base_delay_s=0.05, max_delay_s=0.2, request_timeout_s=10)
KAGGLE = "https://kkb-production.jupyter-proxy.kaggle.net/k/123/eyJhbGciOi.SECRET/proxy"


def backend_for(
    server: JupyterServer, *, url: str | None = None, **kwargs: object
) -> JupyterBackend:
    return JupyterBackend(url or server.url, token=server.token, retry=FAST_RETRY, **kwargs)


# -- URL handling (no server) -----------------------------------------------------------------


def test_normalize_drops_query_fragment_and_trailing_slash() -> None:
    assert normalize_url("  https://h.example/k/1/c/proxy/?x=1#frag \n") == (
        "https://h.example/k/1/c/proxy"
    )
    with pytest.raises(UsageError, match="--url"):
        normalize_url("h.example/proxy")
    with pytest.raises(UsageError, match="--url"):
        normalize_url("")


def test_channels_url_gives_base_and_kernel_id() -> None:
    kernel = "0b7e9c1a-5d3c-4c6e-9f0e-2d5b8a1c3e4f"
    base, kernel_id = parse_server_url(
        f"{KAGGLE.replace('https', 'wss')}/api/kernels/{kernel}/channels?session_id=abc"
    )
    assert base == KAGGLE and kernel_id == kernel


def test_redact_keeps_only_scheme_and_host() -> None:
    assert redact(KAGGLE) == "https://kkb-production.jupyter-proxy.kaggle.net/…"
    assert "SECRET" not in redact(KAGGLE) and "SECRET" not in repr(resolve_target(url=KAGGLE))
    assert redact("http://127.0.0.1:8888") == "http://127.0.0.1:8888"


def test_resolve_target_reads_files_and_env_in_order(tmp_path: Path) -> None:
    url_file, token_file = tmp_path / "url", tmp_path / "token"
    url_file.write_text(KAGGLE + "\n")
    token_file.write_text("tok-from-file\n")
    env = {"REMOTE_JUPYTER_URL": "http://env.example/", "REMOTE_JUPYTER_TOKEN": "tok-env"}
    target = resolve_target(url_file=url_file, token_file=token_file, environ=env)
    assert (target.base_url, target.token) == (KAGGLE, "tok-from-file") and target.is_kaggle
    from_env = resolve_target(environ=env)
    assert (from_env.base_url, from_env.token) == ("http://env.example", "tok-env")
    with pytest.raises(UsageError, match="REMOTE_JUPYTER_URL"):
        resolve_target(environ={})
    with pytest.raises(UsageError, match="--url-file"):
        resolve_target(url_file=tmp_path / "missing", environ={})


def test_registry_knows_jupyter() -> None:
    assert get_backend_class("jupyter") is JupyterBackend


# -- files over both server flavours ----------------------------------------------------------


def test_put_read_stat_roundtrip(any_server: JupyterServer, tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)  # four 1 MiB chunks, the last one short
    local = tmp_path / "blob.bin"
    local.write_bytes(data)
    seen: list[int] = []
    with backend_for(any_server, chunk_bytes=1 << 20) as backend:
        backend.put_file(local, "t_roundtrip/deep/er/blob.bin", progress=seen.append)
        backend.put_bytes("t_roundtrip/small.txt", b"hello")
        backend.put_bytes("t_roundtrip/small.txt", b"hello again")  # overwrite via os.replace
        assert backend.read_bytes("t_roundtrip/small.txt") == b"hello again"
        assert backend.read_bytes("t_roundtrip/small.txt", offset=6, length=3) == b"aga"
        assert backend.read_bytes("t_roundtrip/nope.txt") is None
        info = backend.stat("t_roundtrip/deep/er/blob.bin")
        assert info is not None and info.size_bytes == len(data)
        assert abs(info.mtime - time.time()) < 120
        backend.put_bytes("t_roundtrip/secret.env", b"A=1\n", mode=0o600)
        dest = tmp_path / "back.bin"
        backend.download("t_roundtrip/deep/er/blob.bin", dest)
    assert sum(seen) == len(data) and len(seen) == 4
    remote = any_server.root_dir / "t_roundtrip"
    assert (
        hashlib.sha256((remote / "deep/er/blob.bin").read_bytes()).digest()
        == hashlib.sha256(data).digest()
    )
    assert dest.read_bytes() == data
    assert stat.S_IMODE((remote / "secret.env").stat().st_mode) == 0o600
    assert not [p for p in remote.rglob("*.part")], "temporaries left behind"


def test_run_python_uses_one_kernel_and_close_deletes_it(any_server: JupyterServer) -> None:
    backend = backend_for(any_server)
    out = backend.run_python("import os\nprint('pid', os.getpid())", timeout_s=60)
    assert out.startswith("pid ")
    assert backend.run_python("print('pid', __import__('os').getpid())", timeout_s=30) == out
    assert backend.root() == str(any_server.root_dir)
    kernel_id = backend.kernel_id
    kernels = backend.http.request("GET", "/api/kernels").json()
    assert kernel_id in {k["id"] for k in kernels}
    backend.close()
    probe = backend_for(any_server)
    assert kernel_id not in {k["id"] for k in probe.http.request("GET", "/api/kernels").json()}
    probe.close()
    with pytest.raises(RuntimeError, match="after close"):
        backend.stat("x")


def test_pinned_kernel_is_reused_and_never_deleted(token_server: JupyterServer) -> None:
    with backend_for(token_server) as owner:
        # a notebook kernel whose user changed directory: the root is still found
        owner.run_python("x_marker = 41\nimport os\nos.makedirs('t_sub', exist_ok=True)\n"
                         "os.chdir('t_sub')", timeout_s=60)  # fmt: skip
        with backend_for(token_server, kernel_id=owner.kernel_id) as guest:
            assert guest.run_python("print(x_marker + 1)", timeout_s=30).strip() == "42"
            assert guest.root() == str(token_server.root_dir)
        assert not list(token_server.root_dir.glob("versa_root_probe-*"))
        kernels = {k["id"] for k in owner.http.request("GET", "/api/kernels").json()}
        assert owner.kernel_id in kernels  # the guest left the kernel it did not create
        gone = backend_for(token_server, kernel_id="00000000-0000-0000-0000-000000000000")
        with pytest.raises(TargetError, match="404"):
            gone.run_python("print(1)", timeout_s=10)
        gone.close()


def test_websocket_drop_mid_execute_reconnects_and_gets_the_replies(
    basepath_server: JupyterServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="versa_runner.backends.jupyter.ws")
    with backend_for(basepath_server) as backend:
        backend.run_python("print('warm')", timeout_s=60)
        channel = backend._channel
        assert channel is not None

        def cut() -> None:  # the proxy hiccup: the socket dies while the snippet runs
            time.sleep(0.7)
            channel._ws.sock.shutdown(socket.SHUT_RDWR)  # type: ignore[union-attr]

        threading.Thread(target=cut, daemon=True).start()
        code = "import time\nprint('before', flush=True)\ntime.sleep(2)\nprint('after')"
        out = backend.run_python(code, timeout_s=60)
    # Messages sent while no socket was open are replayed to the same session_id on reconnect.
    assert "reconnecting" in caplog.text
    assert "after" in out


def test_run_python_timeout_interrupts_the_kernel(token_server: JupyterServer) -> None:
    server_log = token_server.root_dir.parent / "server.log"
    with backend_for(token_server) as backend:
        started = time.monotonic()
        with pytest.raises(TargetError, match="did not finish within 1 s"):
            backend.run_python("import time; time.sleep(3)", timeout_s=1)
        assert time.monotonic() - started < 5
        assert f"Kernel interrupted: {backend.kernel_id}" in server_log.read_text()
        # The next snippet queues behind the interrupted one (ipykernel 7 delivers SIGINT once
        # the sleeping call returns); late replies of the old one are not taken for its own.
        assert backend.run_python("print('free')", timeout_s=30).strip() == "free"


def test_job_started_by_kernel_survives_kernel_deletion(any_server: JupyterServer) -> None:
    code = (
        "import subprocess, sys\n"
        "subprocess.Popen([sys.executable, '-c', 'import time, pathlib; time.sleep(2); "
        'pathlib.Path("t_survive.txt").write_text("done")\'], start_new_session=True,'
        " stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
    )
    with backend_for(any_server) as backend:
        backend.run_python(code, timeout_s=30)
        backend.delete_kernel(str(backend.kernel_id))
        deadline = time.monotonic() + 20
        while backend.read_bytes("t_survive.txt") is None and time.monotonic() < deadline:
            time.sleep(0.3)
        assert backend.read_bytes("t_survive.txt") == b"done"


# -- failures ---------------------------------------------------------------------------------


def test_wrong_token_is_auth_error_with_expiry_hint(token_server: JupyterServer) -> None:
    backend = JupyterBackend(token_server.url, token="wrong", retry=FAST_RETRY)
    with pytest.raises(AuthError, match="403") as caught:
        backend.stat("anything")
    assert "expired" in str(caught.value) + caught.value.hint
    assert token_server.token not in str(caught.value)
    checks = doctor(backend)
    assert [c.name for c in checks] == ["reachable", "auth"] and not checks[-1].ok
    backend.close()


def test_server_gone_is_unreachable() -> None:
    backend = JupyterBackend(f"http://127.0.0.1:{free_port()}/k/9/CREDX/proxy", retry=FAST_RETRY)
    with pytest.raises(UnreachableError) as caught:
        backend.read_bytes("versa_runs/x/status.json")
    assert "CREDX" not in str(caught.value)
    assert not doctor(backend)[0].ok
    backend.close()


def test_doctor_reports_python_papermill_gpus_disk(basepath_server: JupyterServer) -> None:
    with backend_for(basepath_server) as backend:
        checks = {c.name: c for c in doctor(backend, min_free_gb=0.001)}
    assert list(checks) == ["reachable", "auth", "kernel", "python", "papermill", "gpus", "disk"]
    assert all(c.ok for c in checks.values()), checks
    assert sys.version.split()[0] in checks["python"].detail
    assert not any(s in c.detail for c in checks.values() for s in basepath_server.secrets)


# -- fault injection --------------------------------------------------------------------------


def _port(url: str) -> int:
    return int(url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])


def test_download_resumes_across_cut_connections(any_server: JupyterServer, tmp_path: Path) -> None:
    data = os.urandom(6 * 1024 * 1024)
    (any_server.root_dir / "t_cut_down.bin").write_bytes(data)
    with FaultProxy(
        _port(any_server.url), cut_after_bytes=1_500_000, max_cuts=3, direction="down"
    ) as proxy:
        with backend_for(any_server, url=proxy.url_for(any_server.url)) as backend:
            dest = tmp_path / "down.part"
            backend.download("t_cut_down.bin", dest)
        assert proxy.cuts == 3
    assert hashlib.sha256(dest.read_bytes()).digest() == hashlib.sha256(data).digest()


def test_upload_survives_cut_connections(any_server: JupyterServer, tmp_path: Path) -> None:
    data = os.urandom(5 * 1024 * 1024 + 3)
    local = tmp_path / "up.bin"
    local.write_bytes(data)
    # ~1.4 MB base64 per 1 MiB chunk: a cut after 2 MB lands inside the second chunk's body
    with FaultProxy(
        _port(any_server.url), cut_after_bytes=2_000_000, max_cuts=3, direction="up"
    ) as proxy:
        with backend_for(
            any_server, url=proxy.url_for(any_server.url), chunk_bytes=1 << 20
        ) as backend:
            backend.put_file(local, "t_cut_up/up.bin")
        assert proxy.cuts == 3
    final = any_server.root_dir / "t_cut_up" / "up.bin"
    assert hashlib.sha256(final.read_bytes()).digest() == hashlib.sha256(data).digest()
    assert sorted(p.name for p in final.parent.iterdir() if not p.name.startswith(".")) == [
        "up.bin"
    ]


def test_process_argv_never_holds_the_secrets(any_server: JupyterServer) -> None:
    with backend_for(any_server) as backend:
        backend.run_python("print(1)", timeout_s=30)
        listing = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    for secret in any_server.secrets:
        assert secret not in listing


# -- retry policy against a scripted HTTP server (the status codes a proxy can produce) --------


class _Scripted(http.server.BaseHTTPRequestHandler):
    """Answers from `script[path]` in order (then 200 {}); records every request."""

    script: dict[str, list[int]] = {}
    seen: list[tuple[str, str, str | None]] = []

    def _answer(self) -> None:
        path = self.path.split("?")[0]
        self.seen.append((self.command, path, self.headers.get("Authorization")))
        codes = self.script.get(path, [])
        code = codes.pop(0) if codes else 200
        body = json.dumps({"size": 3, "last_modified": "2026-01-01T00:00:00Z", "id": "k"}).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = _answer

    def log_message(self, *args: object) -> None:
        pass


def test_retries_429_and_5xx_on_idempotent_calls_only_and_never_401_403_404() -> None:
    _Scripted.seen = []
    _Scripted.script = {
        "/api/contents/flaky": [503, 429, 502],
        "/api/contents/denied": [401],
        "/api/contents/missing": [404],
        "/api/contents/moved": [302],  # an expired proxy URL bouncing to a login page
        "/api/kernels": [503],
    }
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Scripted)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        with JupyterBackend(url, token="tkn", retry=FAST_RETRY) as backend:
            info = backend.stat("flaky")
            assert info is not None and info.size_bytes == 3
            with pytest.raises(AuthError, match="401"):
                backend.stat("denied")
            assert backend.stat("missing") is None
            with pytest.raises(AuthError, match="302"):
                backend.stat("moved")
            with pytest.raises(UnreachableError, match="503"):
                backend.run_python("print(1)", timeout_s=5)  # kernel POST: not idempotent
    finally:
        server.shutdown()
        server.server_close()
    count = Counter((method, path) for method, path, _ in _Scripted.seen)
    assert count[("GET", "/api/contents/flaky")] == 4  # 503, 429, 502, then 200
    assert count[("GET", "/api/contents/denied")] == 1
    assert count[("GET", "/api/contents/missing")] == 1
    assert count[("GET", "/api/contents/moved")] == 1
    assert count[("POST", "/api/kernels")] == 1
    assert {auth for _, _, auth in _Scripted.seen} == {"token tkn"}  # auth on every call
