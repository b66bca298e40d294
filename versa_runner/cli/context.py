"""One invocation's context: parsed global options, the target they name, the journal, and
the single `Output`."""

from __future__ import annotations

import argparse
import os
import shlex
from pathlib import Path

from versa_runner.backends import TargetOptions, choose_target, open_backend
from versa_runner.backends.base import Backend
from versa_runner.cli.output import Output
from versa_runner.runs import journal
from versa_runner.runs.journal import RunRecord
from versa_runner.runs.secrets import secret_values_from_env
from versa_runner.runs.status import RunStatus


class Context:
    """Parsed global options plus the single Output of this invocation."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.output_dir = Path(getattr(args, "output_dir", None) or ".").resolve()
        self.out = Output(
            json_mode=getattr(args, "json", False), command_options=self._repeat_options()
        )

    def _repeat_options(self) -> str:
        """Global options a follow-up command needs again. Only file paths: a URL given with
        --url is never echoed."""
        parts: list[str] = []
        if self.output_dir != Path.cwd().resolve():
            parts += ["--output-dir", shlex.quote(str(self.output_dir))]
        for flag in ("url_file", "token_file", "ssh_key", "ssh_python"):
            if getattr(self.args, flag, None):
                parts += ["--" + flag.replace("_", "-"), shlex.quote(str(getattr(self.args, flag)))]
        return " ".join(parts)

    def target_options(self, *, ssh: str | None = None) -> TargetOptions:
        """The target flags as options for `backends.open_backend` (`ssh`: a journaled spec)."""
        a = self.args
        return TargetOptions(
            output_dir=str(self.output_dir),
            url=getattr(a, "url", None),
            url_file=getattr(a, "url_file", None),
            token_file=getattr(a, "token_file", None),
            kernel_id=getattr(a, "kernel_id", None),
            ssh=ssh or getattr(a, "ssh", None),
            ssh_key=getattr(a, "ssh_key", None),
            ssh_port=getattr(a, "ssh_port", None),
            ssh_python=getattr(a, "ssh_python", None),
            ssh_accept_new=bool(getattr(a, "ssh_accept_new", False)),
            remote_root=getattr(a, "remote_root", None),
            environ=dict(os.environ),
            on_secret=self.out.redact.add,
        )

    def target_backend(self) -> Backend:
        """The target the flags name: local unless --url/--url-file/--ssh (or a URL env var)."""
        options = self.target_options()
        return open_backend(choose_target(options), options)

    def backend_for(self, record: RunRecord) -> Backend:
        """The backend a journaled run lives on (remote ones need the URL again; an SSH run's
        host, user and port come from the journal)."""
        ssh = record.target if record.backend == "ssh" else None
        return open_backend(record.backend, self.target_options(ssh=ssh), root=record.root)

    def record(self, ref: str | None) -> RunRecord:
        """Resolve RUN in the journal and register its secrets' current values for redaction."""
        record = journal.resolve_run(self.output_dir, ref)
        for value in secret_values_from_env(record.secret_names):
            self.out.redact.add(value)
        return record

    def remember(self, record: RunRecord, status: RunStatus) -> None:
        """Store the last seen status in the run's journal entry."""
        record.last_status = {"state": status.state.value, "exit_code": status.exit_code,
                              "elapsed_s": status.elapsed_s}  # fmt: skip
        journal.save_record(self.output_dir, record)
