#!/usr/bin/env python
"""Compatibility entry point with the playbook's flags; the work is in `versa_runner.parity.summarize`.

    python scripts/summarize_eaft_pair.py --left-json BASE.json --right-json CAND.json \
        --out-md reports/parity.md [--gates-json GATES.json]

Exit status: 0 PASS, 1 FAIL, 2 when the pair is refused (missing hero row or histogram,
different blocks or settings). Same as `versa-run summarize`.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Works from a plain checkout too (no `pip install -e .`): the repo root holds versa_runner.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from versa_runner.parity.summarize import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
