"""Benchmark plumbing shared by the driver, every system's worker and the bench Django project.

URLs of the services (loopback only), queue names, and the one task body every system runs:
an INCR on the counter Redis (db 15), plus an RPUSH of (start - enqueue time) for latency runs.
The body is the same as ``common.body`` of the peer harness, so figures compare with it.
"""

import ipaddress
import os
import time
from urllib.parse import urlsplit

import redis

REDIS_BROKER_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
AMQP_BROKER_URL = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
COUNTER_URL = os.environ.get("BENCH_COUNTER_URL", "redis://127.0.0.1:6379/15")
PG_DATABASE_URL = os.environ.get("BENCH_PG_URL", "postgres://postgres@127.0.0.1:5432/dtq_bench")
SQLITE_PATH = os.environ.get(
    "BENCH_SQLITE_PATH",
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "var", "bench.sqlite3"))
COUNT_KEY = "bench:count"
LAT_KEY = "bench:lat"

# Own queue names, so that resetting state between repetitions cannot touch anyone else's queues
# on the shared RabbitMQ. Otherwise every system keeps its defaults.
DTQ_QUEUE = "bench-dtq"
CELERY_QUEUE = "bench-celery"
DRAMATIQ_QUEUE = "bench-dramatiq"
HUEY_NAME = "bench-huey"

# Chosen by the driver for each command: the broker under test and the Django database.
BROKER_URL = os.environ.get("BENCH_BROKER_URL", REDIS_BROKER_URL)


def require_loopback(url):
    """Refuse any service URL whose host is not a loopback address."""
    if url.startswith(("django://", "memory://", "sqlite://")):
        return url
    host = urlsplit(url).hostname or ""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        where = url.split("@")[-1]
        raise SystemExit(f"bench: refusing non-loopback service address {host!r} ({where})")
    return url


for _url in (REDIS_BROKER_URL, AMQP_BROKER_URL, COUNTER_URL, PG_DATABASE_URL, BROKER_URL,
             os.environ.get("DATABASE_URL", "sqlite://")):
    require_loopback(_url)

_client = None
_client_pid = None


def counter():
    """This process's client of the counter Redis (a new one after fork)."""
    global _client, _client_pid
    if _client is None or _client_pid != os.getpid():
        _client = redis.Redis.from_url(COUNTER_URL)
        _client_pid = os.getpid()
    return _client


def body(ts=None, sleep=0.0):
    """THE task body. ts: enqueue time.time(); sleep: simulated I/O seconds."""
    start = time.time()
    if sleep:
        time.sleep(sleep)
    r = counter()
    if ts is not None:
        p = r.pipeline(transaction=False)
        p.rpush(LAT_KEY, start - ts)
        p.incr(COUNT_KEY)
        p.execute()
    else:
        r.incr(COUNT_KEY)
