"""API: what the workers' heartbeats say, how long the queues are, tasks per minute (the
dashboard's data, for the admin and the command line)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from django.db.models import Sum
from django.utils import timezone

from . import broker, conf, control
from .models import TaskCount, WorkerState

#: Seconds between a worker's heartbeats (each one writes its ``WorkerState`` row).
HEARTBEAT_INTERVAL = 5.0
#: A worker whose last heartbeat is older than this (three missed beats) is offline.
OFFLINE_AFTER = 3 * HEARTBEAT_INTERVAL
#: How long rows of offline workers and per-minute counts are kept (``prune``).
KEEP_HISTORY = timedelta(days=1)
#: Minutes the chart covers.
CHART_MINUTES = 60


@dataclass(frozen=True)
class WorkerInfo:
    """One worker as its last heartbeat described it, and whether it is online now."""

    hostname: str
    pid: int
    pool: str
    concurrency: int
    queues: list[str]
    active: int
    processed: int
    failed: int
    started_at: datetime
    last_heartbeat: datetime
    stopped_at: datetime | None
    online: bool
    seen_ago: float  # seconds since the last heartbeat


@dataclass(frozen=True)
class QueueLengths:
    """Messages ready in each queue, or why the broker could not say."""

    broker: str  # the broker URL without its password
    sizes: list[tuple[str, int | None]]  # (queue, ready messages); None: the queue does not exist
    error: str | None = None


@dataclass(frozen=True)
class Minute:
    """Tasks all workers finished in one minute, and of those, failed."""

    start: datetime
    processed: int
    failed: int


def is_online(last_heartbeat: datetime, stopped_at: datetime | None, now: datetime) -> bool:
    """Online: not stopped, and a heartbeat within the last OFFLINE_AFTER seconds."""
    return stopped_at is None and (now - last_heartbeat).total_seconds() <= OFFLINE_AFTER


def workers(now: datetime | None = None) -> list[WorkerInfo]:
    """Every worker with a row: online ones first, then by name."""
    now = now or timezone.now()
    found = [WorkerInfo(hostname=row.hostname, pid=row.pid, pool=row.pool,
                        concurrency=row.concurrency, queues=list(row.queues or []),
                        active=row.active, processed=row.processed, failed=row.failed,
                        started_at=row.started_at, last_heartbeat=row.last_heartbeat,
                        stopped_at=row.stopped_at,
                        online=is_online(row.last_heartbeat, row.stopped_at, now),
                        seen_ago=max(0.0, (now - row.last_heartbeat).total_seconds()))
             for row in WorkerState.objects.all()]
    return sorted(found, key=lambda w: (not w.online, w.hostname))


def queue_names(found: list[WorkerInfo]) -> list[str]:
    """The configured queues, then the other queues online workers consume."""
    names = list(conf.get().QUEUES)
    for worker in found:
        if worker.online:
            names += [name for name in worker.queues if name not in names]
    return names


def queue_lengths(names: list[str]) -> QueueLengths:
    """Ready messages in each of ``names``; an unreachable broker is reported in ``error``
    (without its password), not raised."""
    try:
        sizes = control.queue_lengths(names)
    except Exception as exc:  # noqa: BLE001 - whatever the broker did, the page still renders
        error = str(exc) if isinstance(exc, control.BrokerUnreachable) else (
            broker.masked(f"{type(exc).__name__}: {exc}"))
        return QueueLengths(broker.safe_url(), [], error)
    return QueueLengths(broker.safe_url(), list(sizes.items()))


def minute_start(moment: datetime) -> datetime:
    """The start of the minute ``moment`` falls in."""
    return moment.replace(second=0, microsecond=0)


def at(epoch: float) -> datetime:
    """An epoch timestamp as an aware datetime (how minutes are stored)."""
    return datetime.fromtimestamp(epoch, tz=UTC)


def per_minute(minutes: int = CHART_MINUTES, now: datetime | None = None) -> list[Minute]:
    """Tasks finished per minute over the last ``minutes`` (the current one last), summed
    over workers; a minute without any row is zeros."""
    last = minute_start(now or timezone.now())
    first = last - timedelta(minutes=minutes - 1)
    rows = (TaskCount.objects.filter(minute__gte=first, minute__lte=last).values("minute")
            .annotate(processed=Sum("processed"), failed=Sum("failed")).order_by())
    counts = {int(row["minute"].timestamp()): row for row in rows}
    series = []
    for i in range(minutes):
        start = first + timedelta(minutes=i)
        row = counts.get(int(start.timestamp()))
        series.append(Minute(start, int(row["processed"]) if row else 0,
                             int(row["failed"]) if row else 0))
    return series


def snapshot(now: datetime | None = None) -> dict[str, Any]:
    """Workers, queue lengths and the per-minute series, as plain JSON-ready data."""
    now = now or timezone.now()
    found = workers(now)
    queues = queue_lengths(queue_names(found))
    return {
        "now": now.isoformat(),
        "heartbeat_interval": HEARTBEAT_INTERVAL,
        "offline_after": OFFLINE_AFTER,
        "workers": [{
            "hostname": w.hostname, "pid": w.pid, "pool": w.pool, "concurrency": w.concurrency,
            "queues": w.queues, "active": w.active, "processed": w.processed,
            "failed": w.failed, "started_at": w.started_at.isoformat(),
            "last_heartbeat": w.last_heartbeat.isoformat(),
            "stopped_at": w.stopped_at.isoformat() if w.stopped_at else None,
            "online": w.online, "seen_ago": round(w.seen_ago, 1)} for w in found],
        "queues": {"broker": queues.broker, "error": queues.error,
                   "sizes": [{"name": name, "size": size,
                              "consumers": sum(w.online and name in w.queues for w in found)}
                             for name, size in queues.sizes]},
        "minutes": [{"minute": m.start.isoformat(), "processed": m.processed,
                     "failed": m.failed} for m in per_minute(now=now)],
    }


def prune(now: datetime | None = None) -> int:
    """Delete the rows of workers offline for longer than KEEP_HISTORY, and per-minute counts
    older than that; how many rows went."""
    cutoff = (now or timezone.now()) - KEEP_HISTORY
    workers_gone, _ = WorkerState.objects.filter(last_heartbeat__lt=cutoff).delete()
    counts_gone, _ = TaskCount.objects.filter(minute__lt=cutoff).delete()
    return workers_gone + counts_gone
