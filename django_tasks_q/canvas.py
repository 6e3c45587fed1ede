"""API: workflows (signatures, chain, group, chord, chunks, map) as Celery's canvas builds them."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, ClassVar

from . import client, message, registry

if TYPE_CHECKING:
    from .results import AsyncResult, GroupResult
    from .task import Task

#: What ``apply_async`` takes for a task in a workflow (Celery's names).
OPTIONS = frozenset({
    "countdown", "eta", "expires", "queue", "priority", "task_id", "headers", "link",
    "link_error",
})
#: What a workflow adds to its members' options (set when it is frozen).
PLACED = ("group_id", "group_index", "chord", "chain", "root_id", "parent_id")
#: The options ``client.build`` takes as they are (a step's ``chain`` is joined to the rest).
_BUILT = OPTIONS | (set(PLACED) - {"chain"})


class Signature(dict[str, Any]):
    """A task call to make later: its name, arguments and options, as Celery's (a plain dict
    that travels in messages)."""

    kind: ClassVar[str | None] = None

    def __init__(self, task: str | Task[Any, Any] | Mapping[str, Any],
                 args: Iterable[Any] = (), kwargs: Mapping[str, Any] | None = None,
                 options: Mapping[str, Any] | None = None, immutable: bool = False,
                 **more_options: Any) -> None:
        if isinstance(task, Mapping):  # as received, or as Celery built it
            super().__init__(task)
            self.setdefault("args", [])
            self.setdefault("kwargs", {})
            self.setdefault("options", {})
            self.setdefault("immutable", False)
            self.setdefault("subtask_type", self.kind)
            return
        name = task if isinstance(task, str) else task.name
        options = _checked(name, {**(options or {}), **more_options})
        args = list(args)
        kwargs = dict(kwargs or {})
        client.check_json(name, args, kwargs)
        super().__init__(task=name, args=args, kwargs=kwargs, options=options,
                         subtask_type=self.kind, immutable=immutable, chord_size=None)

    # Celery's attribute names.
    @property
    def name(self) -> str:
        """The task's name."""
        return str(self["task"])

    @property
    def args(self) -> list[Any]:
        """Positional arguments (those given when applied come first, unless immutable)."""
        return list(self["args"])

    @property
    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments."""
        return dict(self["kwargs"])

    @property
    def options(self) -> dict[str, Any]:
        """Options for ``apply_async`` (queue, countdown, link…), changed in place."""
        found: dict[str, Any] = self["options"]
        return found

    @property
    def immutable(self) -> bool:
        """True when the results of tasks before it are not passed in (``task.si()``)."""
        return bool(self.get("immutable"))

    @property
    def id(self) -> str | None:
        """The task id, once frozen (or given as ``task_id``)."""
        return self.options.get("task_id")

    @property
    def type(self) -> Task[Any, Any]:
        """The task this signature calls; ``TaskNotRegistered`` if this process lacks it."""
        return registry.get(self.name)

    def __repr__(self) -> str:
        shown = [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()]
        return f"{self.name}{'!' if self.immutable else ''}({', '.join(shown)})"

    def clone(self, args: Iterable[Any] = (), kwargs: Mapping[str, Any] | None = None,
              **options: Any) -> Signature:
        """A copy, taking ``args`` and ``kwargs`` as given when applied, and more options."""
        new = signature(copy.deepcopy(dict(self)))
        if args or kwargs:
            new.take(list(args), dict(kwargs or {}))
        new.options.update(options)
        return new

    def take(self, args: list[Any], kwargs: dict[str, Any]) -> None:
        """Take arguments given when applied: before its own, unless immutable."""
        if not self.immutable:
            self["args"] = [*args, *self.args]
            self["kwargs"] = {**self.kwargs, **kwargs}

    def set(self, **options: Any) -> Signature:
        """Set options (queue, countdown, priority…) in place; returns the signature."""
        self.options.update(_checked(self.name, options))
        return self

    def set_immutable(self, immutable: bool) -> None:
        """Make the signature take (False) or ignore (True) the results of tasks before it."""
        self["immutable"] = immutable

    def link(self, callback: Signature) -> Signature:
        """Send ``callback`` with this task's return value once it succeeded; returns it."""
        _add_links(self, "link", callback)
        return callback

    def link_error(self, errback: Signature) -> Signature:
        """Run ``errback`` once this task failed for good; returns it."""
        _add_links(self, "link_error", errback)
        return errback

    def on_error(self, errback: Signature) -> Signature:
        """Run ``errback`` once this task failed for good; returns this signature."""
        self.link_error(errback)
        return self

    # Celery's meaning of ``|`` (a chain), not dict's (a merge).
    def __or__(self, other: Signature) -> chain:  # type: ignore[override]
        if not isinstance(other, Signature):
            return NotImplemented
        return chain(self, other)

    def freeze(self) -> AsyncResult | GroupResult:
        """Give the call its task id now; returns the result handle it will have."""
        from .results import AsyncResult

        task_id = str(self.options.setdefault("task_id", message.new_id()))
        return AsyncResult(task_id, task=registry.find(self.name),
                           kept=bool(self.options.get("group_id")))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the task inline, in this process."""
        merged = self.clone(args, kwargs)
        return self.type(*merged.args, **merged.kwargs)

    def delay(self, *args: Any, **kwargs: Any) -> Any:
        """Send it, with these arguments before its own."""
        return self.apply_async(args, kwargs)

    def apply_async(self, args: Iterable[Any] = (), kwargs: Mapping[str, Any] | None = None,
                    **options: Any) -> Any:
        """Send it (after the current transaction commits, as tasks are); returns its result
        handle: an ``AsyncResult``, or a ``GroupResult`` for a group."""
        sig = self.clone(args, kwargs, **_checked(self.name, options))
        handle = sig.freeze()
        if not client.runs_eagerly():
            client.dispatch(sig.messages())
            return handle
        with client.eager_outcomes() as seen:
            client.dispatch(sig.messages())
        return _eager(handle, seen)

    def messages(self, chain_rest: list[dict[str, Any]] | None = None,
                 lineage: Mapping[str, str | None] | None = None) -> list[client.Outgoing]:
        """The messages that start this (frozen) call; ``chain_rest``: the steps after it,
        last first (Celery's ``chain`` embed)."""
        opts = _message_options(self.options)
        for key, value in (lineage or {}).items():
            opts.setdefault(key, value)
        rest = list(chain_rest or []) + list(self.options.get("chain") or [])
        return [client.build(self.name, registry.find(self.name), self.args, self.kwargs,
                             chain=rest or None, **opts)]


def _own(options: Mapping[str, Any]) -> dict[str, Any]:
    """A workflow's options that its tasks take (queue, countdown…): not its id, links or
    placement."""
    return {k: v for k, v in options.items()
            if k not in ("task_id", "link", "link_error", *PLACED)}


def _received(given: tuple[Any, ...], kind: str | None) -> bool:
    """True when ``given`` is one plain dict of this kind: the form it travels in."""
    return (len(given) == 1 and isinstance(given[0], Mapping)
            and not isinstance(given[0], Signature) and given[0].get("subtask_type") == kind)


def _add_links(sig: Signature, key: str, value: Any) -> None:
    """Add ``value`` (a signature or a list of them) to ``sig``'s ``link`` or ``link_error``."""
    if not value:
        return
    given = sig.options.get(key) or []
    known = [given] if isinstance(given, Mapping) else list(given)
    more = [value] if isinstance(value, Mapping) else list(value)
    sig.options[key] = [*known, *(dict(v) for v in more)]


def _checked(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` if known, with times as they travel (ISO text, seconds)."""
    unknown = set(options) - OPTIONS - set(PLACED)
    if unknown:
        raise TypeError(f"Unknown option(s) {sorted(unknown)} for {name}; known: "
                        f"{', '.join(sorted(OPTIONS))}")
    checked = dict(options)
    for key, value in options.items():
        if isinstance(value, datetime):
            if value.tzinfo is None:
                raise ValueError(f"{key} must be timezone-aware (django.utils.timezone.now() "
                                 f"+ …), not {value!r}")
            checked[key] = value.isoformat()
        elif isinstance(value, timedelta):
            checked[key] = value.total_seconds()
    return checked


def _message_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """``client.build`` arguments from a signature's options (as sent by either side)."""
    opts = {key: value for key, value in options.items()
            if key in _BUILT and value is not None}
    for key in ("eta", "expires"):  # as text once they travelled
        if isinstance(opts.get(key), str):
            opts[key] = message.parse_time(opts[key])
    return opts


class chain(Signature):  # noqa: N801 - Celery's name
    """Tasks run one after the other, each given the result of the one before."""

    kind = "chain"

    def __init__(self, *tasks: Any, **options: Any) -> None:
        if _received(tasks, self.kind):
            super().__init__(tasks[0])
            self["kwargs"]["tasks"] = [signature(t) for t in self["kwargs"]["tasks"]]
            return
        if len(tasks) == 1 and not isinstance(tasks[0], Signature):
            tasks = tuple(tasks[0])  # chain(iterable)
        steps: list[Signature] = []
        for step in map(signature, tasks):
            steps.extend(step.tasks if isinstance(step, chain) and not step.options
                         else [step])
        # A group followed by a task is a chord: the task gets the group's results.
        merged: list[Signature] = []
        for step in steps:
            if merged and isinstance(merged[-1], group):
                merged[-1] = chord(merged[-1], step)
            else:
                merged.append(step)
        super().__init__("celery.chain", (), {"tasks": merged}, options)

    @property
    def tasks(self) -> list[Signature]:
        """The steps, in order."""
        return [signature(t) for t in self["kwargs"]["tasks"]]

    def __or__(self, other: Signature) -> chain:  # type: ignore[override]
        return chain(*self.tasks, other)

    def take(self, args: list[Any], kwargs: dict[str, Any]) -> None:
        steps = self.tasks
        if steps:  # the first step takes them
            steps[0] = steps[0].clone(args, kwargs)
        self["kwargs"]["tasks"] = steps

    def freeze(self) -> AsyncResult | GroupResult:
        steps, parent = self.tasks, None
        for step in steps:
            handle = step.freeze()
            if parent is not None:  # a chord's handle keeps its header as parent
                handle.parent = parent
            parent = handle
        self["kwargs"]["tasks"] = steps
        if parent is None:
            raise ValueError("an empty chain has nothing to run")
        return parent

    def messages(self, chain_rest: list[dict[str, Any]] | None = None,
                 lineage: Mapping[str, str | None] | None = None) -> list[client.Outgoing]:
        steps = self.tasks
        # As Celery does: a chain's link follows its last step, its link_error any step.
        for step in steps[-1:]:
            _add_links(step, "link", self.options.get("link"))
        for step in steps:
            _add_links(step, "link_error", self.options.get("link_error"))
        first, *rest = steps
        first.options.update(_own(self.options))  # the chain's queue, countdown… start it
        # Popped from the end: the next step comes last.
        after = [*(chain_rest or []), *(dict(s) for s in reversed(rest))]
        return first.messages(after, lineage)


class group(Signature):  # noqa: N801 - Celery's name
    """Tasks run at the same time; ``GroupResult`` collects their results."""

    kind = "group"

    def __init__(self, *tasks: Any, **options: Any) -> None:
        if _received(tasks, self.kind):
            super().__init__(tasks[0])
            return
        if len(tasks) == 1 and not isinstance(tasks[0], Signature):
            tasks = tuple(tasks[0])  # group(generator)
        members: list[Signature] = []
        for member in map(signature, tasks):  # a group in a group is its members
            members.extend(member.tasks if isinstance(member, group) and not member.options
                           else [member])
        super().__init__("celery.group", (), {"tasks": members}, options)

    @property
    def tasks(self) -> list[Signature]:
        """The members, in order."""
        return [signature(t) for t in self["kwargs"]["tasks"]]

    def take(self, args: list[Any], kwargs: dict[str, Any]) -> None:
        self["kwargs"]["tasks"] = [t.clone(args, kwargs) for t in self.tasks]

    def freeze(self) -> GroupResult:
        from .results import GroupResult

        group_id = self.options.setdefault("task_id", message.new_id())
        members = self.tasks
        handles: list[AsyncResult] = []
        for index, member in enumerate(members):
            member.options.update(group_id=group_id, group_index=index)
            handle = member.freeze()
            if isinstance(handle, GroupResult):  # a group with options of its own
                raise TypeError(f"group member {member!r}: a group in a group cannot be "
                                f"waited for as one result; list its tasks instead")
            handles.append(handle)
        self["kwargs"]["tasks"] = members
        return GroupResult(group_id, handles)

    def messages(self, chain_rest: list[dict[str, Any]] | None = None,
                 lineage: Mapping[str, str | None] | None = None) -> list[client.Outgoing]:
        if chain_rest:  # steps after a group: the next one is a chord's body
            body = signature(chain_rest[-1])
            body.options["chain"] = [*chain_rest[:-1], *(body.options.get("chain") or [])]
            whole = chord(self, body)
            whole.freeze()
            return whole.messages(None, lineage)
        from . import workflow

        members = self.tasks
        workflow.record(str(self.id), [str(m.id) for m in members], dict(self))
        for member in members:  # the group's own options (queue, countdown…) win, as in Celery
            member.options.update(_own(self.options))
        return [out for m in members for out in m.messages(None, lineage)]


class chord(Signature):  # noqa: N801 - Celery's name
    """A group (the header) whose results, once every member finished, go to one task (the
    body) as a list, in the header's order."""

    kind = "chord"

    def __init__(self, header: Any, body: Signature | Mapping[str, Any] | None = None,
                 **options: Any) -> None:
        if body is None and _received((header,), self.kind):
            super().__init__(header)
            return
        if body is None:
            raise TypeError("chord(header, body) needs a body: the task that gets the "
                            "header's results")
        head = header if isinstance(header, group) else group(header)
        super().__init__("celery.chord", (),
                         {"header": head, "body": signature(body), "kwargs": {}}, options)

    @property
    def header(self) -> group:
        """The tasks run at the same time."""
        header = signature(self["kwargs"]["header"])
        return header if isinstance(header, group) else group(header)

    @property
    def body(self) -> Signature:
        """The task run with the header's results."""
        return signature(self["kwargs"]["body"])

    def take(self, args: list[Any], kwargs: dict[str, Any]) -> None:
        self["kwargs"]["header"] = self.header.clone(args, kwargs)

    def freeze(self) -> AsyncResult | GroupResult:
        header = self.header
        # Its own id: a chord inside a group has that group's id as ``group_id``.
        header.options.setdefault("task_id", message.new_id())
        heads = header.freeze()
        body = self.body
        handle = body.freeze()
        handle.parent = heads
        self["kwargs"]["header"], self["kwargs"]["body"] = header, body
        self.options.setdefault("task_id", body.id)
        return handle

    def messages(self, chain_rest: list[dict[str, Any]] | None = None,
                 lineage: Mapping[str, str | None] | None = None) -> list[client.Outgoing]:
        from . import workflow

        header, body = self.header, self.body
        if chain_rest:  # the steps after a chord follow its body
            body.options["chain"] = [*chain_rest, *(body.options.get("chain") or [])]
        for key in ("link", "link_error"):  # a chord's callbacks are its body's
            _add_links(body, key, self.options.get(key))
        members = header.tasks
        for member in members:  # the chord's own options (queue, countdown…) go to its header
            member.options.update(_own(self.options))
        if not members:  # nothing to wait for
            return body.clone(([],)).messages(None, lineage)
        body["chord_size"] = len(members)
        workflow.record(str(header.id), [str(m.id) for m in members], dict(self),
                      body=dict(body))
        out: list[client.Outgoing] = []
        for member in members:
            member.options["chord"] = dict(body)
            out += member.messages(None, lineage)
        return out


class xmap(Signature):  # noqa: N801 - Celery's name
    """One task that calls ``task`` on each item in turn (``task.map(items)``)."""

    def __init__(self, task: Signature | Mapping[str, Any], it: Iterable[Any] | None = None,
                 **options: Any) -> None:
        if it is None:
            super().__init__(task)
            return
        super().__init__(self._builtin, (), {"task": dict(task), "it": list(it)}, options)

    _builtin = "celery.map"


class xstarmap(xmap):  # noqa: N801 - Celery's name
    """One task that calls ``task(*args)`` for each ``args`` in turn (``task.starmap(items)``)."""

    _builtin = "celery.starmap"


class chunks(Signature):  # noqa: N801 - Celery's name
    """``items`` cut into parts of ``n``, each part a ``starmap`` task, all run as a group."""

    def __init__(self, task: Signature | Mapping[str, Any], it: Iterable[Any] | None = None,
                 n: int | None = None, **options: Any) -> None:
        if it is None:
            super().__init__(task)
            return
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"chunks(): n is the number of items per task, a positive int, "
                             f"not {n!r}")
        super().__init__("celery.chunks", (), {"task": dict(task), "it": list(it), "n": n},
                         options)

    def group(self) -> group:
        """The group of ``starmap`` tasks it runs as."""
        task, items, n = signature(self.kwargs["task"]), self.kwargs["it"], self.kwargs["n"]
        parts = [list(itertools.islice(items, i, i + n)) for i in range(0, len(items), n)]
        return group(*(xstarmap(task, part) for part in parts), **self.options)

    def apply_async(self, args: Iterable[Any] = (), kwargs: Mapping[str, Any] | None = None,
                    **options: Any) -> Any:
        return self.group().apply_async(args, kwargs, **options)


_KINDS: dict[str | None, type[Signature]] = {"chain": chain, "group": group, "chord": chord}
BUILTINS: dict[str, type[Signature]] = {"celery.map": xmap, "celery.starmap": xstarmap,
                                          "celery.chunks": chunks}


def signature(value: Signature | Mapping[str, Any] | str, *args: Any,
              **kwargs: Any) -> Signature:
    """A signature: ``signature("tasks.add", args=(2,))``, or one from its dict form (as it
    travels in messages) with the right class for chains, groups and chords."""
    if isinstance(value, str):
        return Signature(value, *args, **kwargs)
    if isinstance(value, Signature) and not (args or kwargs):
        return value
    if not isinstance(value, Mapping) or "task" not in value:
        raise TypeError(f"not a signature: {value!r} (make one with task.s(...))")
    cls = _KINDS.get(value.get("subtask_type")) or BUILTINS.get(value["task"]) or Signature
    return cls(value)


def _eager(handle: Any, seen: Mapping[str, Any]) -> Any:
    """``handle`` with the outcomes of tasks just run inline (``EAGER``) in its place."""
    from .results import GroupResult

    if isinstance(handle, GroupResult):
        return GroupResult(handle.id, [_eager(r, seen) for r in handle.results])
    found = seen.get(handle.id, handle)
    if handle.parent is not None:
        found.parent = _eager(handle.parent, seen)
    return found


# Celery's built-in tasks that workflows send: registered in every worker by the app.
def _run_map(task: dict[str, Any], it: list[Any]) -> list[Any]:
    run = signature(task).type
    return [run(item) for item in it]


def _run_starmap(task: dict[str, Any], it: list[Any]) -> list[Any]:
    run = signature(task).type
    return [run(*item) for item in it]


def register_builtins() -> None:
    """Register ``celery.map`` and ``celery.starmap`` (what ``map``, ``starmap`` and
    ``chunks`` send), keeping their results: they are what the caller waits for."""
    from .task import Task

    for name, run in (("celery.map", _run_map), ("celery.starmap", _run_starmap)):
        if registry.find(name) is None:
            registry.register(Task(run, name=name, results="all"))
