"""A small kernel websocket client: execute one snippet, collect its stdout.

Why our own and not jupyter-kernel-client or nbclient's gateway manager: the former renamed its
classes in 1.0 and never reconnects; the latter sends no auth on the websocket handshake
(versa_spec §6.1, orchestration_anchors §2.4 E1). We need little: auth on the handshake, the
legacy JSON protocol (one text frame per message, `channel` field), `execute_request` with
`silent=True, store_history=False` so runner code stays out of IPython history, reconnect with
the *same* `session_id` (jupyter_server replays messages buffered for that session), and an
interrupt when a snippet overruns its timeout so the kernel does not stay busy.

Every wait has a deadline: the handshake (`CONNECT_TIMEOUT_S`), each read (woken at least every
`LIVENESS_CHECK_S`) and the snippet as a whole (`timeout_s`). A deleted kernel does not always
close its websocket (jupyter_server keeps the socket open and simply never answers), so a reply
wait also polls the kernel's liveness through REST, nbclient's "dead vs slow" split: a kernel
that is gone raises `KernelGone` within seconds instead of after the snippet's whole timeout
(issue 14: a follower sat 11 minutes in a read on a deleted kernel).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

import websocket
from jupyter_client.jsonutil import json_default
from jupyter_client.session import Session

from versa_runner.errors import AuthError, TargetError, UnreachableError

log = logging.getLogger(__name__)


class _UnsignedOnPurpose(logging.Filter):
    """Drops jupyter_client's "Message signing is disabled" warning for our Session: the websocket
    carries JSON messages that jupyter_server signs for the kernel, so there is no key to hold
    here, and a warning the user cannot act on does not belong on their terminal."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Message signing is disabled" not in record.getMessage()


logging.getLogger("traitlets").addFilter(_UnsignedOnPurpose())

USERNAME = "versa-run"
PING_INTERVAL_S = 30.0
"""Idle websocket reads wake this often to ping, so proxies keep the connection open."""
LIVENESS_CHECK_S = 5.0
"""While a reply is awaited, the kernel's liveness is checked this often (REST, no websocket)."""
RECONNECT_ATTEMPTS = 3
CONNECT_TIMEOUT_S = 30.0
KERNEL_GONE_STATUS = 404  # the channels handshake of a kernel the server does not know


class KernelGone(UnreachableError):
    """The kernel behind this channel no longer exists (deleted, or the server restarted).

    A job never depends on the launcher kernel, so its owner may start a new one and resend
    the (idempotent) snippet.
    """


@dataclass
class ExecuteResult:
    """What one execute produced on the kernel."""

    stdout: str = ""
    stderr: str = ""
    status: str = "ok"
    ename: str = ""
    evalue: str = ""
    traceback: list[str] = field(default_factory=list)


