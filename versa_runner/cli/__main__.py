"""`python -m versa_runner.cli` is `versa-run` (as is `python -m versa_runner`)."""

from __future__ import annotations

import sys

from versa_runner.cli.main import main

sys.exit(main())
