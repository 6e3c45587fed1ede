"""API: the ``@task`` decorator and the ``Task`` class users subclass for shared policy."""

from __future__ import annotations

import functools
import inspect
import random
import re
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Concatenate, Generic, Literal, ParamSpec, TypeVar, overload

from . import registry
from .exceptions import ImproperlyConfigured, MaxRetriesExceededError, Retry
from .execute import Request, current_request

if TYPE_CHECKING:
    from .canvas import Signature, chunks, xmap, xstarmap
    from .results import AsyncResult

P = ParamSpec("P")
R = TypeVar("R")

OPTIONS = frozenset({
    "name", "queue", "priority", "max_retries", "autoretry_for", "retry_backoff",
    "retry_backoff_max", "retry_jitter", "default_retry_delay", "time_limit", "soft_time_limit",
    "acks_late", "rate_limit", "expires", "results", "bind",
})
APPLY_OPTIONS = frozenset({
    "args", "kwargs", "countdown", "eta", "expires", "queue", "priority", "task_id", "headers",
    "link", "link_error",
})


_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_FORMAT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*([smh])\s*$")


def parse_rate(rate: str) -> float:
    """Tasks per second from ``"10/s"``, ``"100/m"`` or ``"1000/h"``."""
    found = _FORMAT.match(str(rate))
    if not found:
        raise ImproperlyConfigured(f"rate_limit {rate!r} is not of the form '10/s', '100/m' "
                                   f"or '1000/h'")
    return float(found.group(1)) / _UNITS[found.group(2)]


@functools.cache
def _sender() -> Callable[..., AsyncResult]:
    """``client.send``, imported on the first send (the client brings in the broker's
    libraries) and kept: an import statement costs as much on every call."""
    from .client import send

    return send


