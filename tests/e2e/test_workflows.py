"""End-to-end: workflows (chain, group, chord, link, link_error) on real taskworker processes."""

from __future__ import annotations

import json
import os
import signal
from datetime import datetime
from typing import Any

import pytest

from django_tasks_q.canvas import Signature, chain, chord, group

from ..conftest import require
from .conftest import REDIS_DB, MakeProject, Project, wait_for, with_db
from .test_leases import SHORT_LEASES  # a dead worker's messages back within seconds

pytestmark = pytest.mark.e2e

TASKS = "testproject.testapp.tasks"
STOP = 10  # seconds a worker may take to exit after SIGTERM


def sig(project: Project, name: str, *args: Any, **kwargs: Any) -> Signature:
    """A signature of the example project's task ``name``, sent to the project's queue."""
    return Signature(f"{TASKS}.{name}", args, kwargs, queue=project.queue)


def apply(project: Project, workflow: Signature) -> dict[str, Any]:
    """Apply ``workflow`` in the producer; its handle: ``id``, group ``members``, ``parent``."""
    answer: dict[str, Any] = project.producer.call("apply_workflow", sig=workflow)
    return answer


def call(project: Project, handle_id: str, method: str, **kwargs: Any) -> dict[str, Any]:
    """``method(**kwargs)`` of a handle in the producer: ``{"value": …}`` or ``{"raised": …}``."""
    wait = float(kwargs.get("timeout") or 0) + 15
    answer: dict[str, Any] = project.producer.call("handle", timeout=wait, handle_id=handle_id,
                                                   method=method, kwargs=kwargs)
    return answer


def journal(project: Project, order: int) -> list[str]:
    """What the workflow tasks noted on ``order``, oldest first."""
    lines: list[str] = project.producer.call("order_lines", pk=order)
    return lines


def when(value: str | None) -> datetime:
    assert value, "timestamp missing"
    return datetime.fromisoformat(value)


def by_parent(project: Project, name: str, parent_id: str) -> list[dict[str, Any]]:
    """The rows of task ``name`` sent by task ``parent_id`` (a link, an errback)."""
    return [r for r in project.results(name=f"{TASKS}.{name}") if r["parent_id"] == parent_id]


