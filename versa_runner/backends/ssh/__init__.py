"""The SSH target: `target` (where the host is, whether to trust its key) and `backend` (the
paramiko transport). Nothing is imported here, so naming the package loads no paramiko."""

from __future__ import annotations
