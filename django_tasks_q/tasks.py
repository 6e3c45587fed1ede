"""Surface: the tasks this app brings, found by the registry like every app's ``tasks.py``."""

from __future__ import annotations

from . import monitor, results
from .task import task


@task(name="django_tasks_q.prune_results", results="none")
def prune_results() -> int:
    """Delete task results older than ``RESULT_EXPIRES``, in batches; how many went. The
    dashboard's history goes too: workers offline for a day, per-minute counts a day old.

    Sent every hour by taskbeat (the built-in schedule ``django_tasks_q.prune-results``)."""
    monitor.prune()
    return results.prune()
