#!/usr/bin/env python
"""django-tasks-q against its peers, side by side, on redis, amqp and django:// (see README.md).

    python bench/run.py setup   [--db postgres|sqlite] [--fresh]
    python bench/run.py drain   --broker redis|amqp|django [--system all|dtq,celery,...]
                                [--variant V] [-n 20000] [--repeat 3] [--db postgres|sqlite]
    python bench/run.py io      --broker ... [-n 2000]
    python bench/run.py latency --broker ... [--count 2000] [--rate 200]
    python bench/run.py startup --broker ...
    python bench/run.py noise                      # CPU loop CoV, Redis PING p50/p99
    python bench/run.py matrix  [--brokers redis,amqp,django] [--system ...] [--workloads ...]
    python bench/run.py summarize [FILE ...]       # one markdown table per broker, with ratios

Systems: dtq (django-tasks-q), celery, dramatiq, huey, djtasks (django-tasks-db); ``all`` is
every system that runs on the broker (and database).
drain   = W1 (enqueue N into an idle queue, client tasks/s), W2 (start the worker command, time
          until the counter reaches N) and the idle memory of the worker tree 3 s later.
io      = W4: as drain, N tasks that each sleep 20 ms, at concurrency 8.
latency = W3 (running, warmed worker; --count tasks paced at --rate/s; p50/p95/p99 of
          start - enqueue).
startup = one task waiting in an idle queue; the worker command's start to its completion.
Several systems alternate repetition by repetition. Every measurement is one JSON line on
stdout, also appended to results/<YYYYmmdd>.jsonl (or --out; matrix starts a file of its own).
"""
import argparse
import collections
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:0] = [HERE, REPO]

import common  # noqa: E402
import services  # noqa: E402
import systems  # noqa: E402
from summary import median, summarize  # noqa: E402
from systems import BROKERS, PY, SYSTEMS  # noqa: E402
from workers import Worker, count, wait_count  # noqa: E402

WORKLOADS = ("drain", "io", "latency", "startup")
IO_SLEEP = 0.02  # W4: 20 ms of simulated I/O per task, so 8 slots top out at 400 tasks/s
WARM_UP = 20
OUT_FILE = None

Unit = collections.namedtuple("Unit", "name variant enqueue")


def out(rec):
    rec = dict(rec, at=time.strftime("%Y-%m-%dT%H:%M:%S"), load1=round(os.getloadavg()[0], 2))
    line = json.dumps(rec)
    print(line, flush=True)
    if OUT_FILE:
        with open(OUT_FILE, "a") as f:
            f.write(line + "\n")


def pct(sorted_xs, p):
    """Nearest-rank percentile of an already sorted list."""
    return sorted_xs[max(0, math.ceil(p / 100.0 * len(sorted_xs)) - 1)] if sorted_xs else None


def rotation(items, rep):
    """Shift which unit goes first, so drift on a busy machine weighs on every system alike."""
    k = rep % len(items)
    return items[k:] + items[:k]


def base(u, a, rep, **kw):
    return dict(system=u.name, variant=u.variant, broker=a.broker, db=a.db, rep=rep, **kw)


def failed(rec, u, a, error):
    rec.update(error=error, pending=services.pending(u.name, a.broker))


@contextlib.contextmanager
def worker(u, a, rec, workload):
    """The unit's worker, running for the block; its log problems and stop go into ``rec``."""
    w = Worker(u.name, u.variant, a.broker, f"{u.name}-{u.variant}-{a.broker}-{workload}")
    try:
        yield w
    finally:
        rec.update(w.problems())
        rec["warm_stop"] = w.stop()
        out(rec)


def enqueue_timed(u, a, rec, n, **kw):
    """W1 (and W4's first half): one client enqueues ``n`` tasks into the idle queue."""
    t0 = time.perf_counter()
    for _ in range(n):
        u.enqueue(**kw)
    t1 = time.perf_counter()
    rec.update(seconds=round(t1 - t0, 3), rate=round(n / (t1 - t0), 1))
    if a.broker == "amqp":  # until the broker shows all N (not every client waits for confirms)
        deadline = time.time() + 60
        while (services.pending(u.name, a.broker).get("ready") or 0) < n \
                and time.time() < deadline:
            time.sleep(0.05)
        rec["visible_rate"] = round(n / (time.perf_counter() - t0), 1)
    out(rec)


