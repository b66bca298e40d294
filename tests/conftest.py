"""Settings every test relies on, made here so plain `pytest` and `scripts/test.sh` agree.

One intra-op thread: the two-rank equality tests compare float sums that a multi-threaded
reduction orders differently, and the tiny models run faster on one thread anyway. The value is
set before torch is imported (conftest loads first) and inherited by every job a test starts.
"""

from __future__ import annotations

import os
import sys

os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"

if "torch" in sys.modules:  # a plugin imported it first: set the live pool as well
    sys.modules["torch"].set_num_threads(1)