def test_chains_groups_and_links_on_one_worker(project: Project) -> None:
    worker = project.worker(concurrency=2)
    order, chord_order = (project.create_order(f"{name}@wf.example")
                          for name in ("errors", "chord"))
    # Sent first: its slow member keeps the group unfinished for a while.
    grouped = apply(project, group([sig(project, "wf_slow", 0, 1.5)]
                                   + [sig(project, "wf_add", i, i) for i in range(1, 8)]))
    good = apply(project, chain(sig(project, "wf_add", 1, 2), sig(project, "wf_add", 3),
                                sig(project, "wf_double")))
    bad = apply(project, sig(project, "wf_add", 1, 2) | sig(project, "wf_fail_on", 3)
                | sig(project, "wf_double"))
    linked = project.producer.call("apply_async", name=f"{TASKS}.wf_add", args=[2, 3],
                                   queue=project.queue, link=sig(project, "wf_double"),
                                   link_error=sig(project, "wf_failed_id"))
    failing = project.producer.call(
        "apply_async", name=f"{TASKS}.wf_fail_on", args=[7, 7], queue=project.queue,
        link=sig(project, "wf_double"),
        link_error=[sig(project, "wf_failed_id"), sig(project, "wf_note_error", order_id=order)])
    chorded = apply(project, chord([sig(project, "wf_add", i, i) for i in range(3)],
                                   sig(project, "wf_collect", order_id=chord_order)))

    # A group: its handle sees the members finish, and gives their results in order.
    group_id, members = grouped["id"], grouped["members"]
    assert call(project, group_id, "ready") == {"value": False}
    assert call(project, group_id, "completed_count")["value"] < len(members)
    assert call(project, group_id, "get", timeout=20) == {
        "value": [0, 2, 4, 6, 8, 10, 12, 14]}, project.logs()
    assert call(project, group_id, "ready") == {"value": True}
    assert call(project, group_id, "successful") == {"value": True}
    assert call(project, group_id, "completed_count") == {"value": 8}
    rows = project.results(members)
    # Kept for the group although wf_add keeps failures only.
    assert sorted(r["task_id"] for r in rows) == sorted(members)
    assert {(r["status"], r["group_id"]) for r in rows} == {("SUCCESS", group_id)}

    # A chain: each result is the next step's first argument; the last step keeps its own.
    assert call(project, good["id"], "get", timeout=20) == {"value": 12}, project.logs()
    first, second = good["parent"]["parent"]["id"], good["parent"]["id"]
    [last] = project.results([good["id"]])
    assert (last["status"], last["result"], last["args"]) == ("SUCCESS", 12, [6])
    assert (last["root_id"], last["parent_id"]) == (first, second)
    assert project.results([first, second]) == []  # wf_add keeps failures only

    # A failing step: its failure is stored against it, and the step after it is not run
    # (its row says why, so waiting for the chain's result raises the failure).
    answer = call(project, bad["id"], "get", timeout=20)
    assert (answer.get("raised"), answer.get("message")) == ("ValueError", "3 is bad"), answer
    bad_first, bad_step, not_run = bad["parent"]["parent"]["id"], bad["parent"]["id"], bad["id"]
    rows_by_id = project.wait_results([bad_step, not_run])
    failed = rows_by_id[bad_step]
    assert (failed["status"], failed["task_name"], failed["args"]) == (
        "FAILURE", f"{TASKS}.wf_fail_on", [3, 3])
    assert failed["result"]["exc_type"] == "ValueError"
    assert "ValueError: 3 is bad" in failed["traceback"]
    assert (failed["root_id"], failed["parent_id"], failed["worker"]) == (
        bad_first, bad_first, worker.hostname)
    skipped = rows_by_id[not_run]
    assert (skipped["status"], skipped["task_name"], skipped["root_id"]) == (
        "FAILURE", f"{TASKS}.wf_double", bad_first)
    assert skipped["traceback"].startswith(f"Not run: {TASKS}.wf_fail_on[{bad_step}]")
    assert skipped["date_started"] is None

    # link: wf_double gets wf_add's result; link_error: nothing, since wf_add succeeded.
    doubled = wait_for(lambda: by_parent(project, "wf_double", linked), 20,
                       "the link of wf_add", project.logs)
    assert [(r["args"], r["result"], r["root_id"]) for r in doubled] == [([5], 10, linked)]

    # link_error: the errback sent with the failed task's id, and the one called where it
    # failed with its request and exception, each once; the link is not sent.
    noted = wait_for(lambda: by_parent(project, "wf_failed_id", failing), 20,
                     "the errback of wf_fail_on", project.logs)
    assert [(r["args"], r["result"], r["status"]) for r in noted] == [
        ([failing], failing, "SUCCESS")]
    assert project.wait_results([failing])[failing]["result"]["exc_type"] == "ValueError"

    # A chord on one worker: once the body is sent, it holds the members' results, and the
    # rows kept only for it (wf_add keeps failures only) are deleted.
    assert call(project, chorded["id"], "get", timeout=20) == {"value": [0, 2, 4]}
    assert project.results(chorded["parent"]["members"]) == []

    worker.signal(signal.SIGTERM)  # nothing is left to run once it stopped
    assert worker.wait_exit(STOP) == 0
    assert journal(project, order) == [f"wf_note_error {failing} ValueError: 7 is bad"]
    assert journal(project, chord_order) == ["wf_collect [0, 2, 4]"]
    assert by_parent(project, "wf_double", failing) == []
    assert by_parent(project, "wf_failed_id", linked) == []
    assert worker.count(rf"wf_double\[{not_run}\]") == 0
    assert len(project.results(name=f"{TASKS}.wf_failed_id")) == 1
    project.assert_empty()


