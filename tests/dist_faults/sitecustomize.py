"""Test-only fault injector for torchrun ranks (never shipped: it lives under tests/).

Python imports `sitecustomize` at start-up from the first folder on sys.path that has one;
tests/test_distributed.py puts this folder on PYTHONPATH, so the notebook kernel, torchrun and
every rank it starts inherit it. In the rank named by VERSA_TEST_FAIL_RANK (torchrun sets RANK),
`DistContext.owns` is wrapped: when the rank reaches its (VERSA_TEST_FAIL_AFTER + 1)-th own
batch it exits hard, like an OOM kill (no cleanup, no except), with FAULT_EXIT_CODE. Its resume
state was saved after its last finished batch, as in a real crash.
"""

from __future__ import annotations

import os

FAULT_EXIT_CODE = 17  # recognizable in the launcher's "rank N died (exit code 17)" message


def _install(after: int) -> None:
    import logging

    from versa_kernels import distributed

    original = distributed.DistContext.owns
    started = [0]

    def owns(self: distributed.DistContext, index: int) -> bool:
        mine = original(self, index)
        if mine:
            started[0] += 1
            if started[0] > after:
                logging.getLogger(__name__).error(
                    "rank %d: injected failure after %d batches", self.rank, after
                )
                logging.shutdown()
                os._exit(FAULT_EXIT_CODE)
        return mine

    distributed.DistContext.owns = owns  # type: ignore[method-assign]


if os.environ.get("RANK") is not None and os.environ.get("RANK") == os.environ.get(
    "VERSA_TEST_FAIL_RANK"
):
    _install(int(os.environ.get("VERSA_TEST_FAIL_AFTER", "1")))
