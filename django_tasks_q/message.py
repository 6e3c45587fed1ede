"""Message: Celery protocol v2 task messages, built for publishing and parsed on receipt."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta
from operator import attrgetter
from typing import Any, ClassVar

CONTENT_TYPE = "application/json"
CONTENT_ENCODING = "utf-8"
EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
_ORIGIN = f"gen{os.getpid()}@{socket.gethostname()}"


class MalformedMessage(ValueError):
    """A message that is not a Celery protocol v2 task message."""


class ByPosition:
    """For dataclasses that cross the prefork pool's pipes with every task: pickled as the
    class and the values of its ``__init__`` fields in order, about half the bytes and time of
    pickle's default, which names every field."""

    __slots__ = ()
    _values: ClassVar[dict[type, Callable[[Any], tuple[Any, ...]]]] = {}  # per class

    def __reduce__(self) -> tuple[type, tuple[Any, ...]]:
        cls = type(self)
        values = ByPosition._values.get(cls)
        if values is None:
            values = ByPosition._values[cls] = attrgetter(
                *(f.name for f in fields(cls) if f.init))  # type: ignore[arg-type]
        return cls, values(self)


@dataclass
class TaskMessage(ByPosition):
    """One task invocation as carried by the broker."""

    id: str
    name: str
    args: list[Any]
    kwargs: dict[str, Any]
    retries: int = 0
    eta: datetime | None = None
    expires: datetime | None = None
    time_limit: float | None = None
    soft_time_limit: float | None = None
    root_id: str | None = None
    parent_id: str | None = None
    group: str | None = None
    group_index: int | None = None
    ignore_result: bool = False
    queue: str = ""
    priority: int | None = None
    headers: dict[str, Any] = field(default_factory=dict)
    embed: dict[str, Any] = field(default_factory=lambda: dict(EMBED))


def new_id() -> str:
    """A fresh task id: a random UUID4 string, as Celery makes them (``str(uuid.uuid4())``,
    without building a ``UUID`` object on the way)."""
    raw = bytearray(os.urandom(16))
    raw[6] = raw[6] & 0x0F | 0x40  # version 4
    raw[8] = raw[8] & 0x3F | 0x80  # RFC 4122 variant
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _refuse(value: Any) -> Any:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _compact_encoder() -> Callable[[Any], str]:
    # json.dumps() builds its C encoder again on every call; on the publish path that is a
    # good part of the cost of a small message. One, kept, does the same work.
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # an interpreter without the C accelerator
        return lambda value: json.dumps(value, separators=(",", ":"), default=_refuse)
    # No cycle bookkeeping (it would be shared between threads): a cycle ends in the
    # interpreter's recursion limit instead, reported as json.dumps reports it.
    encode = make(None, _refuse, json.encoder.encode_basestring_ascii, None, ":", ",",
                  False, False, True)

    def dumps(value: Any) -> str:
        try:
            return "".join(encode(value, 0))
        except RecursionError:
            raise ValueError("Circular reference detected") from None

    return dumps


#: ``json.dumps(value, separators=(",", ":"))``, faster; anything JSON cannot carry is a
#: ``TypeError`` (a cycle is a ``ValueError``).
to_json = _compact_encoder()


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.isoformat()


def parse_time(value: Any) -> datetime | None:
    """An aware datetime from an ISO string (naive means UTC) or seconds from now."""
    if value in (None, ""):
        return None
    if isinstance(value, datetime):
        parsed = value
    elif isinstance(value, (int, float)):
        return datetime.now(UTC) + timedelta(seconds=value)
    else:
        try:
            parsed = datetime.fromisoformat(str(value))
        except ValueError as exc:
            raise MalformedMessage(f"bad timestamp {value!r}") from exc
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _index(value: Any) -> int | None:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError) as exc:
        raise MalformedMessage(f"bad group_index {value!r}") from exc


def encode(msg: TaskMessage, body_json: str | None = None) -> tuple[str, dict[str, Any],
                                                                    dict[str, Any]]:
    """(body, headers, properties) for kombu; ``body_json`` reuses an already-encoded body."""
    headers = {
        "lang": "py",
        "task": msg.name,
        "id": msg.id,
        "shadow": None,
        "eta": _iso(msg.eta),
        "expires": _iso(msg.expires),
        "group": msg.group,
        "group_index": msg.group_index,
        "retries": msg.retries,
        "timelimit": [msg.time_limit, msg.soft_time_limit],
        "root_id": msg.root_id or msg.id,
        "parent_id": msg.parent_id,
        "argsrepr": repr(msg.args),
        "kwargsrepr": repr(msg.kwargs),
        "origin": _ORIGIN,
        "ignore_result": msg.ignore_result,
        **msg.headers,
    }
    properties: dict[str, Any] = {"correlation_id": msg.id, "reply_to": ""}
    if body_json is None:
        body_json = to_json([msg.args, msg.kwargs, msg.embed])
    return body_json, headers, properties


_KNOWN_HEADERS = frozenset({
    "lang", "task", "id", "shadow", "eta", "expires", "group", "group_index", "retries",
    "timelimit", "root_id", "parent_id", "argsrepr", "kwargsrepr", "origin", "ignore_result",
})


def decode(headers: dict[str, Any] | None, body: Any, queue: str = "",
           priority: int | None = None) -> TaskMessage:
    """Parse a received message whose body kombu has already deserialised."""
    if not headers or "task" not in headers or "id" not in headers:
        raise MalformedMessage("not a protocol v2 task message: headers 'task' and 'id' missing")
    if not (isinstance(body, (list, tuple)) and len(body) == 3):
        raise MalformedMessage("body is not [args, kwargs, embed]")
    args, kwargs, embed = body
    if not isinstance(args, (list, tuple)) or not isinstance(kwargs, dict):
        raise MalformedMessage("body args must be a list and kwargs a dict")
    hard, soft = (list(headers.get("timelimit") or []) + [None, None])[:2]
    return TaskMessage(
        id=str(headers["id"]),
        name=str(headers["task"]),
        args=list(args),
        kwargs=kwargs,
        retries=int(headers.get("retries") or 0),
        eta=parse_time(headers.get("eta")),
        expires=parse_time(headers.get("expires")),
        time_limit=hard,
        soft_time_limit=soft,
        root_id=headers.get("root_id"),
        parent_id=headers.get("parent_id"),
        group=headers.get("group"),
        group_index=_index(headers.get("group_index")),
        ignore_result=bool(headers.get("ignore_result")),
        queue=queue,
        priority=priority,
        headers={k: v for k, v in headers.items() if k not in _KNOWN_HEADERS},
        embed={**EMBED, **embed} if isinstance(embed, dict) else dict(EMBED),
    )
