"""RabbitMQ: a message's properties (its content header) encoded and decoded faster.

A Celery message carries about twenty headers, and py-amqp's general table codec spends more
time on them than on the rest of a publish, or of a delivery. These functions write and read
the same bytes (AMQP 0-9-1 field tables as RabbitMQ reads them: ``S`` long strings, ``I``/``L``
integers, ``t`` booleans, ``V`` void, ``A`` arrays, ``F`` tables) for the types task headers
hold, and hand anything else to py-amqp's codec, so that what either side sends, the other reads
as py-amqp would.
"""

from __future__ import annotations

from io import BytesIO
from struct import Struct
from typing import Any

from amqp.basic_message import Message
from amqp.serialization import _read_item, _write_item, dumps

_U32 = Struct(">I")
_I32 = Struct(">i")
_I64 = Struct(">q")
_U16 = Struct(">H")
_U64 = Struct(">Q")
_INT32 = 2**31
#: The basic properties, in the order of their flag bits (the highest first).
PROPERTIES: list[tuple[str, str]] = Message.PROPERTIES

#: Encoded keys (their length octet and UTF-8 bytes): header names repeat on every message.
_keys: dict[str, bytes] = {}
#: Beyond this many names, keys are encoded each time (headers named by data stay uncached).
KEYS_CACHED = 1024


def _key(name: str) -> bytes:
    encoded = _keys.get(name)
    if encoded is None:
        raw = name.encode("utf-8", "surrogatepass")
        encoded = bytes((len(raw),)) + raw
        if len(_keys) < KEYS_CACHED:
            _keys[name] = encoded
    return encoded


def _value(v: Any) -> bytes:
    cls = v.__class__
    if cls is str:
        raw: bytes = v.encode("utf-8", "surrogatepass")
        return b"S" + _U32.pack(len(raw)) + raw
    if v is None:
        return b"V"
    if cls is bool:
        return b"t\x01" if v else b"t\x00"
    if cls is int:
        return b"I" + _I32.pack(v) if -_INT32 < v < _INT32 else b"L" + _I64.pack(v)
    if cls is list or cls is tuple:
        data = b"".join([_value(item) for item in v])
        return b"A" + _U32.pack(len(data)) + data
    if cls is dict:
        return b"F" + table(v)
    out = BytesIO()  # bytes, floats, Decimal, datetime: as py-amqp writes them
    _write_item(v, out.write, [])
    return out.getvalue()


#: Each header name's last value, when a string, int, bool or None, with the encoded entry (key
#: and value): most headers (the task's name, the origin, the unset options) are the very same
#: object from one message to the next, and immutable.
_last: dict[str, tuple[Any, bytes]] = {}
_SCALARS = frozenset({str, int, bool, type(None)})


def table(d: dict[str, Any]) -> bytes:
    """``d`` as an AMQP field table: its length, then each key and value."""
    parts: list[bytes] = []
    add, last = parts.append, _last
    for k, v in d.items():
        seen = last.get(k)
        if seen is not None and seen[0] is v:
            add(seen[1])
            continue
        key = _keys.get(k) or _key(k)
        if v.__class__ is str:  # most headers: inline, as _value writes them
            raw = v.encode("utf-8", "surrogatepass")
            entry = key + b"S" + _U32.pack(len(raw)) + raw
        else:
            entry = key + (b"V" if v is None else _value(v))
        if v.__class__ in _SCALARS and (seen is not None or len(last) < KEYS_CACHED):
            last[k] = (v, entry)
        add(entry)
    data = b"".join(parts)
    return _U32.pack(len(data)) + data


#: The basic properties in the order of their flag bits, each with its kind and flag.
_FLAGGED = [(name, kind, 0x8000 >> bit) for bit, (name, kind) in enumerate(PROPERTIES)]


def encode(props: dict[str, Any]) -> bytes:
    """The basic properties ``props`` as a content header carries them: flags, then values."""
    flags = 0
    parts: list[bytes] = []
    add = parts.append
    for name, kind, flag in _FLAGGED:
        value = props.get(name)
        if value is None:
            continue
        flags |= flag
        if kind == "s":
            raw = value.encode("utf-8", "surrogatepass") if isinstance(value, str) else value
            add(bytes((len(raw),)))
            add(raw)
        elif kind == "o":
            add(bytes((value,)))
        elif kind == "F":
            add(table(value))
        else:
            add(dumps(kind, [value]))
    return _U16.pack(flags) + b"".join(parts)


def _text(raw: bytes) -> str | bytes:
    """A table's key or string value: text, or its bytes when they are not UTF-8 (py-amqp)."""
    try:
        return raw.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        return raw


def _read_value(buf: bytes, offset: int) -> tuple[Any, int]:
    kind = buf[offset]
    if kind == 0x53:  # S
        end = offset + 5 + _U32.unpack_from(buf, offset + 1)[0]
        return _text(buf[offset + 5:end]), end
    if kind == 0x49:  # I
        return _I32.unpack_from(buf, offset + 1)[0], offset + 5
    if kind == 0x56:  # V
        return None, offset + 1
    if kind == 0x74:  # t
        return bool(buf[offset + 1]), offset + 2
    if kind == 0x46:  # F
        return read_table(buf, offset + 1)
    if kind == 0x41:  # A
        end = offset + 5 + _U32.unpack_from(buf, offset + 1)[0]
        offset += 5
        items = []
        while offset < end:
            item, offset = _read_value(buf, offset)
            items.append(item)
        return items, offset
    value, offset = _read_item(buf, offset)  # the other types, as py-amqp reads them
    return value, offset


def read_table(buf: bytes, offset: int) -> tuple[dict[Any, Any], int]:
    """The field table at ``offset`` of ``buf``, and the offset after it."""
    end = offset + 4 + _U32.unpack_from(buf, offset)[0]
    offset += 4
    found = {}
    while offset < end:
        start = offset + 1
        offset = start + buf[offset]
        key = _text(buf[start:offset])
        found[key], offset = _read_value(buf, offset)
    return found, offset


def decode(buf: bytes, offset: int) -> dict[str, Any]:
    """The basic properties at ``offset`` of a content header's payload (``encode``'s reverse,
    and py-amqp's ``decode_properties_basic``)."""
    flags = _U16.unpack_from(buf, offset)[0]
    offset += 2
    props: dict[str, Any] = {}
    for bit, (name, kind) in enumerate(PROPERTIES):
        if not flags & (0x8000 >> bit):
            continue
        if kind == "s":
            start = offset + 1
            offset = start + buf[offset]
            props[name] = buf[start:offset].decode("utf-8", "surrogatepass")
        elif kind == "o":
            props[name] = buf[offset]
            offset += 1
        elif kind == "F":
            props[name], offset = read_table(buf, offset)
        else:  # "L": the timestamp
            props[name] = _U64.unpack_from(buf, offset)[0]
            offset += 8
    return props