# -- W1 + W2 + idle memory, and W4 ----------------------------------------------------------------

def drain_once(u, a, rep, io=False):
    n = a.n or (2000 if io else 20000)
    kw = {"sleep": IO_SLEEP} if io else {}
    first, second = ("W4-enqueue", "W4-io") if io else ("W1-enqueue", "W2-drain")
    services.reset_state(a.broker)
    enqueue_timed(u, a, base(u, a, rep, n=n, workload=first), n, **kw)
    time.sleep(0.5)
    rec, mem = base(u, a, rep, n=n, workload=second), None
    ts = time.perf_counter()
    with worker(u, a, rec, second) as w:
        t_done, t_first, c, error = wait_count(n, a.timeout, w, a.stall)
        rec["done"] = c
        if error:
            return failed(rec, u, a, error)
        wall = t_done - ts
        steady = (n - 1) / (t_done - t_first) if t_done > t_first else None
        rec.update(seconds=round(wall, 3), rate=round(n / wall, 1),
                   startup_s=round(t_first - ts, 3), steady_rate=steady and round(steady, 1))
        if not io:
            time.sleep(3.0)
            mem = w.memory()
            after = count()
            if after != n:
                rec["count_after_3s"] = after  # more than N: some task ran twice
    if mem:
        out(base(u, a, rep, n=n, workload="mem-idle-after-W2", **mem))


def io_once(u, a, rep):
    drain_once(u, a, rep, io=True)


# -- W3 latency and start to first task ---------------------------------------------------------

def latency_once(u, a, rep):
    rec = base(u, a, rep, n=a.count, target_rate=a.rate, workload="W3-latency")
    services.reset_state(a.broker)
    with worker(u, a, rec, "latency") as w:
        for _ in range(WARM_UP):
            u.enqueue()
        _, _, _, error = wait_count(WARM_UP, a.timeout, w, a.stall)
        if error:
            return failed(rec, u, a, "warm-up: " + error)
        time.sleep(1.0)
        r = common.counter()
        r.delete(common.COUNT_KEY, common.LAT_KEY)
        period = 1.0 / a.rate
        t0 = time.perf_counter()
        for i in range(a.count):
            time.sleep(max(0.0, t0 + i * period - time.perf_counter()))
            u.enqueue(ts=time.time())
        t_pub = time.perf_counter() - t0
        _, _, _, error = wait_count(a.count, a.timeout, w, a.stall)
        lat = sorted(float(x) * 1000.0 for x in r.lrange(common.LAT_KEY, 0, -1))
        rec.update(samples=len(lat), achieved_rate=round(a.count / t_pub, 1))
        if lat:
            rec.update(p50_ms=round(pct(lat, 50), 2), p95_ms=round(pct(lat, 95), 2),
                       p99_ms=round(pct(lat, 99), 2), max_ms=round(lat[-1], 2),
                       mean_ms=round(sum(lat) / len(lat), 2))
        if error:
            failed(rec, u, a, error)


def startup_once(u, a, rep):
    """One task waits in an idle queue; time from the worker command's start to its completion."""
    rec = base(u, a, rep, n=1, workload="startup")
    services.reset_state(a.broker)
    u.enqueue()
    time.sleep(0.5)
    ts = time.perf_counter()
    with worker(u, a, rec, "startup") as w:
        t_done, _, _, error = wait_count(1, a.timeout, w, a.stall)
        if error:
            return failed(rec, u, a, error)
        rec["startup_s"] = round(t_done - ts, 3)


ONCE = {"drain": drain_once, "io": io_once, "latency": latency_once, "startup": startup_once}


