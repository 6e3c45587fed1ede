"""Processes: per-task rate limits of one worker (``rate_limit="10/s"``), as token buckets."""

from __future__ import annotations

import time

from .. import registry
from ..exceptions import TaskNotRegistered
from ..task import parse_rate


class Bucket:
    """Tokens refill at ``rate`` per second, up to one second's worth (at least one)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.capacity = max(1.0, rate)
        self.tokens = self.capacity
        self.stamp = time.monotonic()

    def wait(self) -> float:
        """0 and take a token when one is there; otherwise seconds until one will be."""
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


class RateLimits:
    """The buckets of every rate-limited task this worker has seen."""

    def __init__(self) -> None:
        self._buckets: dict[str, Bucket | None] = {}

    def wait(self, name: str) -> float:
        """Seconds ``name`` must wait before it may start (0: start now, a token is taken)."""
        try:
            bucket = self._buckets[name]
        except KeyError:
            bucket = self._buckets[name] = self._bucket_for(name)
        return 0.0 if bucket is None else bucket.wait()

    @staticmethod
    def _bucket_for(name: str) -> Bucket | None:
        try:
            rate = registry.get(name).rate_limit
        except TaskNotRegistered:
            return None
        return Bucket(parse_rate(rate)) if rate else None