class KernelChannel:
    """One websocket to `/api/kernels/<id>/channels`, reused for every execute of a CLI call."""

    def __init__(
        self,
        ws_url: str,
        *,
        headers: dict[str, str],
        cookie: str | None = None,
        redacted_url: str = "<redacted>",
        on_timeout: Callable[[], None] | None = None,
        is_alive: Callable[[], bool] | None = None,
    ) -> None:
        self._ws_url = ws_url
        self._is_alive = is_alive
        self._headers = [f"{name}: {value}" for name, value in headers.items()]
        self._cookie = cookie
        self._redacted_url = redacted_url
        self._on_timeout = on_timeout
        self._session_id = uuid.uuid4().hex
        # Messages are built by jupyter_client's Session (header, ids, protocol version); the
        # websocket carries them unsigned: jupyter_server signs them for the kernel.
        self._session = Session(session=self._session_id, username=USERNAME, key=b"")
        self._ws: websocket.WebSocket | None = None
        self._closed = False

    def execute(self, code: str, *, timeout_s: float) -> ExecuteResult:
        """Run `code` on the kernel and wait for it to go idle; reconnects on a dropped socket."""
        if self._closed:
            raise RuntimeError("KernelChannel used after close()")
        deadline = time.monotonic() + timeout_s
        request, msg_id = self._execute_request(code)
        result = ExecuteResult()
        reply_seen = idle_seen = False
        sent = False
        reconnects = 0
        while not (reply_seen and idle_seen):
            try:
                if not sent:
                    self._socket().send(request)
                    sent = True
                message = self._recv(deadline)
            except KernelGone:
                self._drop()
                raise
            except (websocket.WebSocketException, OSError) as exc:
                # A replayed or resent request is safe: runner snippets are idempotent (§8.2).
                reconnects += 1
                self._drop()
                if reconnects > RECONNECT_ATTEMPTS:
                    raise UnreachableError(
                        f"kernel websocket to {self._redacted_url} dropped {reconnects} times"
                    ).add_context(str(exc)) from exc
                # A request that was sent is not resent: the server replays its replies to
                # the same session_id. One that never left is sent on the new socket.
                log.info("kernel websocket dropped (%s); reconnecting", type(exc).__name__)
                time.sleep(0.5 * reconnects)
                continue
            if message is None:
                self._timeout(timeout_s)
            if message.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            reply_seen, idle_seen = self._absorb(message, result, reply_seen, idle_seen)
        return result

    def close(self) -> None:
        """Close the websocket; the kernel itself is left to its owner."""
        self._drop()
        self._closed = True

    def _absorb(
        self, message: dict[str, Any], result: ExecuteResult, reply_seen: bool, idle_seen: bool
    ) -> tuple[bool, bool]:
        msg_type = message.get("msg_type") or message.get("header", {}).get("msg_type")
        content = message.get("content", {})
        if msg_type == "stream":
            if content.get("name") == "stdout":
                result.stdout += content.get("text", "")
            else:
                result.stderr += content.get("text", "")
        elif msg_type == "error":
            result.status = "error"
            result.ename = content.get("ename", "")
            result.evalue = content.get("evalue", "")
            result.traceback = list(content.get("traceback", []))
        elif msg_type == "status" and content.get("execution_state") == "idle":
            idle_seen = True
        elif msg_type == "execute_reply":
            reply_seen = True
            if content.get("status") not in (None, "ok") and result.status == "ok":
                result.status = content.get("status", "error")
                result.ename = content.get("ename", result.ename)
                result.evalue = content.get("evalue", result.evalue)
        return reply_seen, idle_seen

    def _recv(self, deadline: float) -> dict[str, Any] | None:
        """The next JSON message, or None once `deadline` passes; pings while idle and checks
        every `LIVENESS_CHECK_S` that the kernel still exists (KernelGone when it does not)."""
        ws = self._socket()
        last_ping = time.monotonic()
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            ws.settimeout(min(remaining, LIVENESS_CHECK_S))
            try:
                frame = ws.recv()
            except websocket.WebSocketTimeoutException:
                if self._is_alive is not None and not self._is_alive():
                    raise KernelGone(
                        f"the launcher kernel on {self._redacted_url} is gone"
                    ) from None
                now = time.monotonic()
                if deadline - now > 0 and now - last_ping >= PING_INTERVAL_S:
                    ws.ping()
                    last_ping = now
                continue
            if isinstance(frame, bytes):
                continue  # v1 binary frames carry buffers we never request
            message: dict[str, Any] = json.loads(frame)
            return message

    def _timeout(self, timeout_s: float) -> NoReturn:
        if self._on_timeout is not None:
            self._on_timeout()
        raise TargetError(
            f"a runner snippet did not finish within {timeout_s:g} s on {self._redacted_url}",
            hint="The kernel may be busy with another cell; pass --kernel-id of an idle kernel "
            "or let versa-run create its own.",
        )

    def _socket(self) -> websocket.WebSocket:
        if self._ws is None:
            url = f"{self._ws_url}?session_id={self._session_id}"
            try:
                self._ws = websocket.create_connection(
                    url, header=self._headers, cookie=self._cookie, timeout=CONNECT_TIMEOUT_S
                )
            except websocket.WebSocketBadStatusException as exc:
                # Not chained: the exception carries the server's error page, which quotes the
                # base path (the credential on Kaggle), and `--debug` prints chains.
                status = getattr(exc, "status_code", 0)
                if status == KERNEL_GONE_STATUS:
                    raise KernelGone(
                        f"kernel websocket on {self._redacted_url} answered {status}: "
                        "the kernel is gone"
                    ) from None
                if status in (401, 403):
                    raise AuthError(
                        f"kernel websocket on {self._redacted_url} answered {status}"
                    ) from None
                raise UnreachableError(
                    f"kernel websocket on {self._redacted_url} answered {status}"
                ) from None
        return self._ws

    def _drop(self) -> None:
        if self._ws is not None:
            try:
                self._ws.close()
            except (websocket.WebSocketException, OSError):
                pass  # already gone; nothing to release
            self._ws = None

    def _execute_request(self, code: str) -> tuple[str, str]:
        """The execute_request (jupyter_client's message spec) as a legacy JSON frame; its id."""
        content = {
            "code": code,
            "silent": True,
            "store_history": False,
            "user_expressions": {},
            "allow_stdin": False,
            "stop_on_error": True,
        }
        message = self._session.msg("execute_request", content)
        message["channel"] = "shell"  # the legacy websocket protocol names the channel inline
        message["buffers"] = []
        return json.dumps(message, default=json_default), str(message["header"]["msg_id"])


__all__ = ["ExecuteResult", "KernelChannel", "KernelGone"]