class Task(Generic[P, R]):
    """A function that can be run later by a worker; options live here as class attributes."""

    name: str = ""
    queue: str | None = None
    priority: int | None = None
    max_retries: int | None = 3
    autoretry_for: tuple[type[BaseException], ...] = ()
    retry_backoff: bool | float = False
    retry_backoff_max: float = 600
    retry_jitter: bool = True
    default_retry_delay: float = 180
    time_limit: float | None = None
    soft_time_limit: float | None = None
    acks_late: bool | None = None
    rate_limit: str | None = None
    expires: float | None = None
    results: str | None = None
    bind: bool = False

    def __init__(self, run: Callable[..., R], **options: Any) -> None:
        unknown = set(options) - OPTIONS
        if unknown:
            raise TypeError(f"Unknown task option(s) {sorted(unknown)} for {run.__qualname__}; "
                            f"known options: {', '.join(sorted(OPTIONS))}")
        self.run = run
        for key, value in options.items():
            setattr(self, key, value)
        if not self.name:
            self.name = f"{run.__module__}.{run.__qualname__}"
        if self.results not in (None, "errors", "all", "none"):
            raise ImproperlyConfigured(f"Task {self.name}: results={self.results!r} must be "
                                       f"'errors', 'all' or 'none'")
        if self.rate_limit:
            parse_rate(self.rate_limit)  # a typo fails here, not in a worker
        if not isinstance(self.autoretry_for, tuple):
            self.autoretry_for = tuple(self.autoretry_for)
        self.__doc__ = run.__doc__
        self.__name__ = run.__name__
        self.__qualname__ = run.__qualname__
        self.__module__ = run.__module__
        self.__wrapped__ = run

    def __repr__(self) -> str:
        return f"<task {self.name}>"

    def check_arguments(self, args: list[Any], kwargs: dict[str, Any]) -> None:
        """TypeError, naming the task's signature, unless it can be called with these."""
        signature = inspect.signature(self.run)
        if self.bind:  # the task itself comes first
            signature = signature.replace(parameters=list(signature.parameters.values())[1:])
        try:
            signature.bind(*args, **kwargs)
        except TypeError as exc:
            shown = ", ".join(str(p.replace(annotation=inspect.Parameter.empty))
                              for p in signature.parameters.values())
            raise TypeError(f"{self.name}({shown}) cannot take these arguments: {exc}") from None

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run the task inline in the caller, as a plain function call."""
        if self.bind:
            return self.run(self, *args, **kwargs)
        return self.run(*args, **kwargs)

    @property
    def request(self) -> Request:
        """The invocation being run in this context (a direct-call stand-in outside a worker)."""
        req = current_request()
        if req is not None and req.task == self.name:
            return req
        return Request(task=self.name)

    def delay(self, *args: P.args, **kwargs: P.kwargs) -> AsyncResult:
        """Send the task to a worker with these arguments."""
        return self.apply_async(args=args, kwargs=kwargs)

    def apply_async(self, args: tuple[Any, ...] | list[Any] | None = None,
                    kwargs: dict[str, Any] | None = None, **options: Any) -> AsyncResult:
        """Send the task with delivery options (countdown, eta, expires, queue, priority…)."""
        unknown = set(options) - APPLY_OPTIONS
        if unknown:
            raise TypeError(f"Unknown apply_async option(s) {sorted(unknown)} for {self.name}; "
                            f"known: {', '.join(sorted(APPLY_OPTIONS - {'args', 'kwargs'}))}")
        return _sender()(self, list(args or ()), dict(kwargs or {}), **options)

    def signature(self, args: tuple[Any, ...] | list[Any] = (),
                  kwargs: dict[str, Any] | None = None, **options: Any) -> Signature:
        """A call to make later, in a workflow: ``task.signature((2,), {"x": 1}, queue=…)``."""
        from .canvas import Signature

        return Signature(self, args, kwargs, options)

    def s(self, *args: Any, **kwargs: Any) -> Signature:
        """A call to make later; in a chain it gets the result before it as first argument."""
        return self.signature(args, kwargs)

    def si(self, *args: Any, **kwargs: Any) -> Signature:
        """A call to make later that ignores the results before it (immutable)."""
        sig = self.signature(args, kwargs)
        sig.set_immutable(True)
        return sig

    def map(self, items: Iterable[Any]) -> xmap:
        """One task calling this one on each item in turn; its result is the list."""
        from .canvas import xmap

        return xmap(self.s(), items)

    def starmap(self, items: Iterable[Iterable[Any]]) -> xstarmap:
        """One task calling this one with each item's arguments in turn: ``f(*item)``."""
        from .canvas import xstarmap

        return xstarmap(self.s(), items)

    def chunks(self, items: Iterable[Iterable[Any]], n: int) -> chunks:
        """``items`` cut into parts of ``n``, each part one ``starmap`` task, run as a group."""
        from .canvas import chunks

        return chunks(self.s(), items, n)

    def retry_countdown(self, retries: int) -> float:
        """Seconds to wait before retry number ``retries + 1``."""
        if not self.retry_backoff:
            return float(self.default_retry_delay)
        factor = 1.0 if self.retry_backoff is True else float(self.retry_backoff)
        countdown: float = min(float(self.retry_backoff_max), factor * (2 ** retries))
        if self.retry_jitter:
            countdown = random.uniform(0, countdown)
        return countdown

    def retry(self, exc: BaseException | None = None, countdown: float | None = None,
              max_retries: int | None = None) -> Retry:
        """Ask to run again later: raises ``Retry`` (or ``exc`` once retries are used up)."""
        req = self.request
        limit = self.max_retries if max_retries is None else max_retries
        if limit is not None and req.retries >= limit:
            if exc is not None:
                raise exc
            raise MaxRetriesExceededError(
                f"Task {self.name}[{req.id}] retried {req.retries} times, max_retries={limit}")
        when = self.retry_countdown(req.retries) if countdown is None else float(countdown)
        raise Retry(f"Retry in {when:.1f}s", exc=exc, when=when)

    def update_state(self, state: str, meta: Any = None, task_id: str | None = None) -> None:
        """Record a custom state (and progress ``meta``) for the running task."""
        from . import results

        results.store_state(task_id or self.request.id, self, state, meta)

    # Handlers a base class may override.
    def on_success(self, retval: Any, task_id: str, args: list[Any],
                   kwargs: dict[str, Any]) -> None:
        """Called in the worker after the task returned."""

    def on_failure(self, exc: BaseException, task_id: str, args: list[Any],
                   kwargs: dict[str, Any], einfo: str) -> None:
        """Called in the worker after the task failed for good."""

    def on_retry(self, exc: BaseException, task_id: str, args: list[Any],
                 kwargs: dict[str, Any], einfo: str) -> None:
        """Called in the worker when the task is to be retried."""


# For type checkers: a task's parameters (P) and return type (R) are its function's, without
# the first parameter when bind=True (the task itself, whatever type ``self`` is given).
@overload
def task(fn: Callable[P, R], /) -> Task[P, R]: ...
@overload
def task(*, bind: Literal[True], base: type[Task[Any, Any]] | None = None,
         **options: Any) -> Callable[[Callable[Concatenate[Any, P], R]], Task[P, R]]: ...
@overload
def task(*, bind: Literal[False] = False, base: type[Task[Any, Any]] | None = None,
         **options: Any) -> Callable[[Callable[P, R]], Task[P, R]]: ...
@overload
def task(*, bind: bool, base: type[Task[Any, Any]] | None = None,
         **options: Any) -> Callable[[Callable[..., R]], Task[..., R]]: ...


def task(fn: Callable[..., Any] | None = None, /, *, bind: bool | None = None,
         base: type[Task[Any, Any]] | None = None, **options: Any) -> Any:
    """Make a function a task: ``@task`` or ``@task(queue="high", max_retries=5, …)``."""
    if bind is not None:  # else the base class's ``bind`` attribute decides
        options["bind"] = bind
    cls = base or Task
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise TypeError(f"base= must be a subclass of django_tasks_q.Task, got {cls!r}")

    def decorate(func: Callable[..., Any]) -> Task[Any, Any]:
        made = cls(func, **options)
        registry.register(made)
        return made

    return decorate(fn) if fn is not None else decorate
