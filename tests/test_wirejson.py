"""JSON from the wire: the same values as kombu's decoding, in fewer steps."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from kombu import Connection
from kombu.exceptions import ContentDisallowed, DecodeError
from kombu.utils import json as kombu_json

from django_tasks_q import broker
from django_tasks_q.transport import wirejson

VALUES: list[Any] = [
    {"a": [1, 2.5, None, True, "é"], "b": {"c": {}}},
    [[1, {"when": datetime(2026, 11, 24, 1, 2, 3, tzinfo=UTC)}],
     {"amount": Decimal("1.10"), "id": uuid.UUID(int=7)}, {}],  # kombu's typed values
    {"text": 'has "__type__" in a string, not as a key'},
]


@pytest.mark.parametrize("value", VALUES)
@pytest.mark.parametrize("as_bytes", [True, False])
def test_loads_gives_what_kombus_loads_gives(value: Any, as_bytes: bool) -> None:
    text = kombu_json.dumps(value)
    data = text.encode() if as_bytes else text
    assert wirejson.loads(data) == kombu_json.loads(data) == value


@pytest.mark.parametrize("data", [b"{", "{", b"\xff\xfe{}", b""])
def test_what_is_not_json_is_a_value_error(data: bytes | str) -> None:
    with pytest.raises(ValueError):
        wirejson.loads(data)


def _received(body: bytes, content_type: str = "application/json",
              accept: set[str] | None = None) -> Any:
    channel = Connection("memory://").default_channel
    raw = channel.Message({"body": body, "content-type": content_type,
                           "content-encoding": "utf-8", "headers": {},
                           "properties": {"delivery_tag": "t", "delivery_info": {}}},
                          channel=channel)
    raw.accept = {"application/json"} if accept is None else accept
    return raw


def test_decode_body_gives_what_kombu_decodes() -> None:
    body = kombu_json.dumps(VALUES[1]).encode()
    assert broker.decode_body(_received(body)) == _received(body).decode() == VALUES[1]


def test_decode_body_refuses_what_is_not_accepted_and_reports_bad_json() -> None:
    with pytest.raises(ContentDisallowed):
        broker.decode_body(_received(b"[]", accept={"application/x-yaml"}))
    with pytest.raises(ContentDisallowed):
        broker.decode_body(_received(b"x", content_type="application/x-python-serialize"))
    with pytest.raises(DecodeError):
        broker.decode_body(_received(b"[1,"))
