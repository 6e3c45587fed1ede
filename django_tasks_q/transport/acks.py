"""Adapters: acknowledgements that free their prefetch slot at once and reach the broker together.

A worker acknowledges every finished task. kombu's Redis and ``django://`` channels make one
round trip (or statement) per acknowledgement, which for short tasks costs the worker about as
much as the task. Here the channel's own bookkeeping is done at once (the slot is free for the
next message) and the broker is told later, in one round trip for many (``send_acks``). Until
then the messages stay unacknowledged in the broker: a worker that dies in between has them
delivered again, as it would any message it had not yet acknowledged.
"""

from __future__ import annotations

from .base import VirtualQoS


class BatchedAcks(VirtualQoS):
    """A virtual transport's QoS, to be mixed in first; the class using it says how to
    acknowledge in the broker (``send_acks``)."""

    def send_acks(self, delivery_tags: list[str]) -> None:
        """Acknowledge ``delivery_tags`` in the broker, in one round trip. It may return before
        the broker has answered: the next call, or ``confirm_acks``, raises if it failed."""
        raise NotImplementedError

    def confirm_acks(self) -> None:
        """Wait until the acknowledgements sent so far are applied; raise if they failed."""

    def ack_later(self, delivery_tag: str) -> None:
        """Acknowledge here now (the prefetch slot is free); the caller sends it to the broker
        later with ``send_acks``, or gives the message back by tag."""
        VirtualQoS.ack(self, delivery_tag)

    def ack_many(self, delivery_tags: list[str]) -> None:
        """Acknowledge many messages in one round trip."""
        self.send_acks(delivery_tags)
        self.confirm_acks()
        for tag in delivery_tags:
            VirtualQoS.ack(self, tag)
