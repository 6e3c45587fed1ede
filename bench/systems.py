"""The systems under test: how to start each one's worker, per variant, and where its client is.

A *unit* of a run is one (system, variant) pair. ``drain`` runs every variant a system lists in
``drain`` (the first one is its default, which ``latency`` and ``startup`` use); ``io`` runs the
concurrency-8 variants in ``io``. ``--variant`` picks one variant for every chosen system instead.
"""
import importlib
import os
import sys
from dataclasses import dataclass, field

import common

HERE = os.path.dirname(os.path.abspath(__file__))
PY = sys.executable
MANAGE = os.path.join(HERE, "manage.py")
BROKERS = ("redis", "amqp", "django")


@dataclass(frozen=True)
class Variant:
    desc: str  # how the docs name it: the command line that differs
    cmds: tuple  # one argv per worker command; each runs in its own session
    env: dict = field(default_factory=dict)


@dataclass(frozen=True)
class System:
    label: str
    client: str  # module whose enqueue(**kw) sends one task, imported in the driver
    brokers: tuple
    variants: dict
    drain: tuple  # variants drain runs; the first is the default
    io: tuple  # the concurrency-8 variants io runs
    queue: str = ""  # where the W1 check and the failure report look for messages left
    amqp_queues: tuple = ()  # purged before every repetition
    apps: str = ""  # bench project apps the worker loads (BENCH_APPS); "" = plain Python
    postgres_only: bool = False
    latency_load: tuple = ()  # (rate/s, count) when its capacity is under the default rate

    @property
    def default(self):
        return self.drain[0]

    def supports(self, broker, db):
        return broker in self.brokers and not (self.postgres_only and db != "postgres")

    def enqueue(self):
        """This system's client call, imported in THIS process (the one client)."""
        return importlib.import_module(self.client).enqueue


def taskworker(*args):
    return ((PY, MANAGE, "taskworker", *args, "-l", "WARNING"),)


def celery(pool, concurrency):
    return ((PY, "-m", "celery", "-A", "celeryapp", "worker", "-P", pool, "-c", str(concurrency),
             "--loglevel=WARNING"),)


def dramatiq(threads):
    return ((PY, "-m", "dramatiq", "dramatiqapp", "--processes", "2", "--threads", str(threads)),)


def huey(kind, workers):
    return ((PY, "-m", "huey.bin.huey_consumer", "hueyapp.huey", "-k", kind, "-w", str(workers),
             "-q"),)


def db_workers(n):
    return ((PY, MANAGE, "db_worker"),) * n


SYSTEMS = {
    "dtq": System(
        label="django-tasks-q", client="dtqbench.tasks", brokers=BROKERS, apps="dtq",
        queue=common.DTQ_QUEUE, amqp_queues=(common.DTQ_QUEUE,),
        variants={
            "prefork2": Variant("taskworker -c 2", taskworker("-c", "2")),
            "results-all": Variant("taskworker -c 2, RESULTS all", taskworker("-c", "2"),
                                   {"BENCH_DTQ_RESULTS": "all"}),
            "threads8": Variant("taskworker -P threads -c 8",
                                taskworker("-P", "threads", "-c", "8")),
            "prefork8": Variant("taskworker -c 8", taskworker("-c", "8")),
        },
        drain=("prefork2", "results-all"), io=("threads8", "prefork8")),
    "celery": System(
        label="Celery", client="celeryapp", brokers=BROKERS,
        queue=common.CELERY_QUEUE, amqp_queues=(common.CELERY_QUEUE,),
        variants={
            "prefork2": Variant("worker -P prefork -c 2", celery("prefork", 2)),
            "prefork8": Variant("worker -P prefork -c 8", celery("prefork", 8)),
            "threads8": Variant("worker -P threads -c 8", celery("threads", 8)),
        },
        drain=("prefork2",), io=("prefork8", "threads8")),
    "dramatiq": System(
        label="Dramatiq", client="dramatiqapp", brokers=("redis", "amqp"),
        queue=common.DRAMATIQ_QUEUE,
        amqp_queues=tuple(common.DRAMATIQ_QUEUE + s for s in ("", ".DQ", ".XQ")),
        variants={
            "p2t8": Variant("--processes 2 --threads 8 (default threads)", dramatiq(8)),
            "p2t1": Variant("--processes 2 --threads 1", dramatiq(1)),
            "p2t4": Variant("--processes 2 --threads 4", dramatiq(4)),
        },
        drain=("p2t8", "p2t1"), io=("p2t4",)),
    "huey": System(
        label="huey", client="hueyapp", brokers=("redis",),
        variants={
            "process2": Variant("-k process -w 2", huey("process", 2)),
            "thread8": Variant("-k thread -w 8", huey("thread", 8)),
        },
        drain=("process2",), io=("thread8",)),
    "djtasks": System(
        label="django-tasks-db", client="dtqbench.djtasks", brokers=("django",), apps="djtasks",
        postgres_only=True, latency_load=(20.0, 400),  # polls every 1 s: ~140 tasks/s
        variants={
            "proc2": Variant("db_worker × 2", db_workers(2)),
            "proc8": Variant("db_worker × 8", db_workers(8)),
        },
        drain=("proc2",), io=("proc8",)),
}


def names(spec):
    """``all`` or a comma-separated list -> system names, in SYSTEMS' order for ``all``."""
    if spec == "all":
        return list(SYSTEMS)
    found = [name.strip() for name in spec.split(",") if name.strip()]
    unknown = [name for name in found if name not in SYSTEMS]
    if unknown:
        raise SystemExit(f"bench: unknown system {', '.join(unknown)} "
                         f"(known: {', '.join(SYSTEMS)}, all)")
    return found


def units(names, workload, variant=None):
    """The (system, variant) pairs a workload runs, in the order given."""
    if variant:
        missing = [name for name in names if variant not in SYSTEMS[name].variants]
        if missing:
            raise SystemExit(f"bench: no variant {variant!r} in {', '.join(missing)}")
        return [(name, variant) for name in names]
    pick = {"drain": lambda s: s.drain, "io": lambda s: s.io}.get(workload, lambda s: (s.default,))
    return [(name, v) for name in names for v in pick(SYSTEMS[name])]


def worker_env(name, variant, broker):
    """The driver's environment, with only this system's Django apps, if any, and the variant's."""
    system = SYSTEMS[name]
    env = dict(os.environ)
    for key in ("DJANGO_SETTINGS_MODULE", "BENCH_APPS", "BENCH_DTQ_RESULTS"):
        env.pop(key, None)
    # Celery on django:// sets Django up in celeryapp.py; elsewhere it runs as plain Celery.
    if system.apps:
        env.update(DJANGO_SETTINGS_MODULE="dtqbench.settings", BENCH_APPS=system.apps)
    env.update(system.variants[variant].env)
    return env
