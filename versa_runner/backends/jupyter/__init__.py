"""The Jupyter target, one module per concern: `url` (parsing, redaction, flags and env),
`http` (REST and contents API with retries), `ws` (the kernel websocket), `backend` (the
transport itself) and `doctor` (per-check report). Nothing is imported here, so naming the
package loads no HTTP or websocket library."""

from __future__ import annotations
