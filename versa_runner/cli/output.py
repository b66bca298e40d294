"""Everything `versa-run` shows the user goes through here, and only here.

Plain text when stdout is not a terminal, rich styling when it is, one JSON object per command
with `--json` (stable keys, secret names only). Every string passes through the run's `Redactor`
first, so a secret value can reach the screen only if this module is bypassed.
"""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TextIO

from versa_runner.runs.secrets import Redactor

if TYPE_CHECKING:
    from versa_runner.errors import VersaRunError
    from versa_runner.runs.journal import RunRecord
    from versa_runner.runs.status import RunStatus
    from versa_runner.runs.sync import SyncResult


PLAIN_WIDTH = 200  # piped output: wide enough that a row never wraps
LIST_COLUMNS = ("run_id", "task", "state", "duration", "target", "created_at")
STATE_STYLES = {"succeeded": "green", "failed": "red", "killed": "yellow", "timeout": "red",
                "bootstrap_failed": "red", "stale": "yellow", "lost": "red", "running": "cyan",
                "unreachable": "yellow"}  # fmt: skip


def _list_row(record: RunRecord) -> dict[str, Any]:
    elapsed = record.last_status.get("elapsed_s")
    return {
        "run_id": record.run_id,
        "task": record.task,
        "state": record.last_status.get("state", "?"),
        "duration_s": elapsed,
        "duration": _duration(elapsed),
        "target": record.target,
        "created_at": record.created_at[:19].replace("T", " "),
    }


def _duration(seconds: Any) -> str:
    """`1h02m`, `3m07s`, `12s`; `-` when unknown."""
    if not isinstance(seconds, (int, float)):
        return "-"
    total = int(round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)


def follow_up_commands(run_id: str, options: str = "") -> list[str]:
    """The exact commands that follow, wait for, sync and kill a run (SkyPilot's habit).

    `options` are the global options the user needs again (`--output-dir`, `--url-file`); they
    go after the verb, where every command accepts them.
    """
    tail = f" {options}" if options else ""
    return [
        f"versa-run logs {run_id} --follow{tail}",
        f"versa-run wait {run_id}{tail}",
        f"versa-run sync {run_id}{tail}",
        f"versa-run kill {run_id}{tail}",
    ]


