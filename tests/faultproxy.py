"""A loopback TCP proxy that cuts connections after N bytes, to test resumable transfers.

Placed between the client and a real jupyter_server: each proxied connection is closed abruptly
once `cut_after_bytes` have passed in the watched direction ("up" = client to server, "down" =
server to client), until `max_cuts` cuts have happened; after that it forwards untouched. It is
bounded twice: by `max_cuts` and by `lifetime_s`, after which it stops itself, so a hung test
never leaves it running.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Literal

Direction = Literal["up", "down"]
_BUFFER_BYTES = 64 * 1024


def free_port() -> int:
    """A TCP port that was free on loopback a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class FaultProxy:
    """Forward 127.0.0.1:<port> to 127.0.0.1:<target_port>, cutting connections on schedule."""

    def __init__(
        self,
        target_port: int,
        *,
        cut_after_bytes: int,
        max_cuts: int,
        direction: Direction = "down",
        lifetime_s: float = 120.0,
    ) -> None:
        self.target_port = target_port
        self.cut_after_bytes = cut_after_bytes
        self.max_cuts = max_cuts
        self.direction = direction
        self.cuts = 0
        self.bytes_forwarded = {"up": 0, "down": 0}
        """Bytes passed on in each direction (HTTP framing included), for re-transfer accounting."""
        self._deadline = time.monotonic() + lifetime_s
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port: int = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    def url_for(self, url: str) -> str:
        """`url` (pointing at the target port) rewritten to go through this proxy."""
        return url.replace(f":{self.target_port}", f":{self.port}", 1)

    def close(self) -> None:
        """Stop accepting and close every proxied connection."""
        self._stopped.set()
        self._thread.join(timeout=5)
        with self._lock:
            for sock in self._sockets:
                _close(sock)
            self._sockets.clear()
        _close(self._listener)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _accept_loop(self) -> None:
        while not self._stopped.is_set() and time.monotonic() < self._deadline:
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self._lock:
                self._sockets += [client, upstream]
            pair = _Pair(self, client, upstream)
            for src, dst, name in ((client, upstream, "up"), (upstream, client, "down")):
                threading.Thread(target=pair.pump, args=(src, dst, name), daemon=True).start()
        self._stopped.set()

    def _take_cut(self) -> bool:
        with self._lock:
            if self.cuts >= self.max_cuts:
                return False
            self.cuts += 1
            return True


class _Pair:
    """One client connection and its upstream; a cut closes both ends."""

    def __init__(self, proxy: FaultProxy, client: socket.socket, upstream: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream = upstream
        self.passed = 0
        self.armed = True

    def pump(self, src: socket.socket, dst: socket.socket, name: str) -> None:
        try:
            while not self.proxy._stopped.is_set():
                data = src.recv(_BUFFER_BYTES)
                if not data:
                    break
                if name == self.proxy.direction and self.armed:
                    room = self.proxy.cut_after_bytes - self.passed
                    if len(data) >= room and self.proxy._take_cut():
                        dst.sendall(data[: max(room, 0)])
                        break
                    self.passed += len(data)
                    if room <= len(data):
                        self.armed = False  # cut budget spent: forward the rest untouched
                dst.sendall(data)
                self.proxy.bytes_forwarded[name] += len(data)
        except OSError:
            pass
        finally:
            _close(self.client)
            _close(self.upstream)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
