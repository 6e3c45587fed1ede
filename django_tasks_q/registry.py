"""Definitions: the tasks this process knows, by name."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .exceptions import TaskNotRegistered

if TYPE_CHECKING:
    from .task import Task

_tasks: dict[str, Task[Any, Any]] = {}


def register(task: Task[Any, Any]) -> None:
    """Record ``task`` under its name; a second, different function with that name is an error."""
    existing = _tasks.get(task.name)
    if existing is not None and existing.run is not task.run:
        module = getattr(existing.run, "__module__", "?")
        raise ValueError(f"Task name {task.name!r} is already taken by a function in {module}; "
                         f"give one of them an explicit name=")
    _tasks[task.name] = task


def get(name: str) -> Task[Any, Any]:
    """The task called ``name``; ``TaskNotRegistered`` says where tasks are looked for."""
    try:
        return _tasks[name]
    except KeyError:
        raise TaskNotRegistered(
            f"Task {name!r} is not registered in this process: define it with @task in the "
            f"tasks.py of an installed app (every app's tasks.py is imported at start-up)"
        ) from None


def names() -> list[str]:
    """All registered task names, sorted."""
    return sorted(_tasks)


def autodiscover() -> None:
    """Import ``tasks.py`` of every installed app."""
    from django.utils.module_loading import autodiscover_modules

    autodiscover_modules("tasks")