def run_workload(a):
    names = chosen(a)
    todo = systems.units(names, a.cmd, a.variant)
    clients = {name: SYSTEMS[name].enqueue() for name in names}
    for rep in range(a.repeat):
        for name, variant in rotation(todo, rep):
            ONCE[a.cmd](Unit(name, variant, clients[name]), a, rep)


def chosen(a):
    """The systems named by --system that run on --broker and --db (all of them must)."""
    names = systems.names(a.system)
    unsupported = [n for n in names if not SYSTEMS[n].supports(a.broker, a.db)]
    if a.system == "all":
        return [n for n in names if n not in unsupported]
    if unsupported:
        sys.exit(f"bench: {', '.join(unsupported)} cannot run on {a.broker} with --db {a.db}")
    return names


# -- the machine: noise and versions ------------------------------------------------------------

def noise(a):
    """How loud the machine is: the CoV of a fixed CPU loop, and Redis round trips."""
    def spin():
        t, s = time.perf_counter(), 0
        for i in range(2_000_000):
            s += i * i
        return time.perf_counter() - t

    loops = [spin() for _ in range(15)]
    r = services.redis_at(common.COUNTER_URL)
    pings = []
    for _ in range(2000):
        t = time.perf_counter()
        r.ping()
        pings.append((time.perf_counter() - t) * 1e6)
    pings.sort()
    out({"system": "machine", "workload": "noise", "cpu_loop_median_s": round(median(loops), 4),
         "cpu_loop_min_s": round(min(loops), 4), "cpu_loop_max_s": round(max(loops), 4),
         "cpu_loop_cov_pct": round(100 * statistics.pstdev(loops) / statistics.mean(loops), 2),
         "redis_ping_p50_us": round(pct(pings, 50), 1),
         "redis_ping_p99_us": round(pct(pings, 99), 1)})


def git(*args):
    return subprocess.run(["git", "-C", REPO, *args], capture_output=True, text=True).stdout.strip()


def meta(a):
    from importlib.metadata import PackageNotFoundError, version

    pk = {}
    for name in ("django-tasks-q", "celery", "kombu", "billiard", "amqp", "redis", "dramatiq",
                 "pika", "huey", "django", "django-tasks", "django-tasks-db", "psycopg", "psutil"):
        with contextlib.suppress(PackageNotFoundError):
            pk[name] = version(name)
    out({"system": "machine", "workload": "meta", "python": sys.version.split()[0],
         "ncpu": os.cpu_count(), "packages": pk, "servers": services.server_versions(),
         "commit": git("rev-parse", "--short", "HEAD") or None,
         "dirty": bool(git("status", "--porcelain", "--", "django_tasks_q")), "db": a.db})


# -- everything ----------------------------------------------------------------------------------

def matrix_plan(a):
    """The commands for the table: per broker, each workload for every system that runs there."""
    selected = systems.names(a.system)
    plan = [["noise"], ["meta"]]
    for broker in a.brokers.split(","):
        names = [n for n in selected if SYSTEMS[n].supports(broker, a.db)]
        for wl in a.workloads.split(","):
            for group, load in latency_groups(names, wl, a):
                plan.append([wl, "--broker", broker, "--system", ",".join(group), *load])
    return [*plan, ["noise"]]


def latency_groups(names, wl, a):
    """Systems that cannot take the latency rate (W2 capacity under it) get their own, lower."""
    slow = [n for n in names if wl == "latency" and SYSTEMS[n].latency_load]
    fast = [n for n in names if n not in slow]
    groups = [(fast, [])] if fast else []
    for n in slow:
        rate, many = SYSTEMS[n].latency_load
        load = ["--rate", f"{min(a.rate, rate):g}", "--count", str(min(a.count, many))]
        groups.append(([n], load))
    return groups


def matrix(a):
    opts = ["--db", a.db, "--repeat", str(a.repeat), "--out", OUT_FILE, "--timeout", str(a.timeout),
            "--stall", str(a.stall), "--rate", f"{a.rate:g}", "--count", str(a.count)]
    opts += ["-n", str(a.n)] if a.n else []
    opts += ["--variant", a.variant] if a.variant else []
    services.setup_db(a.db)
    for cmd in matrix_plan(a):
        print(f"# {' '.join(cmd)}", file=sys.stderr, flush=True)
        # Options given twice: the later (the plan's own --rate/--count) wins.
        full = [PY, os.path.join(HERE, "run.py"), cmd[0], *opts, *cmd[1:]]
        if subprocess.run(full).returncode:
            print(f"# FAILED: {' '.join(cmd)}", file=sys.stderr, flush=True)


