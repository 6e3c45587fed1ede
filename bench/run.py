#!/usr/bin/env python
"""django-tasks-q against Celery, side by side, on redis, amqp and django:// (see README.md).

    python bench/run.py setup   [--db postgres|sqlite] [--fresh]
    python bench/run.py drain   --broker redis|amqp|django [--system dtq|celery|both]
                                [-n 20000] [--repeat 3] [--db postgres|sqlite]
    python bench/run.py latency --broker redis|amqp|django [--count 2000] [--rate 200]
    python bench/run.py matrix  [--db postgres|sqlite]   # drain + latency, both, every broker
    python bench/run.py summarize [FILE ...]             # markdown table, ratio dtq/celery

drain   = W1 (enqueue N into an idle queue, client tasks/s), W2 (start the worker command, time
          until the counter reaches N) and the idle memory of the worker tree 3 s later.
latency = W3 (running, warmed worker; --count tasks paced at --rate/s; p50/p95/p99 of
          start - enqueue).
With --system both the two systems alternate repetition by repetition. Every measurement is one
JSON line on stdout, also appended to results/<YYYYmmdd>.jsonl (or --out).
"""
import argparse
import contextlib
import glob
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
PY = sys.executable
sys.path[:0] = [HERE, REPO]

import common  # noqa: E402

SYSTEMS = {
    "dtq": {"label": "django-tasks-q", "queue": common.DTQ_QUEUE,
            "cmd": [PY, os.path.join(HERE, "manage.py"), "taskworker", "-c", "2", "-l", "WARNING"]},
    "celery": {"label": "celery", "queue": common.CELERY_QUEUE,
               "cmd": [PY, "-m", "celery", "-A", "celeryapp", "worker", "-P", "prefork", "-c", "2",
                       "--loglevel=WARNING"]},
}
BROKERS = ("redis", "amqp", "django")
OUT_FILE = None


def out(rec):
    rec = dict(rec, at=time.strftime("%Y-%m-%dT%H:%M:%S"), load1=round(os.getloadavg()[0], 2))
    line = json.dumps(rec)
    print(line, flush=True)
    if OUT_FILE:
        with open(OUT_FILE, "a") as f:
            f.write(line + "\n")


def median(xs):
    return statistics.median(xs) if xs else None


def pct(sorted_xs, p):
    """Nearest-rank percentile of an already sorted list."""
    return sorted_xs[max(0, math.ceil(p / 100.0 * len(sorted_xs)) - 1)] if sorted_xs else None


# -- environment: one broker and one database per driver process ---------------------------------

def database_url(db):
    return common.PG_DATABASE_URL if db == "postgres" else "sqlite:///" + common.SQLITE_PATH


def configure(broker, db):
    """Point this process, and the workers it starts, at ``broker`` and ``db``; set up Django."""
    urls = {"redis": common.REDIS_BROKER_URL, "amqp": common.AMQP_BROKER_URL, "django": "django://"}
    url = urls[broker]
    path = os.pathsep.join(p for p in (HERE, REPO, os.environ.get("PYTHONPATH")) if p)
    os.environ.update(BENCH_BROKER_URL=url, TASKS_Q_BROKER_URL=url, DATABASE_URL=database_url(db),
                      DJANGO_SETTINGS_MODULE="dtqbench.settings", PYTHONUNBUFFERED="1",
                      PYTHONPATH=path)
    common.BROKER_URL = url
    import django

    django.setup()


def worker_env(system, broker):
    env = dict(os.environ)
    if system == "celery" and broker != "django":
        env.pop("DJANGO_SETTINGS_MODULE")  # plain Celery, exactly as in the peer harness
    return env


def client(system):
    """The system's enqueue function, imported in THIS process (the one client)."""
    if system == "dtq":
        from dtqbench.tasks import enqueue
    else:
        from celeryapp import enqueue
    return enqueue


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
    env = dict(os.environ, DATABASE_URL=database_url(db))
    migrate = [PY, os.path.join(HERE, "manage.py"), "migrate", "--run-syncdb", "-v0"]
    if subprocess.run(migrate, env=env).returncode:
        sys.exit(f"bench: migrate failed on {db}; try `bench/run.py setup --db {db} --fresh`")


