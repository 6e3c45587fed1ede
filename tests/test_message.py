"""Celery protocol v2: what we build, and what we accept."""

from __future__ import annotations

import json
import pickle
from datetime import UTC, datetime, timedelta

import pytest

from django_tasks_q import execute, message
from django_tasks_q.states import TaskState


def test_round_trip_keeps_every_field() -> None:
    eta = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    sent = message.TaskMessage(id="i", name="n", args=[1], kwargs={"a": 2}, retries=3, eta=eta,
                               expires=eta + timedelta(hours=1), time_limit=60,
                               soft_time_limit=50, parent_id="p", root_id="r",
                               headers={"tenant": "t"})
    body, headers, props = message.encode(sent)
    assert props["correlation_id"] == "i"
    got = message.decode(headers, json.loads(body), queue="q", priority=5)
    assert (got.id, got.name, got.args, got.kwargs, got.retries) == ("i", "n", [1], {"a": 2}, 3)
    assert (got.eta, got.expires) == (eta, eta + timedelta(hours=1))
    assert (got.time_limit, got.soft_time_limit, got.parent_id, got.root_id) == (60, 50, "p", "r")
    assert (got.queue, got.priority, got.headers) == ("q", 5, {"tenant": "t"})


def test_what_crosses_the_pool_pipe_is_pickled_by_position_with_every_field() -> None:
    eta = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    msg = message.TaskMessage(id="i", name="n", args=[1], kwargs={"a": 2}, retries=3, eta=eta,
                              time_limit=60, soft_time_limit=50, group="g", group_index=2,
                              ignore_result=True, queue="q", priority=5, headers={"t": 1},
                              embed={**message.EMBED, "chain": [{"task": "x"}]})
    outcome = execute.Outcome(TaskState.FAILURE, retry_eta="soon", runtime=0.5, error="E: e",
                              retire=True, result_repr="r", exc_repr="e", traceback="tb",
                              follow=[(msg, "body")], unstored=("v", eta))
    for sent in (msg, outcome):
        data = pickle.dumps(sent)
        assert pickle.loads(data) == sent
        assert b"soft_time_limit" not in data and b"result_repr" not in data  # no field names


def test_celery_style_message_is_accepted() -> None:
    # The headers a Celery 5 client sends with send_task() (naive eta, extra stamping keys).
    headers = {"lang": "py", "task": "app.add", "id": "x", "shadow": None,
               "eta": "2030-01-01T00:00:00", "expires": None, "group": None,
               "group_index": None, "retries": 0, "timelimit": [None, None], "root_id": "x",
               "parent_id": None, "argsrepr": "(2, 3)", "kwargsrepr": "{}",
               "origin": "gen1@host", "ignore_result": False, "replaced_task_nesting": 0,
               "stamped_headers": None, "stamps": {}}
    got = message.decode(headers, [[2, 3], {}, message.EMBED])
    assert got.eta == datetime(2030, 1, 1, tzinfo=UTC)
    assert got.args == [2, 3] and "replaced_task_nesting" in got.headers


@pytest.mark.parametrize(("headers", "body", "why"), [
    ({}, [[], {}, {}], "headers 'task' and 'id' missing"),
    ({"task": "t", "id": "i"}, {"args": []}, r"body is not \[args, kwargs, embed\]"),
    ({"task": "t", "id": "i"}, ["a", {}, {}], "args must be a list"),
    ({"task": "t", "id": "i", "eta": "tomorrow"}, [[], {}, {}], "bad timestamp"),
])
def test_malformed_messages_are_named(headers: dict, body: object, why: str) -> None:
    with pytest.raises(message.MalformedMessage, match=why):
        message.decode(headers, body)