class Output:
    """The single writer of user-facing text."""

    def __init__(
        self, *, json_mode: bool = False, stream: TextIO | None = None,
        err_stream: TextIO | None = None, redactor: Redactor | None = None,
        command_options: str = "",
    ) -> None:  # fmt: skip
        self.command_options = command_options
        self.json_mode = json_mode
        self.stream = stream or sys.stdout
        self.err_stream = err_stream or sys.stderr
        self.redact = redactor or Redactor()
        self._console: Any = None
        if not json_mode and self.stream.isatty():
            from rich.console import Console  # imported only for terminals

            self._console = Console(file=self.stream, highlight=False)

    def _line(self, text: str, *, style: str | None = None) -> None:
        text = self.redact(text)
        if self._console is not None and style:
            self._console.print(text, style=style, markup=False)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def _rich(self, renderable: Any) -> None:
        """Print a rich renderable: styled on a terminal, plain text when piped (redacted)."""
        from rich.console import Console

        terminal = self._console is not None
        buffer = io.StringIO()
        Console(file=buffer, width=self._console.width if terminal else PLAIN_WIDTH,
                force_terminal=terminal, no_color=not terminal, highlight=False).print(renderable)  # fmt: skip
        self.stream.write(self.redact(buffer.getvalue()))
        self.stream.flush()

    def emit_json(self, obj: dict[str, Any]) -> None:
        """One JSON object on one line (redacted like everything else)."""
        self.stream.write(self.redact(json.dumps(obj, sort_keys=True)) + "\n")
        self.stream.flush()

    @contextmanager
    def transfer(self, description: str) -> Iterator[Callable[[int], None] | None]:
        """A byte-counting progress bar on stderr for an upload or download (terminals only).

        Yields the callback transports take as `progress`, or None when stderr is not a TTY or
        `--json` is set (no bar, no cost).
        """
        if self.json_mode or not self.err_stream.isatty():
            yield None
            return
        from rich.console import Console
        from rich.progress import DownloadColumn, Progress, TextColumn, TransferSpeedColumn

        columns = (TextColumn(self.redact(description)), DownloadColumn(), TransferSpeedColumn())
        console = Console(file=self.err_stream)
        with Progress(*columns, console=console, transient=True) as bar:
            task = bar.add_task(description, total=None)
            yield lambda n: bar.advance(task, n)

    def info(self, text: str) -> None:
        """A progress note on stderr (keeps stdout clean for --json and pipes)."""
        if not self.json_mode:
            self.err_stream.write(self.redact(text) + "\n")
            self.err_stream.flush()

    def log_text(self, text: str) -> None:
        """Raw log text from the job, as it arrives (no added newline); JSON lines with --json."""
        if self.json_mode:
            if text:
                self.emit_json({"log": text})
            return
        self.stream.write(self.redact(text))
        self.stream.flush()

    def submitted(self, record: RunRecord, *, detached: bool) -> None:
        """Announce a submitted run (plus the follow-up commands when detached)."""
        if self.json_mode:
            self.emit_json({"run_id": record.run_id, "task": record.task, "target": record.target,
                            "run_dir": record.run_dir, "secret_names": record.secret_names,
                            "detached": detached, "commands": follow_up_commands(record.run_id, self.command_options)})  # fmt: skip
            return
        self._line(
            f"run {record.run_id} submitted ({record.task} on {record.target})", style="bold green"
        )
        if detached:
            self.next_commands(record.run_id)

    def next_commands(self, run_id: str) -> None:
        """Print the follow-up commands (after a detached submit, and on Ctrl-C while following)."""
        if self.json_mode:
            return
        self._line("follow it with:")
        for command in follow_up_commands(run_id, self.command_options):
            self._line(f"  {command}", style="cyan")

    def interrupted(self, run_id: str) -> None:
        """Ctrl-C while following: the job is untouched; say how to get back to it."""
        self.info(f"stopped following; run {run_id} keeps running on its target")
        if not self.json_mode:
            self.err_stream.write(
                "\n".join("  " + c for c in follow_up_commands(run_id, self.command_options)) + "\n"
            )

    def status(self, record: RunRecord, status: RunStatus) -> None:
        """A run's state, exit code, progress (cell k of N), elapsed and heartbeat age."""
        if self.json_mode:
            self.emit_json({"run_id": record.run_id, "task": record.task, **status.to_json()})
            return
        line = f"{record.run_id}  {record.task}  {status.state.value}"
        if status.exit_code is not None:
            line += f"  exit_code={status.exit_code}"
        self._line(line, style=STATE_STYLES.get(status.state.value, "bold"))
        progress = status.progress
        if progress is not None:
            text = f"  cell {progress.cells_done}/{progress.cells_total} completed"
            if progress.current_cell is not None:
                text += f"; cell {progress.current_cell} running"
                if progress.current_cell_elapsed_s is not None:
                    text += f" for {progress.current_cell_elapsed_s:.0f} s"
            if progress.interrupted_cell is not None:
                text += f"; cell {progress.interrupted_cell} interrupted"
            if progress.failed_cell is not None:
                text += f"; cell {progress.failed_cell} failed"
            self._line(text)
        started, ended = status.info.get("started_at"), status.info.get("ended_at")
        if started:
            self._line(f"  started {started}" + (f", ended {ended}" if ended else ""))
        if status.elapsed_s is not None:
            self._line(f"  elapsed {status.elapsed_s:.0f} s")
        if status.heartbeat_age_s is not None and not status.state.is_terminal:
            self._line(f"  heartbeat {status.heartbeat_age_s:.0f} s ago")

    def run_list(self, records: list[RunRecord]) -> None:
        """The journaled runs in the order given (newest first): a header, then one row each
        with state, duration and target; `--json` lists the same rows in the same order."""
        rows = [_list_row(r) for r in records]
        if self.json_mode:
            self.emit_json({"runs": rows})
            return
        if not rows:
            self._line("no runs yet")
            return
        from rich.table import Table  # a table on a terminal, aligned plain columns otherwise

        table = Table(box=None, pad_edge=False, header_style="bold")
        for column in LIST_COLUMNS:
            table.add_column(column.upper().replace("_", " "), no_wrap=True)
        for row in rows:
            state = str(row["state"])
            cells = [_cell(row[c]) for c in LIST_COLUMNS]
            table.add_row(*cells, style=STATE_STYLES.get(state))
        self._rich(table)

    def next_steps(self, commands: list[str]) -> None:
        """The command(s) that come next in the playbook (after a successful step)."""
        if self.json_mode or not commands:
            return
        self._line("next:")
        for command in commands:
            self._line(f"  {command}", style="cyan")

    def verdict(self, *, out_md: str, gate: str, passed: bool, failures: list[str],
                levers: list[str]) -> None:  # fmt: skip
        """A parity verdict: the report written, PASS/FAIL, each failed check, the levers."""
        if self.json_mode:
            self.emit_json({"out_md": out_md, "gate": gate, "passed": passed,
                            "failures": failures, "levers": levers})  # fmt: skip
            return
        self._line(f"[+] Wrote {out_md}")
        word = "PASS" if passed else "FAIL"
        self._line(f"Gate {gate}: {word}", style="bold green" if passed else "bold red")
        for failure in failures:
            self._line(f"  - {failure}")
        if levers:
            self._line("next levers (playbook §5, no finetune), one at a time:")
            for lever in levers:
                self._line(f"  - {lever}", style="cyan")

    def synced(self, result: SyncResult) -> None:
        """What a sync transferred and where the executed notebook is."""
        if self.json_mode:
            self.emit_json({"transferred": result.transferred, "skipped": len(result.skipped),
                            "bytes_transferred": result.bytes_transferred,
                            "notebook": str(result.notebook_copy) if result.notebook_copy else None})  # fmt: skip
            return
        self._line(f"synced: {len(result.transferred)} file(s) transferred "
                   f"({result.bytes_transferred} bytes), {len(result.skipped)} unchanged")  # fmt: skip
        if result.notebook_copy is not None:
            self._line(f"executed notebook: {result.notebook_copy}")

    def mapping(self, title: str, values: dict[str, Any]) -> None:
        """A titled key/value block (doctor)."""
        if self.json_mode:
            self.emit_json(values)
            return
        self._line(title, style="bold")
        for key, value in values.items():
            self._line(f"  {key}: {value}")

    def text(self, text: str) -> None:
        """Plain text (help screens)."""
        self._line(text)

    def error(self, error: VersaRunError) -> None:
        """One line plus the hint; no traceback (the CLI shows one with --debug)."""
        if self.json_mode:
            self.emit_json(
                {"error": str(error), "hint": error.hint, "exit_code": int(error.exit_code)}
            )
            return
        self.err_stream.write(self.redact(f"error: {error}") + "\n")
        if error.hint:
            self.err_stream.write(self.redact(f"hint: {error.hint}") + "\n")
        self.err_stream.flush()