# -- state: reset, queue depth -------------------------------------------------------------------

def redis_at(url):
    import redis

    return redis.Redis.from_url(url)


def django_tables():
    from django_tasks_q.models import QueueMessage, TaskResult

    return [QueueMessage._meta.db_table, TaskResult._meta.db_table]


def reset_state(broker):
    """FLUSHDB the broker and counter dbs, purge our RabbitMQ queues, empty the django:// table."""
    redis_at(common.COUNTER_URL).flushdb()
    redis_at(common.REDIS_BROKER_URL).flushdb()
    if broker == "amqp":
        from kombu import Connection

        with Connection(common.AMQP_BROKER_URL) as conn:
            for q in (common.DTQ_QUEUE, common.CELERY_QUEUE):
                ch = conn.channel()
                with contextlib.suppress(Exception):  # not declared yet
                    ch.queue_purge(q)
                with contextlib.suppress(Exception):
                    ch.close()
    from django.db import connection

    with connection.cursor() as cur:
        if connection.vendor == "postgresql":
            cur.execute("TRUNCATE " + ", ".join(django_tables()))
        else:
            for table in django_tables():
                cur.execute(f"DELETE FROM {table}")


def pending(broker, queue):
    """Messages still in the broker for ``queue`` (for diagnosing stalls and losses)."""
    try:
        if broker == "redis":
            r = redis_at(common.REDIS_BROKER_URL)
            ready = sum(r.llen(k) for k in r.scan_iter(match=queue + "*") if r.type(k) == b"list")
            return {"ready": ready, "unacked": r.hlen("unacked")}
        if broker == "amqp":
            from kombu import Connection

            with Connection(common.AMQP_BROKER_URL) as conn:
                declared = conn.channel().queue_declare(queue=queue, passive=True)
                return {"ready": declared.message_count}
        from django_tasks_q.models import QueueMessage

        rows = QueueMessage.objects.filter(queue=queue)
        return {"rows": rows.count(), "claimed": rows.exclude(claimed_by="").count()}
    except Exception as exc:  # noqa: BLE001
        return {"error": f"{type(exc).__name__}: {exc}"}


# -- worker processes ---------------------------------------------------------------------------

class Worker:
    """One system's worker command in its own session, its output appended to logs/<tag>.log."""

    def __init__(self, system, broker, tag):
        os.makedirs(os.path.join(HERE, "logs"), exist_ok=True)
        self.log_path = os.path.join(HERE, "logs", f"{tag}.log")
        cmd = SYSTEMS[system]["cmd"]
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== {time.strftime('%H:%M:%S')} {' '.join(cmd)}\n".encode())
            self.log_offset = log.tell()
            self.proc = subprocess.Popen(cmd, cwd=HERE, env=worker_env(system, broker), stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)

    def tree(self):
        import psutil

        try:
            root = psutil.Process(self.proc.pid)
            return [root] + root.children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def memory(self):
        """Summed RSS, PSS and USS of the worker's process tree, MiB."""
        import psutil

        rss = pss = uss = n = 0
        for p in self.tree():
            try:
                mi = p.memory_full_info()
            except psutil.Error:
                continue
            rss, pss, uss, n = rss + mi.rss, pss + getattr(mi, "pss", 0), uss + mi.uss, n + 1
        mib = 1024.0 * 1024.0
        return {"procs": n, "rss_mib": round(rss / mib, 1), "pss_mib": round(pss / mib, 1),
                "uss_mib": round(uss / mib, 1)}

    def alive(self):
        return self.proc.poll() is None

    def log_since_start(self):
        with open(self.log_path, "rb") as f:
            f.seek(self.log_offset)
            return f.read().decode(errors="replace").splitlines()

    def problems(self, tail=25):
        """Error lines this run wrote, and the log's tail when there were any."""
        lines = self.log_since_start()
        bad = [ln for ln in lines if any(w in ln for w in ("ERROR", "CRITICAL", "Traceback"))]
        return {"log_errors": len(bad), "log_tail": lines[-tail:]} if bad else {}

    def stop(self, grace=20.0):
        """SIGTERM to the root (warm shutdown), then SIGKILL to its own process group."""
        import psutil

        members = self.tree()
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        deadline = time.time() + grace
        while self.alive() and time.time() < deadline:
            time.sleep(0.1)
        stopped_in_time = not self.alive()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # the group is the pid we started
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        for m in members:
            try:
                if m.is_running() and m.status() != psutil.STATUS_ZOMBIE:
                    m.kill()
            except psutil.Error:
                pass
        return stopped_in_time


