"""Jupyter server addresses: normalize, parse Kaggle proxy and channels URLs, redact, resolve.

A Kaggle proxy URL (`https://<host>/k/<n>/<credential>/proxy`) carries its credential in the
*path*, so the whole URL is a secret (versa_spec §1.1): every place that prints, logs or
journals a URL goes through `redact`, which keeps only `scheme://host/…`. The URL and token are
read from flags that name *files* or from the environment so they never sit in argv (§8.2).

Precedence (versa_spec §8.2): `--url` → `--url-file` → `VERSA_RUN_URL` → `REMOTE_JUPYTER_URL` →
`KAGGLE_URL`; token: `--token-file` → `VERSA_RUN_TOKEN` → `REMOTE_JUPYTER_TOKEN`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from versa_runner.errors import UsageError

URL_ENV_VARS = ("VERSA_RUN_URL", "REMOTE_JUPYTER_URL", "KAGGLE_URL")
TOKEN_ENV_VARS = ("VERSA_RUN_TOKEN", "REMOTE_JUPYTER_TOKEN")
KERNEL_ID_ENV_VAR = "VERSA_RUN_KERNEL_ID"

# What the browser opens for a notebook kernel:
#   wss://<host>/k/<n>/<cred>/proxy/api/kernels/<uuid>/channels?session_id=...
# Everything before `/api/kernels/` is the server base; the uuid is a reusable kernel id.
_CHANNELS_RE = re.compile(r"^(?P<base>.*?)/api/kernels/(?P<kernel>[0-9a-fA-F-]+)/channels/?$")
_KAGGLE_PATH_RE = re.compile(r"^/k/\d+/[^/]+/proxy$")
_WS_TO_HTTP = {"ws": "http", "wss": "https"}


@dataclass(frozen=True)
class JupyterTarget:
    """Where a Jupyter server is and how to authenticate; `repr` never shows a secret."""

    base_url: str = field(repr=False)
    """Normalized base URL (no trailing `/`, no query); may itself be the credential."""
    token: str | None = field(default=None, repr=False)
    kernel_id: str | None = None
    """A kernel to reuse as the launcher (from `--kernel-id` or a channels URL)."""

    @property
    def redacted_url(self) -> str:
        """`scheme://host/…`: safe to print, log and journal."""
        return redact(self.base_url)

    @property
    def is_kaggle(self) -> bool:
        """True for a Kaggle-style proxy URL (`/k/<n>/<credential>/proxy`)."""
        return bool(_KAGGLE_PATH_RE.match(urlsplit(self.base_url).path))

    def __repr__(self) -> str:
        token = "***" if self.token else None
        return f"JupyterTarget(url={self.redacted_url!r}, token={token!r}, kernel_id={self.kernel_id!r})"


def normalize_url(url: str) -> str:
    """Strip whitespace, require scheme and host, drop query and fragment and the trailing `/`.

    A `ws://`/`wss://` channels URL is accepted too; use `parse_server_url` to keep its kernel id.
    """
    base, _ = parse_server_url(url)
    return base


def parse_server_url(url: str) -> tuple[str, str | None]:
    """Split a server or channels URL into (normalized http(s) base URL, kernel id or None)."""
    text = (url or "").strip()
    parts = urlsplit(text)
    scheme = _WS_TO_HTTP.get(parts.scheme.lower(), parts.scheme.lower())
    if scheme not in ("http", "https") or not parts.netloc:
        raise UsageError(
            f"--url must be an http(s) URL with a host, got {redact(text) or 'an empty value'!r}",
            hint="Pass the server address, e.g. https://<host>/k/<n>/<credential>/proxy.",
        )
    path = parts.path.rstrip("/")
    kernel_id = None
    match = _CHANNELS_RE.match(path)
    if match:
        path, kernel_id = match.group("base"), match.group("kernel")
    return urlunsplit((scheme, parts.netloc, path, "", "")), kernel_id


def redact(url: str) -> str:
    """Keep only `scheme://host/…`: the path, query and userinfo may hold the credential."""
    parts = urlsplit((url or "").strip())
    if not parts.scheme or not parts.hostname:
        return "<redacted>" if url else ""
    host = parts.hostname + (f":{parts.port}" if parts.port else "")
    suffix = "/…" if (parts.path.strip("/") or parts.query) else ""
    return f"{parts.scheme}://{host}{suffix}"


def resolve_target(
    *,
    url: str | None = None,
    url_file: str | os.PathLike[str] | None = None,
    token_file: str | os.PathLike[str] | None = None,
    kernel_id: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> JupyterTarget:
    """Build the target from flags and the environment (read now, at call time)."""
    env = os.environ if environ is None else environ
    if url and url_file:
        raise UsageError("--url and --url-file both given; pass only one of them")
    raw_url = url or (_read_secret_file(url_file, "--url-file") if url_file else None)
    raw_url = raw_url or next((env[name] for name in URL_ENV_VARS if env.get(name)), None)
    if not raw_url:
        raise UsageError(
            "no Jupyter URL: pass --url-file FILE or set REMOTE_JUPYTER_URL",
            hint="Keep the URL out of argv: REMOTE_JUPYTER_URL=... versa-run ... or --url-file.",
        )
    base_url, url_kernel = parse_server_url(raw_url)
    token = _read_secret_file(token_file, "--token-file") if token_file else None
    token = token or next((env[name] for name in TOKEN_ENV_VARS if env.get(name)), None)
    pinned = kernel_id or env.get(KERNEL_ID_ENV_VAR) or url_kernel
    return JupyterTarget(base_url=base_url, token=token or None, kernel_id=pinned or None)


def _read_secret_file(path: str | os.PathLike[str] | None, flag: str) -> str:
    try:
        text = Path(path or "").read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise UsageError(
            f"{flag} {os.fspath(path or '')!r} cannot be read: {exc.strerror}"
        ) from exc
    if not text:
        raise UsageError(f"{flag} {os.fspath(path or '')!r} is empty")
    return text


__all__ = [
    "JupyterTarget",
    "KERNEL_ID_ENV_VAR",
    "TOKEN_ENV_VARS",
    "URL_ENV_VARS",
    "normalize_url",
    "parse_server_url",
    "redact",
    "resolve_target",
]
