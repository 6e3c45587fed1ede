"""RabbitMQ publisher confirms, collected asynchronously on one channel.

A publisher that waits for each message's confirm makes a round trip per message. Here a
channel in confirm mode numbers what it publishes (1, 2, ... as RabbitMQ does) and keeps each
message until RabbitMQ acknowledges it (one ``basic.ack`` may cover many); ``wait()`` reads
confirms until none is outstanding. What is outstanding when the connection fails is what the
publisher sends again on the next one.
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

T = TypeVar("T")


class ConfirmTimeout(Exception):
    """RabbitMQ confirmed nothing for longer than the wait allows."""


class Confirms(Generic[T]):
    """The messages published on ``channel`` that RabbitMQ has not confirmed yet."""

    def __init__(self, channel: Any) -> None:
        self.channel = channel
        self._unconfirmed: dict[int, T] = {}
        self._refused: list[T] = []
        self._tag = 0
        channel.confirm_select()
        channel.events["basic_ack"].add(self._settle)
        channel.events["basic_nack"].add(self._nacked)

    def __len__(self) -> int:
        return len(self._unconfirmed)

    def sent(self, item: T) -> None:
        """``item`` was just published on the channel."""
        self._tag += 1
        self._unconfirmed[self._tag] = item

    def outstanding(self) -> list[T]:
        """What was published and not confirmed, oldest first (to send again elsewhere)."""
        return list(self._unconfirmed.values())

    def wait(self, timeout: float) -> list[T]:
        """Read confirms until none is outstanding; return (and forget) what RabbitMQ refused.
        ``ConfirmTimeout`` when ``timeout`` seconds pass with nothing from RabbitMQ."""
        read = self.channel.connection.drain_events
        while self._unconfirmed:
            try:
                read(timeout=timeout)
            except TimeoutError:
                raise ConfirmTimeout(
                    f"RabbitMQ confirmed none of {len(self._unconfirmed)} messages within "
                    f"{timeout:g}s (a memory or disk alarm blocks publishers)") from None
        refused, self._refused = self._refused, []
        return refused

    def _settle(self, tag: int, multiple: bool) -> list[T]:
        """Forget what a confirm covers (``basic.ack`` calls this directly); return it."""
        if not multiple:
            item = self._unconfirmed.pop(tag, None)
            return [] if item is None else [item]
        done = []
        for t in list(self._unconfirmed):  # oldest first: stop at the first one after ``tag``
            if t > tag:
                break
            done.append(self._unconfirmed.pop(t))
        return done

    def _nacked(self, delivery_tag: int, multiple: bool) -> None:
        self._refused.extend(self._settle(delivery_tag, multiple))