def wait_count(target, timeout, worker=None, stall=60.0, poll=0.01):
    """Poll the counter until it reaches ``target``; (t_done, t_first, count, error)."""
    r = common.counter()
    t_first = None
    start = t_change = time.perf_counter()
    last = 0
    while True:
        c = int(r.get(common.COUNT_KEY) or 0)
        now = time.perf_counter()
        if c and t_first is None:
            t_first = now
        if c >= target:
            return now, t_first, c, None
        if c != last:
            last, t_change = c, now
        error = None
        if worker is not None and not worker.alive():
            error = f"worker exited with code {worker.proc.returncode}"
        elif now - t_change > stall:
            error = f"no progress for {stall:.0f}s"
        elif now - start > timeout:
            error = f"timeout after {timeout:.0f}s"
        if error:
            return None, t_first, c, f"{error}, counter={c}/{target}"
        time.sleep(poll)


def rotation(systems, rep):
    """Alternate which system goes first, so drift on a busy machine hits both alike."""
    return systems if rep % 2 == 0 else systems[::-1]


# -- W1 + W2 + idle memory ------------------------------------------------------------------------

def drain_once(system, a, rep, enqueue):
    n, queue = a.n, SYSTEMS[system]["queue"]
    base = {"system": system, "broker": a.broker, "db": a.db, "n": n, "rep": rep}
    reset_state(a.broker)
    t0 = time.perf_counter()
    for _ in range(n):
        enqueue()
    t1 = time.perf_counter()
    rec = dict(base, workload="W1-enqueue", seconds=round(t1 - t0, 3), rate=round(n / (t1 - t0), 1))
    if a.broker == "amqp":  # the time until the broker shows all N (Celery publishes unconfirmed)
        deadline = time.time() + 60
        while (pending(a.broker, queue).get("ready") or 0) < n and time.time() < deadline:
            time.sleep(0.05)
        rec["visible_rate"] = round(n / (time.perf_counter() - t0), 1)
    out(rec)
    time.sleep(0.5)
    ts = time.perf_counter()
    w = Worker(system, a.broker, f"{system}-{a.broker}")
    try:
        t_done, t_first, c, error = wait_count(n, a.timeout, w, a.stall)
        rec = dict(base, workload="W2-drain", done=c)
        mem = None
        if error:
            rec.update(error=error, pending=pending(a.broker, queue))
        else:
            wall = t_done - ts
            steady = (n - 1) / (t_done - t_first) if t_done > t_first else None
            rec.update(seconds=round(wall, 3), rate=round(n / wall, 1),
                       startup_s=round(t_first - ts, 3), steady_rate=steady and round(steady, 1))
            time.sleep(3.0)
            mem = w.memory()
            after = int(common.counter().get(common.COUNT_KEY) or 0)
            if after != n:
                rec["count_after_3s"] = after  # more than N: some task ran twice
        rec.update(w.problems())
    finally:
        rec["warm_stop"] = w.stop()
    out(rec)
    if mem:
        out(dict(base, workload="mem-idle-after-W2", **mem))


def run_drain(a):
    systems = ["dtq", "celery"] if a.system == "both" else [a.system]
    enqueue = {s: client(s) for s in systems}
    for rep in range(a.repeat):
        for system in rotation(systems, rep):
            drain_once(system, a, rep, enqueue[system])


# -- W3 latency -----------------------------------------------------------------------------------

