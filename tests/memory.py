"""Test helper: read back what the in-process memory:// broker holds."""

from __future__ import annotations

from typing import Any

from kombu import Connection

from django_tasks_q import broker


def drain(queue: str = "default") -> list[tuple[dict[str, Any], list[Any], int | None]]:
    """Every message waiting in ``queue`` on the memory:// broker, taken off it: its headers,
    body and priority."""
    got = []
    with Connection("memory://") as conn:
        waiting = conn.SimpleQueue(broker.queue(queue))
        while True:
            try:
                msg = waiting.get(block=False)
            except waiting.Empty:
                break
            got.append((msg.headers, msg.decode(), msg.properties.get("priority")))
            msg.ack()
        waiting.close()
    return got
