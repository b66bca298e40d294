"""The one reply format between the target and the host: a sentinel line carrying JSON.

Code run on the target prints exactly one line `__VERSA_RUNNER__ <json>` (versa_spec §8.2:
never "the first line that starts with {"); the host finds it in the concatenated stdout with
`parse`. Standard library only: this module runs on the target too.
"""

from __future__ import annotations

import json
from typing import Any

SENTINEL = "__VERSA_RUNNER__ "
TAIL_LINES = 3


class MissingReply(ValueError):
    """The output held no sentinel line; `tail` is its last lines (for the error message)."""

    def __init__(self, tail: list[str]) -> None:
        super().__init__(f"no reply line (stdout tail: {tail!r})")
        self.tail = tail


def emit(payload: Any) -> None:
    """Print `payload` as the one reply line (target side)."""
    print(SENTINEL + json.dumps(payload), flush=True)


def parse(stdout: str) -> Any:
    """The JSON after the first sentinel line of `stdout`; MissingReply when there is none."""
    for line in stdout.splitlines():
        if line.startswith(SENTINEL):
            return json.loads(line[len(SENTINEL) :])
    raise MissingReply(stdout.strip().splitlines()[-TAIL_LINES:])
