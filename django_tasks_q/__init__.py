"""django-tasks-q: a distributed task queue that is a Django app."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .task import Task, task

if TYPE_CHECKING:
    from .canvas import Signature, chain, chord, group, signature
    from .client import send_task
    from .results import AsyncResult, GroupResult

__all__ = ["AsyncResult", "GroupResult", "Signature", "Task", "chain", "chord", "group",
           "send_task", "signature", "task"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # AsyncResult needs the models, which cannot load before Django's app registry is ready.
    if name in ("AsyncResult", "GroupResult"):
        from . import results

        return getattr(results, name)
    if name in ("Signature", "chain", "chord", "group", "signature"):
        from . import canvas

        return getattr(canvas, name)
    if name == "send_task":
        from .client import send_task

        return send_task
    raise AttributeError(f"module 'django_tasks_q' has no attribute {name!r}")
