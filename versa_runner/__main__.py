"""`python -m versa_runner` is `versa-run` (for targets where the console script is not on PATH)."""

from __future__ import annotations

import sys

from versa_runner.cli import main

if __name__ == "__main__":
    sys.exit(main())