def test_chords_on_two_workers_send_their_body_once(project: Project) -> None:
    first = project.worker("--prefetch-multiplier", "1", concurrency=2, ready=False)
    second = project.worker("--prefetch-multiplier", "1", concurrency=2)
    first.wait_ready()
    workers = (first, second)
    order, failed_order = (project.create_order(f"chord-{i}@wf.example") for i in (1, 2))
    # Twenty members of a quarter of a second each: both workers run them, two at a time each.
    body = apply(project, chord([sig(project, "wf_slow", i, 0.25) for i in range(20)],
                                sig(project, "wf_collect", order_id=order)))
    doomed_body = sig(project, "wf_collect", order_id=failed_order)
    doomed_body.on_error(sig(project, "wf_failed_id"))
    doomed_body.on_error(sig(project, "wf_note_error", order_id=failed_order))
    failing = apply(project, chord([sig(project, "wf_fail_on", i, 3) for i in range(6)],
                                   doomed_body))

    assert call(project, body["id"], "get", timeout=30) == {"value": list(range(20))}, (
        project.logs())
    members = body["parent"]["members"]
    rows = project.results(members)
    assert sorted(r["task_id"] for r in rows) == sorted(members)  # wf_slow keeps its results
    assert {r["worker"] for r in rows} == {first.hostname, second.hostname}
    spans = [(r["worker"], when(r["date_started"]), when(r["date_done"])) for r in rows]
    assert any(a[0] != b[0] and a[1] < b[2] and b[1] < a[2] for a in spans for b in spans), (
        "no two members ran at the same time on different workers")
    [body_row] = project.results([body["id"]])
    assert (body_row["status"], body_row["task_name"]) == ("SUCCESS", f"{TASKS}.wf_collect")
    assert body_row["parent_id"] in members  # sent by the member that completed the chord

    # A member failing for good fails the chord at once: the body is stored as a ChordError
    # (its errbacks run), the other members' ends change nothing.
    answer = call(project, failing["id"], "get", timeout=20)
    assert answer.get("raised") == "ChordError", answer
    bad_member = failing["parent"]["members"][3]
    cause = f"Dependency {TASKS}.wf_fail_on[{bad_member}] ended with ValueError: 3 is bad"
    assert answer["message"] == cause
    [failed_body] = project.results([failing["id"]])
    assert (failed_body["status"], failed_body["result"]["exc_type"]) == ("FAILURE", "ChordError")
    [bad_row] = project.results([bad_member])
    assert (bad_row["status"], bad_row["group_id"]) == ("FAILURE", failing["parent"]["id"])
    noted = wait_for(lambda: project.results(name=f"{TASKS}.wf_failed_id"), 10,
                     "the chord's errback", project.logs)
    assert [(r["args"], r["result"]) for r in noted] == [([failing["id"]], failing["id"])]

    for worker in workers:  # nothing is left to run once both stopped
        worker.signal(signal.SIGTERM)
    assert [w.wait_exit(STOP) for w in workers] == [0, 0]
    assert journal(project, order) == [f"wf_collect {list(range(20))}"]
    assert journal(project, failed_order) == [f"wf_note_error {failing['id']} ChordError: {cause}"]
    logs = first.log + second.log
    for member in members:
        assert logs.count(f"wf_slow[{member}] succeeded") == 1, f"{member} ran twice:\n{logs}"
    assert logs.count(f"wf_collect[{body['id']}] succeeded") == 1
    assert f"wf_collect[{failing['id']}] succeeded" not in logs
    assert len(project.results(name=f"{TASKS}.wf_failed_id")) == 1
    project.assert_empty()


