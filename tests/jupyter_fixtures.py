"""Real jupyter_server instances on loopback for the Jupyter backend tests (a pytest plugin).

Load with `pytest_plugins = ["jupyter_fixtures"]` in a test module. Two session-scoped servers:

- `token_server`: token auth, served at `/`.
- `basepath_server`: no token, served under `/k/123/<credential>/proxy/` the way Kaggle's proxy
  serves a notebook: the URL itself is the credential.

The token and the credential never appear in any process's argv (the secret-scan test looks at
every process): the token travels as `JUPYTER_TOKEN`, the base path in a config file.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import pytest
import requests
from faultproxy import free_port

SERVER_START_TIMEOUT_S = 60.0


@dataclass
class JupyterServer:
    """A running jupyter_server started by the tests."""

    url: str = field(repr=False)
    token: str | None = field(repr=False)
    root_dir: Path
    proc: subprocess.Popen
    log_file: IO[bytes]
    secrets: tuple[str, ...] = field(repr=False, default=())
    """Values that must never leak (token, credential path segment, whole URL)."""

    def stop(self) -> None:
        """Terminate this server (and with it the kernels it started)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.log_file.close()


def start_jupyter_server(
    workdir: Path, *, token: str | None, base_path: str = "/", port: int | None = None
) -> JupyterServer:
    """Start `python -m jupyter_server` on loopback and wait until `/api/status` answers."""
    root = workdir / "root"
    config_dir = workdir / "config"
    root.mkdir(parents=True, exist_ok=True)
    config_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    config = {
        "ServerApp": {
            "base_url": base_path,
            "root_dir": str(root),
            "ip": "127.0.0.1",
            "port": port,
            "port_retries": 0,
            "open_browser": False,
            "allow_root": True,
        },
        "IdentityProvider": {"token": token or ""},
    }
    (config_dir / "jupyter_server_config.json").write_text(json.dumps(config))
    env = {
        **os.environ,
        "JUPYTER_CONFIG_DIR": str(config_dir),
        "JUPYTER_RUNTIME_DIR": str(workdir / "runtime"),
        "JUPYTER_TOKEN": token or "",
    }
    log_file = open(workdir / "server.log", "wb")  # noqa: SIM115 (lives as long as the server)
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyter_server"],
        env=env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        cwd=workdir,
    )
    url = f"http://127.0.0.1:{port}{base_path.rstrip('/')}"
    headers = {"Authorization": f"token {token}"} if token else {}
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            log_file.close()
            raise RuntimeError(
                f"jupyter_server exited: {(workdir / 'server.log').read_text()[-2000:]}"
            )
        try:
            if requests.get(f"{url}/api/status", headers=headers, timeout=2).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            log_file.close()
            raise RuntimeError("jupyter_server did not answer within 60 s")
        time.sleep(0.2)
    leaked = tuple(s for s in (token, url if base_path != "/" else None) if s)
    return JupyterServer(
        url=url, token=token, root_dir=root, proc=proc, log_file=log_file, secrets=leaked
    )


@pytest.fixture(scope="session")
def token_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JupyterServer]:
    """jupyter_server with token auth (the token is random per session)."""
    server = start_jupyter_server(
        tmp_path_factory.mktemp("jupyter_token"), token=secrets.token_hex(16)
    )
    yield server
    server.stop()


@pytest.fixture(scope="session")
def basepath_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JupyterServer]:
    """jupyter_server without a token under `/k/123/<credential>/proxy/` (Kaggle's shape)."""
    credential = "cred" + secrets.token_hex(12)
    server = start_jupyter_server(
        tmp_path_factory.mktemp("jupyter_kaggle"),
        token=None,
        base_path=f"/k/123/{credential}/proxy/",
    )
    server.secrets = (*server.secrets, credential)
    yield server
    server.stop()


@pytest.fixture(params=["token", "basepath"], scope="session")
def any_server(request: pytest.FixtureRequest) -> JupyterServer:
    """Each test using this runs once per server flavour."""
    return request.getfixturevalue(f"{request.param}_server")