def latency_once(system, a, rep, enqueue):
    base = {"system": system, "broker": a.broker, "db": a.db, "n": a.count,
            "target_rate": a.rate, "rep": rep}
    queue = SYSTEMS[system]["queue"]
    r = common.counter()
    reset_state(a.broker)
    w = Worker(system, a.broker, f"{system}-{a.broker}-lat")
    rec = dict(base, workload="W3-latency")
    try:
        warm = 20
        for _ in range(warm):
            enqueue()
        t_done, _, c, error = wait_count(warm, a.timeout, w, a.stall)
        if error:
            rec.update(error="warm-up: " + error, pending=pending(a.broker, queue), **w.problems())
            return
        time.sleep(1.0)
        r.delete(common.COUNT_KEY, common.LAT_KEY)
        period = 1.0 / a.rate
        t0 = time.perf_counter()
        for i in range(a.count):
            d = t0 + i * period - time.perf_counter()
            if d > 0:
                time.sleep(d)
            enqueue(ts=time.time())
        t_pub = time.perf_counter() - t0
        t_done, _, c, error = wait_count(a.count, a.timeout, w, a.stall)
        lat = sorted(float(x) * 1000.0 for x in r.lrange(common.LAT_KEY, 0, -1))
        rec.update(samples=len(lat), achieved_rate=round(a.count / t_pub, 1))
        if lat:
            rec.update(p50_ms=round(pct(lat, 50), 2), p95_ms=round(pct(lat, 95), 2),
                       p99_ms=round(pct(lat, 99), 2), max_ms=round(lat[-1], 2),
                       mean_ms=round(sum(lat) / len(lat), 2))
        if error:
            rec.update(error=error, pending=pending(a.broker, queue))
        rec.update(w.problems())
    finally:
        rec["warm_stop"] = w.stop()
        out(rec)


def run_latency(a):
    systems = ["dtq", "celery"] if a.system == "both" else [a.system]
    enqueue = {s: client(s) for s in systems}
    for rep in range(a.repeat):
        for system in rotation(systems, rep):
            latency_once(system, a, rep, enqueue[system])


# -- everything, and the summary --------------------------------------------------------------

def meta(a):
    from importlib.metadata import PackageNotFoundError, version

    pk = {}
    for name in ("celery", "kombu", "billiard", "amqp", "redis", "django", "psycopg", "psutil"):
        try:
            pk[name] = version(name)
        except PackageNotFoundError:
            pk[name] = None
    head = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True)
    out({"system": "machine", "workload": "meta", "python": sys.version.split()[0],
         "ncpu": os.cpu_count(), "packages": pk, "commit": head.stdout.strip() or None,
         "db": a.db})


def matrix(a):
    setup_db(a.db)
    meta(a)
    opts = ["--db", a.db, "--repeat", str(a.repeat), "--out", OUT_FILE, "--timeout", str(a.timeout),
            "--stall", str(a.stall)]
    plan = (("drain", ["-n", str(a.n)]),
            ("latency", ["--count", str(a.count), "--rate", str(a.rate)]))
    for broker in a.brokers.split(","):
        for wl, extra in plan:
            cmd = [PY, os.path.join(HERE, "run.py"), wl, "--broker", broker, "--system", "both"]
            cmd += extra + opts
            print(f"# {wl} --broker {broker}", file=sys.stderr, flush=True)
            if subprocess.run(cmd).returncode:
                print(f"# FAILED: {wl} --broker {broker}", file=sys.stderr, flush=True)


METRICS = [  # (workload, field, label, higher is better)
    ("W1-enqueue", "rate", "W1 enqueue, tasks/s", True),
    ("W2-drain", "rate", "W2 drain, tasks/s", True),
    ("W2-drain", "steady_rate", "W2 steady (first to last), tasks/s", True),
    ("W2-drain", "startup_s", "W2 startup to first task, s", False),
    ("W3-latency", "p50_ms", "W3 p50, ms", False),
    ("W3-latency", "p95_ms", "W3 p95, ms", False),
    ("W3-latency", "p99_ms", "W3 p99, ms", False),
    ("mem-idle-after-W2", "pss_mib", "idle PSS, MiB", False),
    ("mem-idle-after-W2", "rss_mib", "idle RSS, MiB", False),
    ("mem-idle-after-W2", "uss_mib", "idle USS, MiB", False),
]


