"""Surface: the tasks this app brings, found by the registry like every app's ``tasks.py``."""

from __future__ import annotations

from . import results
from .task import task


@task(name="django_tasks_q.prune_results", results="none")
def prune_results() -> int:
    """Delete task results older than ``RESULT_EXPIRES``, in batches; how many went.

    Sent every hour by taskbeat (the built-in schedule ``django_tasks_q.prune-results``)."""
    return results.prune()