def parser():
    opts = argparse.ArgumentParser(add_help=False)
    opts.add_argument("--broker", default="redis", choices=BROKERS)
    opts.add_argument("--db", default="postgres", choices=("postgres", "sqlite"),
                      help="the Django database (and so the django:// broker's)")
    opts.add_argument("--system", default="all",
                      help=f"all, or a comma-separated list of {', '.join(SYSTEMS)}")
    opts.add_argument("--variant", help="run this variant of every chosen system")
    opts.add_argument("-n", type=int, default=0, help="tasks per repetition (drain 20000, io 2000)")
    opts.add_argument("--repeat", type=int, default=3)
    opts.add_argument("--count", type=int, default=2000, help="latency: tasks published")
    opts.add_argument("--rate", type=float, default=200.0, help="latency: tasks published per s")
    opts.add_argument("--timeout", type=float, default=540.0, help="seconds allowed for one drain")
    opts.add_argument("--stall", type=float, default=60.0,
                      help="give up after this many seconds without a completed task")
    opts.add_argument("--out", help="append JSON lines here (default results/<date>.jsonl)")
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    setup = sub.add_parser("setup", parents=[opts], help="create the bench database and tables")
    setup.add_argument("--fresh", action="store_true", help="drop and recreate it first")
    sub.add_parser("drain", parents=[opts], help="W1 + W2 + idle memory")
    sub.add_parser("io", parents=[opts], help="W4: tasks sleeping 20 ms, concurrency 8")
    sub.add_parser("latency", parents=[opts], help="W3")
    sub.add_parser("startup", parents=[opts], help="start command to the first completed task")
    sub.add_parser("noise", parents=[opts], help="CPU loop CoV and Redis PING round trips")
    sub.add_parser("meta", parents=[opts], help="versions of packages and servers, commit")
    m = sub.add_parser("matrix", parents=[opts], help="every workload, system and broker")
    m.add_argument("--brokers", default=",".join(BROKERS))
    m.add_argument("--workloads", default=",".join(WORKLOADS))
    s = sub.add_parser("summarize", help="markdown tables of medians and ratios")
    s.add_argument("files", nargs="*")
    return ap


def compile_sources():
    """Write the bytecode of this checkout's package and of the bench's modules, as pip does
    when it installs a package (as every peer is installed). Otherwise, from a fresh checkout
    or with PYTHONDONTWRITEBYTECODE set, every worker process would compile them again as it
    starts, and count that in its start-up."""
    import compileall

    for path in (os.path.join(REPO, "django_tasks_q"), HERE):
        compileall.compile_dir(path, quiet=1)


def main():
    global OUT_FILE
    a = parser().parse_args()
    if a.cmd == "summarize":
        return summarize(a)
    if a.cmd == "setup":
        return services.setup_db(a.db, a.fresh)
    # A matrix gets a file of its own, so summarize (newest file) shows that run alone.
    stamp = time.strftime("%Y%m%d-%H%M%S-matrix" if a.cmd == "matrix" else "%Y%m%d")
    OUT_FILE = a.out or os.path.join(HERE, "results", stamp + ".jsonl")
    os.makedirs(os.path.dirname(OUT_FILE), exist_ok=True)
    if a.cmd == "noise":
        return noise(a)
    if a.cmd == "matrix":
        return matrix(a)
    if a.cmd != "meta":
        compile_sources()
        services.setup_db(a.db)
    services.configure(a.broker, a.db)
    if a.cmd == "meta":
        return meta(a)
    with services.exclusive():
        if a.broker == "amqp":
            services.drop_amqp_queues()
        run_workload(a)


if __name__ == "__main__":
    main()
