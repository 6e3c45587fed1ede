"""End-to-end fixtures: a migrated database per test, real ``taskworker`` processes, a producer.

``project`` is parametrized over the brokers a worker can use::

    redis          redis://…/10, results in a SQLite file
    amqp           RabbitMQ, results in a SQLite file
    django-sqlite  the embedded django:// broker on the same SQLite file
    django-pg      the embedded django:// broker on a fresh PostgreSQL database

Workers are ``python manage.py taskworker`` subprocesses of the example project, configured only
through the environment (``DATABASE_URL``, ``TASKS_Q_BROKER_URL``, ``EMAIL_BACKEND``), each logging
to its own file. The test side talks to the same database and broker through a long-lived helper
(``tests/e2e/producer.py``). Every process is stopped at teardown: SIGTERM, then SIGKILL.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import select
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse, urlunparse

import pytest

from ..conftest import require

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
BROKERS = ("redis", "amqp", "django-sqlite", "django-pg")
READY_STATES = ("SUCCESS", "FAILURE", "REVOKED")

# Databases of the shared Redis these tests may use: workers' queues here, the Celery interop
# tests in REDIS_DB + 1 (broker) and REDIS_DB + 2 (what the Celery worker records).
REDIS_DB = 10

# How long a worker may take to start, and to stop on SIGTERM before it is killed.
START_TIMEOUT = 20.0
STOP_TIMEOUT = 15.0

T = TypeVar("T")
_counter = itertools.count(1)


def with_db(url: str, db: int | str) -> str:
    """``url`` pointing at database (Redis) or database name (PostgreSQL) ``db``."""
    return urlunparse(urlparse(url)._replace(path=f"/{db}"))


def wait_for(predicate: Callable[[], T], timeout: float, what: str,
             logs: Callable[[], str] | None = None, interval: float = 0.05) -> T:
    """Poll ``predicate`` until it returns something truthy; fail (with logs) after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            detail = f"\n--- worker logs ---\n{logs()}" if logs else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {what}{detail}")
        time.sleep(interval)


