"""The services around the systems: the driver's environment, the bench database, resetting the
brokers between repetitions, and counting what a system left in its broker."""
import contextlib
import fcntl
import os
import subprocess
import sys
import tempfile
from importlib.util import find_spec

import common
from systems import HERE, MANAGE, PY, SYSTEMS

REPO = os.path.dirname(HERE)
# The driver enqueues to every Django-based system and empties their tables, so it loads them all.
DRIVER_APPS = "dtq,djtasks" if find_spec("django_tasks_db") else "dtq"


def database_url(db):
    return common.PG_DATABASE_URL if db == "postgres" else "sqlite:///" + common.SQLITE_PATH


def configure(broker, db):
    """Point this process, and the workers it starts, at ``broker`` and ``db``; set up Django."""
    urls = {"redis": common.REDIS_BROKER_URL, "amqp": common.AMQP_BROKER_URL, "django": "django://"}
    url = urls[broker]
    path = os.pathsep.join(p for p in (HERE, REPO, os.environ.get("PYTHONPATH")) if p)
    os.environ.update(BENCH_BROKER_URL=url, TASKS_Q_BROKER_URL=url, DATABASE_URL=database_url(db),
                      DJANGO_SETTINGS_MODULE="dtqbench.settings", BENCH_APPS=DRIVER_APPS,
                      PYTHONUNBUFFERED="1", PYTHONPATH=path)
    common.BROKER_URL = url
    import django

    django.setup()


def setup_db(db, fresh=False):
    """Create the bench database if missing and its tables (idempotent)."""
    if db == "postgres":
        from urllib.parse import urlsplit

        import psycopg

        u = urlsplit(common.PG_DATABASE_URL)
        name = u.path.lstrip("/")
        with psycopg.connect(host=u.hostname, port=u.port or 5432, user=u.username or "postgres",
                             password=u.password, dbname="postgres", autocommit=True) as c:
            if fresh:
                c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            if not c.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
                c.execute(f'CREATE DATABASE "{name}"')
    else:
        os.makedirs(os.path.dirname(common.SQLITE_PATH), exist_ok=True)
        if fresh:
            for suffix in ("", "-wal", "-shm"):
                if os.path.exists(common.SQLITE_PATH + suffix):
                    os.remove(common.SQLITE_PATH + suffix)
    env = dict(os.environ, DATABASE_URL=database_url(db), BENCH_APPS=DRIVER_APPS)
    migrate = [PY, MANAGE, "migrate", "--run-syncdb", "-v0"]
    if subprocess.run(migrate, env=env).returncode:
        sys.exit(f"bench: migrate failed on {db}; try `bench/run.py setup --db {db} --fresh`")


@contextlib.contextmanager
def exclusive():
    """Hold the bench lock for a run: every run resets the same Redis dbs, queues and tables, so
    a second one at the same time would wipe the first one's counter and steal its tasks."""
    path = os.path.join(tempfile.gettempdir(), "dtq-bench.lock")
    with open(path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            sys.exit(f"bench: another run holds {path}; wait for it to end")
        yield


def redis_at(url):
    import redis

    return redis.Redis.from_url(url)


@contextlib.contextmanager
def amqp_connection():
    from kombu import Connection

    with Connection(common.AMQP_BROKER_URL) as conn:
        yield conn


@contextlib.contextmanager
def amqp_channel():
    """A channel on the bench RabbitMQ, closed with its connection."""
    with amqp_connection() as conn:
        yield conn.channel()


def bench_tables():
    """The tables the Django-based systems queue in and write results to."""
    from django.apps import apps

    tables = []
    if apps.is_installed("django_tasks_q"):
        from django_tasks_q.models import QueueMessage, TaskResult

        tables += [QueueMessage._meta.db_table, TaskResult._meta.db_table]
    if apps.is_installed("django_tasks_db"):
        from django_tasks_db.models import DBTaskResult

        tables.append(DBTaskResult._meta.db_table)
    return tables


def reset_state(broker):
    """FLUSHDB the broker and counter dbs, purge our RabbitMQ queues, empty the bench tables."""
    redis_at(common.COUNTER_URL).flushdb()
    redis_at(common.REDIS_BROKER_URL).flushdb()
    if broker == "amqp":
        for queue in (q for s in SYSTEMS.values() for q in s.amqp_queues):
            # A failed purge (queue not declared yet) closes the channel: one per queue.
            with contextlib.suppress(Exception), amqp_channel() as ch:
                ch.queue_purge(queue)
    from django.db import connection

    with connection.cursor() as cur:
        if connection.vendor == "postgresql":
            cur.execute("TRUNCATE " + ", ".join(bench_tables()))
        else:
            for table in bench_tables():
                cur.execute(f"DELETE FROM {table}")


def drop_amqp_queues():
    """Delete the systems' RabbitMQ queues, for each system to declare its own as its installed
    version does (a purge keeps the arguments a queue was declared with, such as an earlier
    version's x-max-priority, and what they cost the broker)."""
    for queue in (q for s in SYSTEMS.values() for q in s.amqp_queues):
        with contextlib.suppress(Exception), amqp_channel() as ch:
            ch.queue_delete(queue)


def pending(name, broker):
    """Messages still in the broker for system ``name`` (for the W1 check, stalls and losses)."""
    try:
        if broker == "redis":  # one system at a time uses the (flushed) broker db: count it all
            r = redis_at(common.REDIS_BROKER_URL)
            ready = sum(r.llen(k) for k in r.scan_iter() if r.type(k) == b"list")
            return {"ready": ready, "unacked": r.hlen("unacked")}
        if broker == "amqp":
            with amqp_channel() as ch:
                return {"ready": ch.queue_declare(queue=SYSTEMS[name].queue,
                                                  passive=True).message_count}
        if name == "djtasks":
            from django_tasks_db.models import DBTaskResult

            return {"ready": DBTaskResult.objects.filter(status="READY").count()}
        from django_tasks_q.models import QueueMessage

        rows = QueueMessage.objects.filter(queue=SYSTEMS[name].queue)
        return {"rows": rows.count(), "claimed": rows.exclude(claimed_by="").count()}
    except Exception as exc:  # noqa: BLE001
        return {"error": f"{type(exc).__name__}: {exc}"}


def server_versions():
    """Versions of Redis, RabbitMQ and the Django database, for the record."""
    found = {}
    with contextlib.suppress(Exception):
        found["redis"] = redis_at(common.COUNTER_URL).info("server")["redis_version"]
    with contextlib.suppress(Exception), amqp_connection() as conn:
        conn.connect()
        found["rabbitmq"] = conn.connection.server_properties["version"]
    with contextlib.suppress(Exception):
        from django.db import connection

        with connection.cursor() as cur:
            postgres = connection.vendor == "postgresql"
            cur.execute("SHOW server_version" if postgres else "SELECT sqlite_version()")
            found[connection.vendor] = cur.fetchone()[0]
    return found
