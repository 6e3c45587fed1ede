"""Fault injection: the crash-safe ledger of task starts and finishes, and what it adds up to.

Each record is one line, ``<kind> <task_id> <pid> <unix time>``, written by the process running
the task with a single ``os.write`` to a file opened with ``O_APPEND`` and then ``fsync``-ed: a
record is either wholly in the file or not at all, whoever is SIGKILLed, and records of several
processes never interleave. The file is named by the environment variable ``FAULT_LEDGER``.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ENV = "FAULT_LEDGER"
WORK = "tests.fault.ledgerapp.tasks.work"  # the task that writes to the ledger


def record(kind: str, task_id: str | None) -> None:
    """Append one ``kind`` record for ``task_id`` to this process's ledger (``$FAULT_LEDGER``)."""
    line = f"{kind} {task_id} {os.getpid()} {time.time():.6f}\n".encode()
    fd = os.open(os.environ[ENV], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Record:
    """One line of the ledger."""

    kind: str  # "start" or "finish"
    task_id: str
    pid: int
    at: float  # time.time() of the writer


def read(path: Path) -> list[Record]:
    """Every complete record of the ledger at ``path``, in file order."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    records = []
    for line in data.decode().splitlines(keepends=True):
        if not line.endswith("\n"):
            continue  # cannot happen with one write per record; never count half a line
        kind, task_id, pid, at = line.split()
        records.append(Record(kind, task_id, int(pid), float(at)))
    return records


def finished(records: list[Record]) -> set[str]:
    """Ids with at least one finish record."""
    return {r.task_id for r in records if r.kind == "finish"}


def running(records: list[Record]) -> list[Record]:
    """Start records of runs that have not finished: the last start of each pid, if unfinished."""
    last: dict[int, Record] = {}
    for r in records:
        if r.kind == "start":
            last[r.pid] = r
        elif last.get(r.pid) is not None and last[r.pid].task_id == r.task_id:
            del last[r.pid]
    return list(last.values())


@dataclass(frozen=True)
class Tally:
    """What a scenario cost: one row of the report."""

    scenario: str
    broker: str
    sent: int
    finished: int
    lost: int
    dup_starts: int  # ids started more than once
    dup_finishes: int  # ids finished more than once
    recovery: float | None  # seconds from the fault to the last finish it waited for
    unexpected: int = 0  # ledger ids that were never sent (must be 0)
    note: str = ""  # what went wrong, when the scenario could not settle


def tally(scenario: str, broker: str, sent: list[str], records: list[Record],
          fault_at: float | None = None, until: set[str] | None = None,
          note: str = "") -> Tally:
    """Count ``records`` against the ``sent`` ids.

    The recovery time runs from ``fault_at`` to the last finish of ``until`` (all sent ids when
    not given); ``None`` when there was no fault time or nothing finished after it.
    """
    ids = set(sent)
    starts = Counter(r.task_id for r in records if r.kind == "start")
    finishes = Counter(r.task_id for r in records if r.kind == "finish")
    done = ids & set(finishes)
    recovery = None
    if fault_at is not None:
        wanted = ids if until is None else until
        last = [r.at for r in records if r.kind == "finish" and r.task_id in wanted
                and r.at >= fault_at]
        if last and wanted <= done:
            recovery = max(last) - fault_at
    return Tally(
        scenario=scenario, broker=broker, sent=len(ids), finished=len(done),
        lost=len(ids - done),
        dup_starts=sum(1 for i in ids if starts[i] > 1),
        dup_finishes=sum(1 for i in ids if finishes[i] > 1),
        recovery=recovery,
        unexpected=len((set(starts) | set(finishes)) - ids),
        note=note,
    )
