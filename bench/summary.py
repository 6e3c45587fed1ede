"""``run.py summarize``: the results file(s) as one markdown table per broker, medians over the
repetitions, with dtq's ratio to Celery and to the best peer under each table."""
import glob
import json
import os
import statistics
from collections import defaultdict

from systems import BROKERS, HERE, SYSTEMS

DEFAULT_RATE = 200.0
MEMORY = "mem-idle-after-W2"
# (name, workload, field, higher is better): every figure the table shows and the ratios cover.
FIGURES = [
    ("W1 enqueue/s", "W1-enqueue", "rate", True),
    ("W2 drain/s", "W2-drain", "rate", True),
    ("W2 steady/s", "W2-drain", "steady_rate", True),
    ("W2 startup s", "W2-drain", "startup_s", False),
    ("W3 p50 ms", "W3-latency", "p50_ms", False),
    ("W3 p95 ms", "W3-latency", "p95_ms", False),
    ("W3 p99 ms", "W3-latency", "p99_ms", False),
    ("W4 io/s", "W4-io", "rate", True),
    ("W4 steady/s", "W4-io", "steady_rate", True),
    ("idle RSS MiB", MEMORY, "rss_mib", False),
    ("idle PSS MiB", MEMORY, "pss_mib", False),
    ("idle USS MiB", MEMORY, "uss_mib", False),
    ("start to first task s", "startup", "startup_s", False),
]
SIZED = {"W2-drain": "drain", "W4-io": "io", "W3-latency": "latency"}  # workload -> command
COLUMNS = ["system (variant)", "W1 enqueue/s", "W2 drain/s (steady, startup s)",
           "W3 p50 / p95 / p99 ms", "W4 io/s (steady)", "idle RSS / PSS / USS MiB (procs)",
           "start to first task s"]


def median(xs):
    return statistics.median(xs) if xs else None


def fmt(x):
    if x is None:
        return "—"
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def triple(values):
    values = list(values)
    return "—" if all(v is None for v in values) else " / ".join(fmt(v) for v in values)


def load(files):
    recs = []
    for fn in files:
        with open(fn) as f:
            recs += [json.loads(line) for line in f if line.strip()]
    return recs


def where(rec):
    return rec["broker"] + (f" ({rec.get('db')})" if rec["broker"] == "django" else "")


def size(rec):
    return rec.get("n") or 0, rec.get("target_rate") or 0


class Row:
    """One system (variant) on one broker: its records by workload, the largest size of each."""

    def __init__(self, system, variant, recs):
        self.system, self.variant = system, variant
        by_wl = defaultdict(list)
        for r in recs:
            by_wl[r["workload"]].append(r)
        self.recs = {}
        for wl, rs in by_wl.items():  # a file holding a smoke run and a full one: the full one
            biggest = max(size(r) for r in rs)
            self.recs[wl] = [r for r in rs if size(r) == biggest]

    @property
    def label(self):
        return f"{SYSTEMS[self.system].label} ({self.variant})"

    def ok(self, workload):
        return [r for r in self.recs.get(workload, []) if "error" not in r]

    def med(self, workload, field):
        return median([r[field] for r in self.ok(workload) if r.get(field) is not None])

    def failures(self):
        return [r for rs in self.recs.values() for r in rs if "error" in r]

    def latency_rate(self):
        return next((r["target_rate"] for r in self.ok("W3-latency")), None)

    def cells(self):
        m = self.med
        w3 = triple(m("W3-latency", f) for f in ("p50_ms", "p95_ms", "p99_ms"))
        if self.latency_rate() not in (None, DEFAULT_RATE):
            w3 += f" @{self.latency_rate():g}/s"
        w2, w4 = fmt(m("W2-drain", "rate")), fmt(m("W4-io", "rate"))
        if self.ok("W2-drain"):
            w2 += f" ({fmt(m('W2-drain', 'steady_rate'))}, {fmt(m('W2-drain', 'startup_s'))} s)"
        if self.ok("W4-io"):
            w4 += f" ({fmt(m('W4-io', 'steady_rate'))})"
        mem = triple(m(MEMORY, f) for f in ("rss_mib", "pss_mib", "uss_mib"))
        if self.ok(MEMORY):
            mem += f" ({fmt(m(MEMORY, 'procs'))})"
        return [self.label, fmt(m("W1-enqueue", "rate")), w2, w3, w4, mem,
                fmt(m("startup", "startup_s"))]


def row_order():
    """SYSTEMS' order, then each system's variants in the order it lists them."""
    keys = [(s, v) for s, spec in SYSTEMS.items() for v in spec.variants]
    return {k: i for i, k in enumerate(keys)}