def test_a_chord_outlives_a_worker_killed_while_running_a_member(project: Project) -> None:
    if project.broker != "amqp":
        project.extra_env["TASKS_Q_BROKER_OPTIONS"] = json.dumps(SHORT_LEASES)
    first = project.worker(concurrency=2, ready=False)
    second = project.worker(concurrency=2)
    first.wait_ready()
    order = project.create_order("killed@wf.example")
    # The slow member sleeps on its first delivery only, and notes on which worker it starts.
    header = [sig(project, "wf_slow", 0, 60, order_id=order)]
    header += [sig(project, "wf_add", i, i) for i in range(1, 6)]
    body = apply(project, chord(header, sig(project, "wf_collect", order_id=order)))
    slow_id = body["parent"]["members"][0]
    started = f"wf_slow {slow_id} started on "

    first_start = wait_for(lambda: [e for e in journal(project, order) if e.startswith(started)],
                           15, "the slow member to start", project.logs)
    doomed, rescuer = (first, second) if first_start == [started + first.hostname] else (
        second, first)
    assert first_start == [started + doomed.hostname]
    os.killpg(doomed.pid, signal.SIGKILL)  # the worker and its pool at once
    assert doomed.wait_exit(5) == -signal.SIGKILL

    assert call(project, body["id"], "get", timeout=30) == {"value": [0, 2, 4, 6, 8, 10]}, (
        project.logs())
    [body_row] = project.results([body["id"]])
    # Sent by the member that ended last, after the kill (the slow one, or another that the
    # dead worker held: they came back together).
    assert body_row["parent_id"] in body["parent"]["members"]
    assert body_row["worker"] == rescuer.hostname

    rescuer.signal(signal.SIGTERM)  # nothing is left to run once it stopped
    assert rescuer.wait_exit(STOP) == 0
    # The body has the members' results: the rows of those that keep nothing are gone, but
    # for a member the dead worker had run without acknowledging it, run again here after
    # the body was sent (its row is written again).
    left = {r["task_id"] for r in project.results(body["parent"]["members"][1:])}
    assert all(rescuer.count(rf"wf_add\[{task_id}\] succeeded") for task_id in left), left
    entries = journal(project, order)
    assert [e for e in entries if e.startswith("wf_slow")] == [
        started + doomed.hostname, started + rescuer.hostname]
    assert [e for e in entries if e.startswith("wf_collect")] == ["wf_collect [0, 2, 4, 6, 8, 10]"]
    assert rescuer.count(rf"wf_slow\[{slow_id}\] succeeded") == 1
    assert rescuer.count(rf"wf_collect\[{body['id']}\] succeeded") == 1
    assert doomed.count(rf"wf_collect\[{body['id']}\]") == 0
    project.assert_empty()


@pytest.mark.broker
@pytest.mark.parametrize("broker", ["redis", "amqp"])
def test_a_celery_clients_chain_runs_on_our_workers(broker: str,
                                                    make_project: MakeProject) -> None:
    from celery import Celery
    from celery import chain as celery_chain

    # On Redis in the database of the Celery interop tests: a Celery client's keys stay there.
    project = (make_project("redis", url=with_db(require("redis"), REDIS_DB + 1))
               if broker == "redis" else make_project("amqp"))
    worker = project.worker()
    app = Celery("e2e-client", broker=project.broker_url)
    # A Celery client declares the queue it sends to, as Celery does by default: as ours.
    add = f"{TASKS}.add"
    try:
        sent = celery_chain(app.signature(add, (1, 2), queue=project.queue),
                            app.signature(add, (3,), queue=project.queue),
                            app.signature(add, (4,), queue=project.queue)).apply_async()
    finally:
        app.close()
    ids = [sent.parent.parent.id, sent.parent.id, sent.id]

    rows = project.wait_results(ids)

    assert [(rows[i]["status"], rows[i]["args"], rows[i]["result"]) for i in ids] == [
        ("SUCCESS", [1, 2], 3), ("SUCCESS", [3, 3], 6), ("SUCCESS", [6, 4], 10)]
    assert [(rows[i]["root_id"], rows[i]["parent_id"]) for i in ids] == [
        (ids[0], ""), (ids[0], ids[0]), (ids[0], ids[1])]
    assert {rows[i]["worker"] for i in ids} == {worker.hostname}
    project.assert_empty()
