"""The `versa-run` command line: `parser` (options and verbs), `commands` (one function per
verb), `context` (global options, target, journal), `output` (everything the user sees) and
`main` (dispatch, and the one place errors become exit statuses)."""

from __future__ import annotations

from versa_runner.cli.main import main
from versa_runner.cli.parser import VERBS, build_parser, with_implicit_submit

__all__ = ["VERBS", "build_parser", "main", "with_implicit_submit"]