def rows_by_broker(recs):
    grouped = defaultdict(lambda: defaultdict(list))
    for r in recs:
        if r.get("system") in SYSTEMS and r.get("variant"):
            grouped[where(r)][(r["system"], r["variant"])].append(r)
    order = row_order()
    result = {}
    for w in sorted(grouped, key=lambda w: (BROKERS.index(w.split()[0]), w)):
        keys = sorted(grouped[w], key=lambda k: order.get(k, 10**6))
        result[w] = [Row(s, v, grouped[w][(s, v)]) for s, v in keys]
    return result


def best(rows, workload, field, higher):
    """(value, row) of the best median among ``rows``, or (None, None)."""
    scored = [(r.med(workload, field), r) for r in rows]
    scored = [(v, r) for v, r in scored if v is not None]
    if not scored:
        return None, None
    pick = max if higher else min
    return pick(scored, key=lambda vr: vr[0])


def ratio_line(w, rows):
    """dtq's best variant against Celery's best and against the best of every other system."""
    dtq = [r for r in rows if r.system == "dtq"]
    parts = []
    for name, wl, field, higher in FIGURES:
        ours, ours_row = best(dtq, wl, field, higher)
        # Latency compares only at the publish rate dtq ran at.
        same = [r for r in rows if r.system != "dtq"
                and (wl != "W3-latency" or r.latency_rate() == ours_row.latency_rate())] \
            if ours_row else []
        theirs, _ = best([r for r in same if r.system == "celery"], wl, field, higher)
        top, top_row = best(same, wl, field, higher)
        if ours is None or top is None:
            continue
        vs_celery = f"{ours / theirs:.2f}× Celery, " if theirs else ""
        parts.append(f"{name} {vs_celery}{ours / top:.2f}× {top_row.label}")
    if parts:
        print(f"\nRatios on {w}, django-tasks-q to Celery and to the best peer, each at its best "
              "variant (rates: higher is better; ms, MiB, s: lower is better): "
              + "; ".join(parts) + ".")


def sizes_line(rows):
    seen = defaultdict(set)
    for row in rows:
        for wl, run in SIZED.items():
            for r in row.recs.get(wl, []):
                n, rate = size(r)
                seen[run].add(f"{n}" + (f" @{rate:g}/s" if rate else ""))
    print("\nSizes: " + "; ".join(f"{run} n={', '.join(sorted(seen[run]))}"
                                  for run in SIZED.values() if seen[run]) + ".")


def table(w, rows):
    print(f"\n### {w}\n")
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for row in rows:
        print("| " + " | ".join(row.cells()) + " |")
    sizes_line(rows)
    legend = "; ".join(f"{SYSTEMS[r.system].label} {r.variant} = "
                       f"{SYSTEMS[r.system].variants[r.variant].desc}" for r in rows)
    print(f"\nVariants: {legend}.")
    ratio_line(w, rows)
    for row in rows:
        for x in row.failures():
            print(f"\n* failed: {row.label} {x['workload']} rep {x.get('rep')} at {x['at']}: "
                  f"{x['error']}; left in broker: {x.get('pending')}")


def machine_lines(recs):
    for r in recs:
        if r.get("workload") == "meta":
            pk = ", ".join(f"{k} {v}" for k, v in r["packages"].items() if v)
            srv = ", ".join(f"{k} {v}" for k, v in r.get("servers", {}).items())
            print(f"Machine: Python {r['python']}, {r['ncpu']} CPUs; commit {r['commit']}"
                  f"{' with local changes' if r.get('dirty') else ''}; servers: {srv}; {pk}.\n")
        elif r.get("workload") == "noise":
            print(f"Noise at {r['at']}: CPU loop median {r['cpu_loop_median_s']} s, "
                  f"CoV {r['cpu_loop_cov_pct']}%; Redis PING p50 {r['redis_ping_p50_us']} µs, "
                  f"p99 {r['redis_ping_p99_us']} µs; load {r['load1']}.\n")


def newest():
    files = glob.glob(os.path.join(HERE, "results", "*.jsonl"))
    return [max(files, key=os.path.getmtime)] if files else []


def summarize(a):
    files = a.files or newest()
    if not files:
        raise SystemExit("bench: no results file")
    recs = load(files)
    print(f"Source: {', '.join(os.path.relpath(f) for f in files)}. "
          "Each cell: the median over the repetitions.\n")
    machine_lines(recs)
    for w, rows in rows_by_broker(recs).items():
        table(w, rows)
