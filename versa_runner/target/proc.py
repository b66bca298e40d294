"""The one reader of `/proc`: process start times, parents and groups (Linux targets).

Used by the launcher (to end a job's whole process tree), by the kill op (to check that a
recorded pid still is the process it was, before signalling it) and by the tests. Standard
library only: this module runs on the target.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

PROC = "/proc"
# /proc/<pid>/stat fields after the command name, counted from field 3 (`state`):
STATE, PPID, PGRP, START_TIME = 0, 1, 2, 19  # fields 3, 4, 5 and 22 of proc(5)
ZOMBIE = "Z"


@dataclass(frozen=True)
class ProcStat:
    """The fields of `/proc/<pid>/stat` this package needs."""

    pid: int
    state: str
    ppid: int
    pgid: int
    start_ticks: int  # start time in clock ticks since boot: tells a live pid from a reused one


def read_stat(pid: int) -> ProcStat | None:
    """`/proc/<pid>/stat` parsed, or None when the process does not exist."""
    try:
        with open(f"{PROC}/{pid}/stat", encoding="utf-8", errors="replace") as fh:
            stat = fh.read()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: parse after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    return ProcStat(
        pid=pid,
        state=fields[STATE],
        ppid=int(fields[PPID]),
        pgid=int(fields[PGRP]),
        start_ticks=int(fields[START_TIME]),
    )


def start_ticks(pid: int) -> int | None:
    """Start time of a live process in clock ticks; None when it is gone or a zombie."""
    stat = read_stat(pid)
    return None if stat is None or stat.state == ZOMBIE else stat.start_ticks


def is_alive(pid: int, expected_start_ticks: object = None) -> bool:
    """True when `pid` runs (and, if given, started at `expected_start_ticks`: not reused)."""
    ticks = start_ticks(pid)
    return ticks is not None and (expected_start_ticks is None or ticks == expected_start_ticks)


def live_processes() -> list[ProcStat]:
    """Every live (non-zombie) process visible in /proc."""
    found = []
    for entry in os.listdir(PROC):
        if entry.isdigit():
            stat = read_stat(int(entry))
            if stat is not None and stat.state != ZOMBIE:
                found.append(stat)
    return found


def descendants(root_pid: int) -> dict[int, int]:
    """Map pid -> pgid of every live process descended from `root_pid`."""
    table = live_processes()
    found: dict[int, int] = {}
    frontier = [root_pid]
    while frontier:
        parent = frontier.pop()
        for stat in table:
            if stat.ppid == parent and stat.pid not in found:
                found[stat.pid] = stat.pgid
                frontier.append(stat.pid)
    return found


def group_members(pgid: int) -> list[int]:
    """Live pids whose process group is `pgid`."""
    return [stat.pid for stat in live_processes() if stat.pgid == pgid]


def send_signal(pids: Iterable[int], groups: Iterable[int], sig: int) -> None:
    """Send `sig` to each process group, then each pid; ones already gone are skipped."""
    for pgid in set(groups):
        try:
            os.killpg(pgid, sig)
        except OSError:
            pass
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:
            pass
