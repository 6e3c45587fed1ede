"""Shared fixtures: real services, skipped loudly when missing locally, failing under CI=true."""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

import pytest
from django.db import connection as db_connection

SERVICES = {
    "redis": os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/9"),
    "amqp": os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//"),
    "postgres": os.environ.get("PG_URL", "postgres://postgres@127.0.0.1:5432/test"),
}
_reachable: dict[str, bool] = {}


def in_ci() -> bool:
    """True under CI, where a missing service is a failure, not a skip."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(kind: str) -> str:
    """The URL of service ``kind``; skips (locally) or fails (CI) when it cannot be reached."""
    url = SERVICES[kind]
    if kind not in _reachable:
        parsed = urlparse(url)
        try:
            with socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or 0), 2):
                _reachable[kind] = True
        except OSError:
            _reachable[kind] = False
    if not _reachable[kind]:
        message = f"{kind} is not reachable at {parsed_host(url)}: start it to run this test"
        if in_ci():
            pytest.fail(message + " (CI=true: a missing service is a failure)")
        pytest.skip(message)
    return url


def parsed_host(url: str) -> str:
    """host:port of a URL, without credentials."""
    p = urlparse(url)
    return f"{p.hostname}:{p.port}"


@pytest.fixture
def redis_url() -> str:
    """A reachable Redis (database 9 by default); flushed before the test."""
    url = require("redis")
    import redis

    redis.Redis.from_url(url).flushdb()
    return url


@pytest.fixture
def amqp_url() -> str:
    """A reachable RabbitMQ."""
    return require("amqp")


@pytest.fixture
def postgres() -> None:
    """The test database is PostgreSQL: skipped loudly otherwise, a failure under CI=true."""
    require("postgres")
    if db_connection.vendor != "postgresql":
        message = ("needs the test database on PostgreSQL: run with "
                   "DATABASE_URL=postgres://postgres@127.0.0.1:5432/test")
        if in_ci():
            pytest.fail(message + " (CI=true: a missing service is a failure)")
        pytest.skip(message)


@pytest.fixture
def postgres_url() -> str:
    """A reachable PostgreSQL server (database ``test``)."""
    return require("postgres")
