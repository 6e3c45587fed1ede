"""Workflows: signatures, chain, group, chord, map/chunks, links; their messages and outcomes."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from django_tasks_q import (
    AsyncResult,
    GroupResult,
    Signature,
    chain,
    chord,
    execute,
    group,
    message,
    results,
    signature,
    workflow,
)
from django_tasks_q.exceptions import ChordError, TaskRevokedError
from django_tasks_q.models import TaskGroup, TaskResult, TaskState
from django_tasks_q.testing import Captured, capture_tasks

from . import tasks
from .memory import drain

pytestmark = pytest.mark.django_db(transaction=True)

CELERY_KEYS = {"task", "args", "kwargs", "options", "subtask_type", "immutable", "chord_size"}


@pytest.fixture(autouse=True)
def _memory_broker(settings: Any) -> None:
    settings.TASKS_Q = {"BROKER_URL": "memory://"}
    drain()
    tasks.errors_seen.clear()


def _outcome(record: Captured) -> tuple[execute.Outcome, list[Any]]:
    """Run one captured message as a worker would; (its outcome, what follows it)."""
    outcome = execute.run(record.message, hostname="test")
    return outcome, workflow.follow_ups(record.message, outcome)


# -- signatures ------------------------------------------------------------------------------
def test_signature_is_celerys_dict_form() -> None:
    sig = tasks.add.s(2, y=3).set(queue="high", countdown=5)
    assert set(sig) == CELERY_KEYS
    assert sig == {"task": "tests.tasks.add", "args": [2], "kwargs": {"y": 3},
                   "options": {"queue": "high", "countdown": 5}, "subtask_type": None,
                   "immutable": False, "chord_size": None}
    assert json.loads(json.dumps(sig)) == sig
    assert signature(json.loads(json.dumps(sig))) == sig
    assert tasks.add.si(1, 2).immutable and repr(tasks.add.si(1, 2)) == "tests.tasks.add!(1, 2)"
    assert signature("tests.tasks.add", args=(1,)).args == [1]


def test_partial_arguments_go_first_unless_immutable() -> None:
    assert tasks.add.s(3).clone((4,)).args == [4, 3]
    assert tasks.add.si(3, 1).clone((4,)).args == [3, 1]
    assert tasks.add.s(5)(6) == 11  # called inline


def test_bad_input_is_refused_with_what_to_do() -> None:
    with pytest.raises(TypeError, match=r"Unknown option\(s\) \['bogus'\] for tests.tasks.add"):
        tasks.add.s(1).set(bogus=1)
    with pytest.raises(TypeError, match=r"argument 0 is a builtins.set"):
        tasks.add.s({1}, 2)
    with pytest.raises(TypeError, match="needs a body"):
        chord([tasks.add.s(1, 1)])
    with pytest.raises(ValueError, match="positive int"):
        tasks.multiply.chunks([(1, 2)], 0)
    with pytest.raises(TypeError, match="not a signature"):
        signature(42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="link and link_error take a signature"):
        tasks.add.apply_async((1, 2), link="tests.tasks.add")


# -- messages: Celery protocol v2 embed ------------------------------------------------------
def test_chain_sends_its_first_step_with_the_rest_embedded_last_first() -> None:
    result = chain(tasks.add.s(1, 2), tasks.add.s(3), tasks.total.si([9])).apply_async()
    [(headers, body, _)] = drain()
    args, kwargs, embed = body
    assert (headers["task"], args) == ("tests.tasks.add", [1, 2])
    assert embed["callbacks"] is None and embed["errbacks"] is None and embed["chord"] is None
    assert [step["task"] for step in embed["chain"]] == ["tests.tasks.total", "tests.tasks.add"]
    assert all(set(step) == CELERY_KEYS for step in embed["chain"])
    # Ids are given at once: the handle is the last step's, its parents the steps before.
    assert result.id == embed["chain"][0]["options"]["task_id"]
    assert result.parent is not None and result.parent.id == embed["chain"][1]["options"]["task_id"]
    assert result.parent.parent is not None and result.parent.parent.id == headers["id"]


def test_group_members_carry_group_id_and_index_and_the_group_is_recorded() -> None:
    handle = group(tasks.add.s(i, i) for i in range(3)).apply_async()
    sent = drain()
    assert isinstance(handle, GroupResult) and len(handle) == 3
    assert [h["group"] for h, _, _ in sent] == [handle.id] * 3
    assert [h["group_index"] for h, _, _ in sent] == [0, 1, 2]
    assert [h["id"] for h, _, _ in sent] == [r.id for r in handle.results]
    row = TaskGroup.objects.get(group_id=handle.id)
    assert row.size == 3 and row.task_ids == [r.id for r in handle.results] and not row.body_id
    assert GroupResult.restore(handle.id).results == handle.results
    with pytest.raises(LookupError, match="No group 'nope' is stored"):
        GroupResult.restore("nope")


def test_chord_members_carry_the_body_with_its_size() -> None:
    handle = chord([tasks.add.s(i, 1) for i in range(2)], tasks.total.s()).apply_async()
    sent = drain()
    bodies = [body[2]["chord"] for _, body, _ in sent]
    assert bodies[0] == bodies[1]
    assert bodies[0]["task"] == "tests.tasks.total" and bodies[0]["chord_size"] == 2
    assert bodies[0]["options"]["task_id"] == handle.id
    assert isinstance(handle.parent, GroupResult)
    assert {h["group"] for h, _, _ in sent} == {handle.parent.id}
    row = TaskGroup.objects.get(group_id=handle.parent.id)
    assert row.body_id == handle.id and row.size == 2 and not row.fired_by


def test_links_travel_as_callbacks_and_errbacks() -> None:
    tasks.add.apply_async((1, 2), link=tasks.multiply.s(10),
                          link_error=[tasks.note_failure.s(), tasks.note_failure_inline.s()])
    [(_, body, _)] = drain()
    embed = body[2]
    assert [s["task"] for s in embed["callbacks"]] == ["tests.tasks.multiply"]
    assert [s["task"] for s in embed["errbacks"]] == ["tests.tasks.note_failure",
                                                       "tests.tasks.note_failure_inline"]


def test_a_group_followed_by_a_task_is_a_chord() -> None:
    flow = group(tasks.add.s(1, 1), tasks.add.s(2, 2)) | tasks.total.s()
    assert isinstance(flow, chain) and isinstance(flow.tasks[0], chord)


# -- running: what follows a task ------------------------------------------------------------
def test_chain_passes_each_result_on_with_the_chain_root() -> None:
    with capture_tasks() as captured:
        result = (tasks.add.s(1, 2) | tasks.add.s(10) | tasks.multiply.s(2)).apply_async()
        captured.run()
    assert result.get(timeout=1) == 26
    first, second, third = captured
    assert second.args == [3, 10] and third.args == [13, 2]
    assert second.parent_id == first.task_id and third.parent_id == second.task_id
    assert third.message.root_id == second.message.root_id == first.task_id


def test_a_failing_step_stops_the_chain_and_is_stored_against_it() -> None:
    with capture_tasks() as captured:
        result = chain(tasks.add.s(1, 2), tasks.fail_on.s(3), tasks.multiply.s(3)).apply_async(
            link_error=tasks.note_failure.s())
        captured.run()
    names = [c.name for c in captured]
    assert names == ["tests.tasks.add", "tests.tasks.fail_on", "tests.tasks.note_failure"]
    failing = captured[1]
    row = TaskResult.objects.get(task_id=failing.task_id)
    assert row.status == TaskState.FAILURE and row.root_id == captured[0].task_id
    assert "ValueError: 3 is bad" in row.traceback
    assert captured[2].args == [failing.task_id]  # the errback hears which task failed
    # Waiting for the chain's result raises the failure rather than waiting forever.
    with pytest.raises(ValueError, match="3 is bad"):
        result.get(timeout=1)
    assert "Not run: tests.tasks.fail_on" in (result.traceback or "")


def test_link_runs_with_the_result_and_inline_errbacks_get_the_exception() -> None:
    with capture_tasks() as captured:
        ok = tasks.add.apply_async((1, 2), link=tasks.multiply.s(10))
        bad = tasks.fail_on.apply_async((1, 1), link_error=tasks.note_failure_inline.s())
        captured.run()
    assert [c.name for c in captured] == ["tests.tasks.add", "tests.tasks.fail_on",
                                          "tests.tasks.multiply"]
    assert captured[2].args == [3, 10] and captured[2].parent_id == ok.id
    assert tasks.errors_seen == [(bad.id, "ValueError('1 is bad')")]


def test_group_results_are_kept_in_errors_mode() -> None:
    with capture_tasks() as captured:
        handle = group(tasks.add.s(i, i) for i in range(4)).apply_async()
        assert not handle.ready() and handle.completed_count() == 0
        captured.run_one()
        assert handle.completed_count() == 1
        captured.run()
    assert handle.ready() and handle.successful() and not handle.failed()
    assert handle.get(timeout=1) == [0, 2, 4, 6]
    assert handle.results[1].get(timeout=1) == 2  # members wait, though add keeps only failures
    handle.forget()
    assert not TaskResult.objects.exists() and not TaskGroup.objects.exists()


def test_group_get_raises_a_members_failure_or_returns_it() -> None:
    with capture_tasks() as captured:
        handle = group(tasks.fail_on.s(1, 1), tasks.add.s(1, 1)).apply_async()
        captured.run()
    assert handle.failed()
    with pytest.raises(ValueError, match="1 is bad"):
        handle.get(timeout=1)
    failure, two = handle.get(timeout=1, propagate=False)
    assert isinstance(failure, ValueError) and two == 2
    with pytest.raises(results.TimeoutError, match="0 of 1 tasks finished within 0.1s"):
        GroupResult("g", [AsyncResult("never", kept=True)]).get(timeout=0.1)


def test_chord_body_gets_the_results_in_order_once_and_members_rows_go() -> None:
    with capture_tasks() as captured:
        handle = chord([tasks.add.s(i, 1) for i in range(3)], tasks.total.s()).apply_async()
        members = list(captured)
        # Members end in any order; only the last one sends the body.
        follows = [_outcome(m)[1] for m in reversed(members)]
        assert [len(f) for f in follows] == [0, 0, 1]
    [(body_msg, _)] = follows[2]
    assert body_msg.id == handle.id and body_msg.args == [[1, 2, 3]]
    assert body_msg.parent_id == members[0].task_id
    row = TaskGroup.objects.get(body_id=handle.id)
    assert row.fired_by == members[0].task_id and row.results == [1, 2, 3]
    # The members' rows were kept only for the body: they are gone, their values on the row.
    assert not TaskResult.objects.filter(task_id__in=[m.task_id for m in members]).exists()
    assert isinstance(handle.parent, GroupResult) and handle.parent.get(timeout=1) == [1, 2, 3]


def test_chord_member_delivered_again_does_not_send_the_body_twice() -> None:
    with capture_tasks() as captured:
        chord([tasks.add.s(i, 1) for i in range(2)], tasks.total.s()).apply_async()
        first, last = list(captured)
        assert _outcome(first)[1] == []
        assert len(_outcome(last)[1]) == 1
        # The first member's worker died before acking: it runs again, sends nothing.
        assert _outcome(first)[1] == []
        # The member that sent the body runs again (its worker died before acking, maybe
        # before publishing): the body goes again, with the same id and results.
        [(again, _)] = _outcome(last)[1]
    assert again.args == [[1, 2]] and again.id == TaskGroup.objects.get().body_id


def test_a_failing_member_fails_the_chord_at_once_and_runs_its_errbacks() -> None:
    body = tasks.total.s().on_error(tasks.note_failure.s())
    body.link_error(tasks.note_failure_inline.s())
    with capture_tasks() as captured:
        handle = chord([tasks.fail_on.s(i, 0) for i in range(3)], body).apply_async()
        failing = captured[0]
        outcome, follow = _outcome(failing)
    assert outcome.status == TaskState.FAILURE
    [(errback, _)] = follow
    assert errback.name == "tests.tasks.note_failure" and errback.args == [handle.id]
    assert tasks.errors_seen == [(handle.id, "ChordError('Dependency tests.tasks.fail_on["
                                 f"{failing.task_id}] ended with ValueError: 0 is bad')")]
    with pytest.raises(ChordError, match="ended with ValueError: 0 is bad"):
        handle.get(timeout=1)
    # The others finish later: the chord has ended, nothing more is sent.
    assert all(_outcome(m)[1] == [] for m in captured[1:3])


def test_an_expired_or_revoked_member_fails_the_chord() -> None:
    with capture_tasks() as captured:
        handle = chord([tasks.add.s(1, 1).set(expires=timezone.now() - timedelta(seconds=1)),
                        tasks.add.s(2, 2)], tasks.total.s()).apply_async()
        outcome, follow = _outcome(captured[0])
    assert outcome.status == TaskState.REVOKED and follow == []
    with pytest.raises(ChordError, match="TaskRevokedError"):
        handle.get(timeout=1)
    with capture_tasks() as captured:
        handle = chord([tasks.add.s(1, 1)], tasks.total.s()).apply_async()
        # As the worker does for a message revoked before it ran:
        ended = workflow.follow_ups(captured[0].message, execute.Outcome(TaskState.REVOKED))
    assert ended == []
    with pytest.raises(ChordError, match="was revoked"):
        handle.get(timeout=1)


def test_a_chain_after_a_chord_follows_its_body() -> None:
    with capture_tasks() as captured:
        result = chain(group(tasks.add.s(1, 1), tasks.add.s(2, 2)), tasks.total.s(),
                       tasks.multiply.s(10)).apply_async()
        captured.run()
    assert result.get(timeout=1) == 60
    assert [c.name for c in captured][-2:] == ["tests.tasks.total", "tests.tasks.multiply"]


def test_an_unsendable_return_value_is_stored_against_the_next_step() -> None:
    with capture_tasks() as captured:
        result = chain(tasks.add.s(1, 2), tasks.multiply.s(2)).apply_async()
        record = captured[0]
        outcome = execute.run(record.message)
        outcome.value = {1, 2}  # a set: JSON cannot carry it to the next step
        assert workflow.follow_ups(record.message, outcome) == []
    with pytest.raises(TypeError, match="builtins.set"):
        result.get(timeout=1)


def test_map_starmap_and_chunks() -> None:
    with capture_tasks() as captured:
        mapped = tasks.total.map([[1, 2], [3]]).apply_async()
        starred = tasks.multiply.starmap([(1, 2), (3, 4)]).apply_async()
        chunked = tasks.multiply.chunks([(i, i) for i in range(5)], 2).apply_async()
        assert [c.name for c in captured] == ["celery.map", "celery.starmap"] + [
            "celery.starmap"] * 3
        captured.run()
    assert mapped.get(timeout=1) == [3, 3]
    assert starred.get(timeout=1) == [2, 12]
    assert isinstance(chunked, GroupResult)
    assert chunked.get(timeout=1) == [[0, 1], [4, 9], [16]]


def test_eager_mode_runs_workflows_inline(settings: Any) -> None:
    settings.TASKS_Q = {"BROKER_URL": "memory://", "EAGER": True}
    assert chain(tasks.add.s(1, 2), tasks.add.s(3)).apply_async().get(timeout=1) == 6
    assert group(tasks.add.s(i, i) for i in range(3)).apply_async().get(timeout=1) == [0, 2, 4]
    assert chord([tasks.add.s(i, 1) for i in range(3)], tasks.total.s()).delay().get(timeout=1) == 6
    failed = chain(tasks.fail_on.s(1, 1), tasks.add.s(1)).apply_async()
    with pytest.raises(ValueError, match="1 is bad"):
        failed.get()
    assert drain() == []


def test_prune_takes_groups_with_their_members() -> None:
    group(tasks.add.s(1, 1)).apply_async()
    TaskGroup.objects.update(date_created=timezone.now() - timedelta(days=30))
    results.prune()
    assert not TaskGroup.objects.exists()


def test_public_names() -> None:
    import django_tasks_q

    assert django_tasks_q.Signature is Signature and django_tasks_q.signature is signature
    assert (django_tasks_q.chain, django_tasks_q.group, django_tasks_q.chord) == (
        chain, group, chord)
    assert django_tasks_q.GroupResult is GroupResult
    assert message.EMBED == {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    assert TaskRevokedError.__module__ == "django_tasks_q.exceptions"


def test_a_workflows_own_options_reach_its_tasks() -> None:
    group(tasks.add.s(1, 1), tasks.add.s(2, 2), queue="high").apply_async(priority=7)
    chord([tasks.add.s(1, 1)], tasks.total.s()).apply_async(queue="low")
    chain(tasks.add.s(1, 1), tasks.add.s(2)).apply_async(queue="low", countdown=60)
    assert [(h["task"], p) for h, _, p in drain("high")] == [("tests.tasks.add", 7)] * 2
    low = drain("low")
    assert [h["task"] for h, _, _ in low] == ["tests.tasks.add"] * 2
    assert low[0][0]["eta"] is None and low[1][0]["eta"] is not None
    assert drain() == []


def test_a_chord_inside_a_group_keeps_a_header_of_its_own() -> None:
    handle = group(chord([tasks.add.s(1, 1)], tasks.total.s()), tasks.add.s(2, 2)).apply_async()
    rows = {row.group_id: row for row in TaskGroup.objects.all()}
    assert len(rows) == 2 and rows[handle.id].size == 2 and not rows[handle.id].body_id
    [header] = [row for gid, row in rows.items() if gid != handle.id]
    assert header.size == 1 and header.body_id == handle.results[0].id