def _run_manage(env: dict[str, str], *args: str) -> None:
    done = subprocess.run([PYTHON, "manage.py", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    if done.returncode:
        raise RuntimeError(f"manage.py {' '.join(args)} failed:\n{done.stdout}{done.stderr}")


def tasks_q_extra(**settings: Any) -> str:
    """``TASKS_Q_EXTRA`` for the example project: ``settings`` over the end-to-end defaults (no
    beat schedule, no worker extensions but those the example app registers)."""
    return json.dumps({"BEAT_SCHEDULE": {}, "WORKER_EXTENSIONS": [], **settings})


def base_env(database_url: str, broker_url: str) -> dict[str, str]:
    """The environment of every process started for a project."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("DJANGO_SETTINGS_MODULE", "DATABASE_URL", "TASKS_Q_BROKER_URL")}
    env.update(DJANGO_SETTINGS_MODULE="testproject.settings", DATABASE_URL=database_url,
               TASKS_Q_BROKER_URL=broker_url, EMAIL_BACKEND="tests.e2e.mail.Backend",
               PYTHONUNBUFFERED="1", DEBUG="false",
               # Not the example project's schedule, nor its worker extensions' queue: a
               # test's beats send only the test's, its workers run only its extensions.
               TASKS_Q_EXTRA=tasks_q_extra())
    return env


# -- processes ------------------------------------------------------------------------------

class Worker:
    """One ``manage.py taskworker`` process and its log file."""

    #: What the worker logs once it consumes.
    ready_pattern = r"\bready: pool="

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path, hostname: str,
                 command: tuple[str, ...] = ("manage.py", "taskworker")) -> None:
        self.args = args
        self.hostname = hostname
        self.terminated = False
        self.log_path = log_path
        self._log_file = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([PYTHON, *command, *args], cwd=REPO, env=env,
                                     stdout=self._log_file, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def log(self) -> str:
        """Everything the worker has logged so far."""
        return self.log_path.read_text(errors="replace")

    def count(self, pattern: str) -> int:
        """How many times ``pattern`` (a regex) matches the log."""
        return len(re.findall(pattern, self.log))

    def wait_log(self, pattern: str, timeout: float = 10.0, count: int = 1) -> None:
        """Wait until ``pattern`` appears ``count`` times in the log."""
        def seen() -> bool:
            if self.proc.poll() is not None and self.count(pattern) < count:
                raise AssertionError(f"worker {self.hostname} exited ({self.proc.returncode}) "
                                     f"before logging {pattern!r}:\n{self.log}")
            return self.count(pattern) >= count

        wait_for(seen, timeout, f"{pattern!r} x{count} in the log of {self.hostname}",
                 lambda: self.log)

    def wait_ready(self) -> Worker:
        """Wait for the worker's ready line (it consumes from then on)."""
        self.wait_log(self.ready_pattern, START_TIMEOUT)
        return self

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the worker's main process."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signum)
            self.terminated = self.terminated or signum == signal.SIGTERM

    def wait_exit(self, timeout: float) -> int:
        """The exit status, waiting at most ``timeout`` seconds."""
        return self.proc.wait(timeout)

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL to the whole process group after STOP_TIMEOUT; the exit status."""
        if self.proc.poll() is None:
            if not self.terminated:  # once only: a second SIGTERM asks for a cold shutdown
                self.signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(STOP_TIMEOUT)
        # Whatever is left of this worker's own process group (pool children included).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.wait(5)
        self._log_file.close()
        return self.proc.returncode


class Beat(Worker):
    """One ``manage.py taskbeat`` process and its log file."""

    ready_pattern = r"\bready: \d+ schedule"

    def __init__(self, name: str, env: dict[str, str], log_path: Path) -> None:
        super().__init__(["-n", name, "-l", "INFO"], env, log_path, name,
                         command=("manage.py", "taskbeat"))

    @property
    def leads(self) -> bool:
        """True when its log says it leads, and has not said it stands by since."""
        log = self.log
        return log.rfind(" leads:") > log.rfind(" stands by")


class Server(Worker):
    """``manage.py runserver`` (static files included) on a free port, and its log file."""

    ready_pattern = r"Quit the server with"

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        super().__init__(["--noreload", "--insecure", f"127.0.0.1:{self.port}"], env, log_path,
                         f"runserver:{self.port}", command=("manage.py", "runserver"))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class ProducerClient:
    """The test's end of ``tests/e2e/producer.py``: one JSON command, one JSON answer."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self._stderr = open(log_path, "wb")  # noqa: SIM115 - closed in close()
        self.log_path = log_path
        self.proc = subprocess.Popen([PYTHON, "-m", "tests.e2e.producer"], cwd=REPO, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._stderr, text=True, bufsize=1)
        self._ready = False  # its start-up overlaps the workers'; the first call waits for it

    def _read(self, timeout: float) -> Any:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            raise AssertionError(f"the producer helper did not answer within {timeout}s:\n"
                                 f"{self.log_path.read_text(errors='replace')}")
        answer = json.loads(line)
        if not answer["ok"]:
            raise AssertionError(f"producer: {answer['error']}\n{answer['traceback']}")
        return answer["result"]

    def call(self, op: str, timeout: float = 30.0, **kwargs: Any) -> Any:
        """Run ``op`` in the helper and return its answer."""
        assert self.proc.stdin is not None
        if not self._ready:
            assert self._read(START_TIMEOUT) == "ready"
            self._ready = True
        self.proc.stdin.write(json.dumps({"op": op, **kwargs}) + "\n")
        self.proc.stdin.flush()
        return self._read(timeout)

    def close(self) -> None:
        """Let the helper exit (killing it if it does not)."""
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._stderr.close()


class Project:
    """The example project on one broker and one fresh database, with its workers."""

    def __init__(self, broker: str, broker_url: str, database_url: str, tmp: Path) -> None:
        self.broker = broker
        self.broker_url = broker_url
        self.database_url = database_url
        self.tmp = tmp
        self.queue = f"e2e-{uuid.uuid4().hex[:10]}"
        self.queues = {self.queue}
        self.workers: list[Worker] = []
        self._producer: ProducerClient | None = None
        self.extra_env: dict[str, str] = {}  # e.g. TASKS_Q_BROKER_OPTIONS for every process

    def __repr__(self) -> str:
        return f"<Project {self.broker} queue={self.queue}>"

    @property
    def env(self) -> dict[str, str]:
        return {**base_env(self.database_url, self.broker_url), **self.extra_env}

    def worker(self, *extra: str, concurrency: int = 2, pool: str = "prefork",
               queues: list[str] | None = None, ready: bool = True) -> Worker:
        """Start a worker on this project's queue (or ``queues``); wait until it is ready."""
        queues = queues or [self.queue]
        self.queues.update(queues)
        hostname = f"w{next(_counter)}.{self.broker}@e2e"
        args = ["-Q", ",".join(queues), "-c", str(concurrency), "-P", pool, "-n", hostname,
                "-l", "INFO", *extra]
        worker = Worker(args, self.env, self.tmp / f"{hostname}.log", hostname)
        self.workers.append(worker)
        self.producer  # noqa: B018 - starts the helper while the worker starts
        return worker.wait_ready() if ready else worker

    def beat(self, ready: bool = True) -> Beat:
        """Start a ``taskbeat`` on this project's database and broker."""
        name = f"b{next(_counter)}.{self.broker}@e2e"
        beat = Beat(name, self.env, self.tmp / f"{name}.log")
        self.workers.append(beat)
        return beat.wait_ready() if ready else beat

    def server(self) -> Server:
        """Start the project's web server (the admin) on this project's database."""
        server = Server(self.env, self.tmp / "runserver.log")
        self.workers.append(server)
        return server.wait_ready()

    @property
    def producer(self) -> ProducerClient:
        if self._producer is None:
            self._producer = ProducerClient(self.env, self.tmp / "producer.log")
        return self._producer

    def logs(self) -> str:
        """All workers' logs, for failure messages."""
        return "\n".join(f"--- {w.hostname} ---\n{w.log}" for w in self.workers)

    # -- producer side ----------------------------------------------------------------------
    def send(self, name: str, *args: Any, queue: str | None = None, **kwargs: Any) -> str:
        """Publish task ``name`` through the library's client; returns the task id."""
        return self.producer.call("send", name=name, args=list(args), kwargs=kwargs,
                                  queue=queue or self.queue)

    def send_message(self, name: str, args: list[Any], *, retries: int = 0,
                     queue: str | None = None) -> str:
        """Publish a message with protocol fields set by the test (``retries``)."""
        return self.producer.call("send", name=name, args=args, queue=queue or self.queue,
                                  retries=retries)

    def results(self, ids: list[str] | None = None,
                name: str | None = None) -> list[dict[str, Any]]:
        """``TaskResult`` rows (of ``ids`` / of task ``name`` / all)."""
        return self.producer.call("results", task_ids=ids, task_name=name)

    def wait_results(self, ids: list[str], timeout: float = 20.0) -> dict[str, dict[str, Any]]:
        """The finished ``TaskResult`` rows of all ``ids``, by id, once every one is there."""
        def finished() -> dict[str, dict[str, Any]] | None:
            rows = {r["task_id"]: r for r in self.results(ids)
                    if r["status"] in READY_STATES}
            return rows if len(rows) == len(set(ids)) else None

        return wait_for(finished, timeout, f"results of {len(ids)} task(s)", self.logs,
                        interval=0.1)

    def count(self, queue: str | None = None) -> int:
        """Messages the broker holds for ``queue``."""
        return self.producer.call("count", queue=queue or self.queue)

    def assert_empty(self, timeout: float = 5.0) -> None:
        """The queue holds nothing: every message was run and acknowledged exactly once.

        A task's outcome is written before its message is acknowledged (an ack that came first
        could lose the task on a crash), so a result row can be seen a moment before the broker
        drops the message: the count is polled for up to ``timeout`` seconds.
        """
        wait_for(lambda: self.count() == 0, timeout, f"{self.queue} to hold no message",
                 self.logs)

    def create_order(self, email: str) -> int:
        """A new ``Order`` row; returns its pk."""
        return self.producer.call("create_order", email=email)

    def order(self, pk: int) -> dict[str, Any]:
        """The ``Order`` row ``pk``."""
        return self.producer.call("order", pk=pk)

    def close(self) -> None:
        """Stop the workers, delete the queues, stop the helper."""
        try:
            for worker in self.workers:  # all warm shutdowns at once, then wait for each
                if not worker.terminated:
                    worker.signal(signal.SIGTERM)
            for worker in self.workers:
                worker.stop()
        finally:
            if self._producer is not None:
                for queue in sorted(self.queues):
                    # Fails when the broker is a private one that is gone already.
                    with contextlib.suppress(AssertionError):
                        self._producer.call("delete_queue", queue=queue, timeout=10)
                self._producer.close()
            if self.broker_url.startswith("redis"):
                self._forget_redis_keys()

    def _forget_redis_keys(self) -> None:
        # kombu leaves binding sets (``_kombu.binding*.<queue>``) behind on Redis; the queue
        # names are unique to this test, so every key naming them is this test's.
        import redis

        client = redis.Redis.from_url(self.broker_url, socket_connect_timeout=1)
        try:
            for queue in self.queues:
                keys = list(client.scan_iter(match=f"*{queue}*", count=1000))
                if keys:
                    client.delete(*keys)
        except redis.RedisError:
            pass  # a private server that is gone already took its keys with it
        finally:
            client.close()


# -- databases ------------------------------------------------------------------------------

def _sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file migrated once; each test gets a copy."""
    path = tmp_path_factory.mktemp("e2e-template") / "template.sqlite3"
    _run_manage(base_env(_sqlite_url(path), "memory://"), "migrate", "--run-syncdb", "-v0")
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    return path


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str]:
    """A PostgreSQL database migrated once, the template of each test's database."""
    import psycopg

    server = require("postgres")
    name = f"dtq_e2e_tmpl_{os.getpid()}"
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        _run_manage(base_env(with_db(server, name), "memory://"),
                    "migrate", "--run-syncdb", "-v0")
        yield name
    finally:
        with psycopg.connect(server, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def new_database(kind: str, tmp: Path, request: pytest.FixtureRequest,
                 cleanups: list[Callable[[], None]]) -> str:
    """The URL of a fresh, migrated database of ``kind`` (``sqlite`` or ``pg``)."""
    if kind == "sqlite":
        template: Path = request.getfixturevalue("sqlite_template")
        path = tmp / "db.sqlite3"
        src, dst = sqlite3.connect(template), sqlite3.connect(path)
        try:
            src.backup(dst)
        finally:
            src.close()
            dst.close()
        return _sqlite_url(path)
    import psycopg

    template_name: str = request.getfixturevalue("pg_template")
    server = require("postgres")
    name = f"dtq_e2e_{os.getpid()}_{next(_counter)}"
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_name}"')

    def drop() -> None:
        with psycopg.connect(server, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    cleanups.append(drop)
    return with_db(server, name)


def broker_url(broker: str) -> str:
    """The URL of a shared broker service (``django://`` needs none)."""
    if broker == "redis":
        return with_db(require("redis"), REDIS_DB)
    if broker == "amqp":
        return require("amqp")
    if broker.startswith("django-"):
        return "django://"
    raise ValueError(broker)


MakeProject = Callable[..., Project]


@pytest.fixture
def make_project(request: pytest.FixtureRequest,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[MakeProject]:
    """``make_project(broker, url=None, database=None)``: a Project, closed after the test."""
    projects: list[Project] = []
    cleanups: list[Callable[[], None]] = []

    def make(broker: str, url: str | None = None, database: str | None = None) -> Project:
        tmp = tmp_path_factory.mktemp(f"e2e-{broker}")
        database = database or ("pg" if broker == "django-pg" else "sqlite")
        db_url = new_database(database, tmp, request, cleanups)
        project = Project(broker, url or broker_url(broker), db_url, tmp)
        projects.append(project)
        return project

    yield make
    try:
        for project in projects:
            project.close()
    finally:
        for cleanup in reversed(cleanups):
            cleanup()


@pytest.fixture(params=[pytest.param(b, marks=[] if b == "django-sqlite" else [pytest.mark.broker])
                        for b in BROKERS])
def project(request: pytest.FixtureRequest, make_project: MakeProject) -> Project:
    """The example project on each broker in turn (narrow it with ``indirect`` parametrize)."""
    return make_project(request.param)
