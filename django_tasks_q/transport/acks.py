"""Adapters: acknowledgements that free their prefetch slot at once and reach the broker together.

A worker acknowledges every finished task. kombu's Redis and ``django://`` channels make one
round trip (or statement) per acknowledgement, which for short tasks costs the worker about as
much as the task. Here the channel's own bookkeeping is done at once (the slot is free for the
next message) and the broker is told in one round trip for all acknowledgements taken since the
last ``flush_acks()``. Until then the messages stay unacknowledged in the broker: a worker that
dies in between has them delivered again, as it would any message it had not yet acknowledged.
"""

from __future__ import annotations

from typing import Any

from .base import VirtualQoS


class BatchedAcks(VirtualQoS):
    """A virtual transport's QoS, to be mixed in first; the class using it says how to
    acknowledge in the broker (``_ack_remote``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._unsent: list[str] = []

    def _ack_remote(self, delivery_tags: list[str]) -> None:
        """Acknowledge ``delivery_tags`` in the broker, in one round trip."""
        raise NotImplementedError

    def ack_later(self, delivery_tag: str) -> None:
        """Acknowledge here now; in the broker at the next ``flush_acks()``."""
        VirtualQoS.ack(self, delivery_tag)
        self._unsent.append(delivery_tag)

    def flush_acks(self) -> list[str]:
        """Send the acknowledgements taken by ``ack_later``; return their tags. When this
        raises, they were not sent: the caller settles them again (by tag) once it can."""
        tags, self._unsent = self._unsent, []
        if tags:
            self._ack_remote(tags)
        return tags

    def ack_many(self, delivery_tags: list[str]) -> None:
        """Acknowledge many messages in one round trip."""
        self._ack_remote(delivery_tags)
        for tag in delivery_tags:
            VirtualQoS.ack(self, tag)
