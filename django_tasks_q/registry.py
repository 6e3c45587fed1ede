"""Definitions: the tasks this process knows, by name."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
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


#: Header marking a message as a ``django.tasks`` task (its value: the backend's alias).
DJANGO_TASK_HEADER = "django_task_backend"


def get(name: str, headers: Mapping[str, Any] | None = None) -> Task[Any, Any]:
    """The task called ``name``; ``TaskNotRegistered`` says where tasks are looked for.

    A message marked as a ``django.tasks`` task (``headers``) may name a module not imported
    yet: its module is imported, which registers the task as it is defined.
    """
    try:
        return _tasks[name]
    except KeyError:
        pass
    if is_django_task(headers):
        return _import_django_task(name)
    raise TaskNotRegistered(
        f"Task {name!r} is not registered in this process: define it with @task in the "
        f"tasks.py of an installed app (every app's tasks.py is imported at start-up)")


def is_django_task(headers: Mapping[str, Any] | None) -> bool:
    """Whether a message with ``headers`` is marked as a ``django.tasks`` task."""
    return bool(headers and headers.get(DJANGO_TASK_HEADER))


def _import_django_task(name: str) -> Task[Any, Any]:
    from django.apps import apps

    module_name, _, attr = name.rpartition(".")
    # Only the modules of installed apps: a message must not make a worker import anything.
    if not module_name or apps.get_containing_app_config(module_name) is None:
        raise TaskNotRegistered(
            f"django.tasks task {name!r} is not registered in this worker, and its module is "
            f"not part of an installed app, so it is not imported; define it in an installed "
            f"app (its tasks.py is imported at start-up)")
    try:
        found = getattr(importlib.import_module(module_name), attr, None)
    except Exception as exc:  # noqa: BLE001 - whatever the import raised, the message fails
        raise TaskNotRegistered(f"django.tasks task {name!r}: importing {module_name} failed "
                                f"in this worker: {type(exc).__name__}: {exc}") from exc
    if name in _tasks:  # defined by that import
        return _tasks[name]
    if found is None:
        raise TaskNotRegistered(f"django.tasks task {name!r}: {module_name} has no {attr!r}")
    backend = getattr(found, "backend", None)
    if callable(getattr(found, "enqueue", None)) and isinstance(backend, str):
        raise TaskNotRegistered(
            f"{name!r} is a django.tasks Task of backend {backend!r}, which is not a "
            f"django_tasks_q.backend.TasksQBackend in this worker's TASKS setting")
    raise TaskNotRegistered(f"{name!r} is a {type(found).__name__}, not a django.tasks Task; "
                            f"decorate it with django.tasks.task")


def find(name: str) -> Task[Any, Any] | None:
    """The task called ``name`` in this process, or None (it may live in another service)."""
    return _tasks.get(name)


def names() -> list[str]:
    """All registered task names, sorted."""
    return sorted(_tasks)


def autodiscover() -> None:
    """Import ``tasks.py`` of every installed app."""
    from django.utils.module_loading import autodiscover_modules

    autodiscover_modules("tasks")
