"""Adapters: JSON read from a broker, decoded as kombu decodes it, in one call to the C decoder.

kombu's ``loads`` passes an object hook to ``json.loads`` for the values its encoder marks
(``{"__type__": "datetime", "__value__": ...}``: dates, decimals, UUIDs). The hook runs in Python
for every object, and ``json.loads`` builds a new decoder for every call that has one. A message
without such a value decodes to the same thing without it.
"""

from __future__ import annotations

import json
from typing import Any

from kombu.utils import json as kombu_json

#: How kombu's encoder marks a typed value; text without it has none.
_TYPED = '"__type__"'
_TYPED_BYTES = _TYPED.encode()


def loads(data: bytes | str) -> Any:
    """The value of JSON text ``data``, as kombu's ``loads`` gives it. ``ValueError`` (also for
    bytes that are not UTF-8) if it is not JSON."""
    if isinstance(data, bytes):
        if _TYPED_BYTES in data:
            return kombu_json.loads(data)
        return json.loads(data.decode())
    if _TYPED in data:
        return kombu_json.loads(data)
    return json.loads(data)