def fmt(x):
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def summarize(a):
    files = a.files or sorted(glob.glob(os.path.join(HERE, "results", "*.jsonl")))[-1:]
    recs = []
    for fn in files:
        with open(fn) as f:
            recs += [json.loads(line) for line in f if line.strip()]
    groups = {}  # (broker, size, workload) -> system -> records
    for r in recs:
        if r.get("system") in SYSTEMS:
            where = r["broker"] + (f" ({r.get('db')})" if r["broker"] == "django" else "")
            size = f"n={r['n']}" + (f" @{r['target_rate']:g}/s" if "target_rate" in r else "")
            by_sys = groups.setdefault((where, size, r["workload"]), {})
            by_sys.setdefault(r["system"], []).append(r)
    print(f"Source: {', '.join(os.path.relpath(f) for f in files)}. "
          "Each cell: median (min..max; reps). Ratio = django-tasks-q / celery.\n")
    print("| broker | size | metric | django-tasks-q | celery | dtq/celery | better |")
    print("|---|---|---|---|---|---|---|")
    wheres = sorted({g[0] for g in groups}, key=lambda w: (BROKERS.index(w.split()[0]), w))
    for where in wheres:
        for wl, field, label, higher in METRICS:
            for size in sorted({g[1] for g in groups if g[0] == where and g[2] == wl}):
                by_sys, cells, meds = groups[(where, size, wl)], [], []
                for s in ("dtq", "celery"):
                    rs = by_sys.get(s, [])
                    xs = [x[field] for x in rs if x.get(field) is not None]
                    cell = "—"
                    if xs:
                        cell = f"{fmt(median(xs))} ({fmt(min(xs))}..{fmt(max(xs))}; {len(xs)})"
                    errs = sum(1 for x in rs if "error" in x)
                    cells.append(cell + (f" **{errs} failed**" if errs else ""))
                    meds.append(median(xs))
                ratio = f"{meds[0] / meds[1]:.2f}" if meds[0] and meds[1] else "—"
                print(f"| {where} | {size} | {label} | {cells[0]} | {cells[1]} | {ratio} | "
                      f"{'higher' if higher else 'lower'} |")
    for x in (x for rs in groups.values() for xs in rs.values() for x in xs if "error" in x):
        print(f"\n* failed: {x['system']} {x['broker']} {x['workload']} rep {x.get('rep')} "
              f"at {x['at']}: {x['error']}; left in broker: {x.get('pending')}")


def main():
    global OUT_FILE
    opts = argparse.ArgumentParser(add_help=False)
    opts.add_argument("--broker", default="redis", choices=BROKERS)
    opts.add_argument("--db", default="postgres", choices=("postgres", "sqlite"),
                      help="the Django database (and so the django:// broker's)")
    opts.add_argument("--system", default="both", choices=("dtq", "celery", "both"))
    opts.add_argument("-n", type=int, default=20000, help="drain: tasks per repetition")
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
    sub.add_parser("latency", parents=[opts], help="W3")
    m = sub.add_parser("matrix", parents=[opts], help="drain + latency, both systems, all brokers")
    m.add_argument("--brokers", default=",".join(BROKERS))
    s = sub.add_parser("summarize", help="markdown table of medians and ratios")
    s.add_argument("files", nargs="*")
    a = ap.parse_args()
    if a.cmd == "summarize":
        return summarize(a)
    if a.cmd == "setup":
        return setup_db(a.db, a.fresh)
    OUT_FILE = a.out or os.path.join(HERE, "results", time.strftime("%Y%m%d") + ".jsonl")
    os.makedirs(os.path.dirname(OUT_FILE), exist_ok=True)
    if a.cmd == "matrix":
        return matrix(a)
    setup_db(a.db)
    configure(a.broker, a.db)
    return run_drain(a) if a.cmd == "drain" else run_latency(a)


if __name__ == "__main__":
    main()
