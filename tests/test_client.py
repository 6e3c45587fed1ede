"""Enqueue side: argument checks, routing, on-commit publishing, message shape."""

from __future__ import annotations

import json

import pytest
from django.db import transaction

from django_tasks_q import client, message
from django_tasks_q.models import TaskResult
from testproject.testapp.models import Order

from . import tasks
from .memory import drain


@pytest.fixture(autouse=True)
def _empty_queues() -> None:
    for q in ("default", "high", "low"):
        drain(q)


def test_delay_publishes_protocol_v2_message() -> None:
    r = tasks.multiply.delay(6, 7)
    [(headers, body, _)] = drain()
    assert headers["task"] == "tests.tasks.multiply"
    assert headers["id"] == r.id == headers["root_id"]
    assert headers["lang"] == "py" and headers["retries"] == 0
    assert headers["timelimit"] == [None, None]
    assert body == [[6, 7], {}, message.EMBED]


def test_apply_async_options_land_in_headers() -> None:
    r = tasks.multiply.apply_async(args=(1,), kwargs={"y": 2}, countdown=30, expires=600,
                                   queue="low", priority=9, task_id="fixed-id",
                                   headers={"tenant": "acme"})
    assert r.id == "fixed-id"
    [(headers, body, _)] = drain("low")
    assert headers["eta"] and headers["expires"] and headers["tenant"] == "acme"
    parsed = message.decode(headers, body)
    assert parsed.eta is not None and parsed.expires is not None
    assert 25 < (parsed.eta - parsed.expires).total_seconds() + 600 < 35


def test_model_instance_argument_is_refused_naming_the_pk(db: None) -> None:
    order = Order.objects.create(customer_email="a@example.com")
    refused = rf"argument 0 is a Order model instance.*\.pk = {order.pk}"
    with pytest.raises(TypeError, match=refused):
        tasks.multiply.delay(order, 1)
    with pytest.raises(TypeError, match=r"keyword argument 'y' is a QuerySet.*values_list"):
        tasks.multiply.delay(1, y=Order.objects.all())
    assert drain() == []


def test_non_json_argument_is_refused() -> None:
    with pytest.raises(TypeError, match=r"argument 1 is a builtins.bytes, which JSON cannot"):
        tasks.multiply.delay(1, b"raw")
    with pytest.raises(TypeError, match=r"argument 0 is a builtins.set"):
        tasks.multiply.delay([1, {2}], 3)


def test_unknown_apply_async_option_is_refused() -> None:
    with pytest.raises(TypeError, match=r"Unknown apply_async option\(s\) \['countdwn'\]"):
        tasks.multiply.apply_async(args=(1, 2), countdwn=3)


def test_unknown_queue_is_refused_when_queues_are_explicit() -> None:
    with pytest.raises(client.UnknownQueue, match=r"'nowhere'.*default, high, low"):
        tasks.multiply.apply_async(args=(1, 2), queue="nowhere")


def test_routes_by_name_and_glob(settings: pytest.FixtureRequest) -> None:
    settings.TASKS_Q = {"BROKER_URL": "memory://", "QUEUES": ["default", "high", "low"],
                        "ROUTES": {"tests.tasks.multiply": "low",
                                   "tests.*": {"queue": "high", "priority": 3}}}
    assert client.route("tests.tasks.multiply", None, None, None) == ("low", None)
    assert client.route("tests.tasks.boom", None, None, None) == ("high", 3)
    assert client.route("other.x", "low", None, None) == ("low", None)
    assert client.route("other.x", None, None, None) == ("default", None)
    assert client.route("tests.tasks.boom", None, "low", 1) == ("low", 1)


def test_task_queue_option_routes() -> None:
    tasks.quiet.delay()
    assert [h["task"] for h, _, _ in drain("high")] == ["tests.tasks.quiet"]


@pytest.mark.django_db(transaction=True)
def test_enqueue_in_atomic_publishes_on_commit_only() -> None:
    with transaction.atomic():
        r = tasks.multiply.delay(1, 2)
        assert r.id
        assert drain() == []
    assert [h["id"] for h, _, _ in drain()] == [r.id]


@pytest.mark.django_db(transaction=True)
def test_rollback_never_publishes() -> None:
    with pytest.raises(RuntimeError), transaction.atomic():
        tasks.multiply.delay(1, 2)
        raise RuntimeError("rollback")
    assert drain() == []


@pytest.mark.django_db(transaction=True)
def test_enqueue_on_commit_can_be_turned_off(settings: pytest.FixtureRequest) -> None:
    settings.TASKS_Q = {"BROKER_URL": "memory://", "ENQUEUE_ON_COMMIT": False}
    with transaction.atomic():
        tasks.multiply.delay(1, 2)
        assert len(drain()) == 1


def test_send_task_by_name() -> None:
    r = client.send_task("elsewhere.tasks.thing", (1,), {"a": "b"}, queue="low")
    [(headers, body, _)] = drain("low")
    assert headers["task"] == "elsewhere.tasks.thing" and headers["id"] == r.id
    assert body[:2] == [[1], {"a": "b"}]


def test_body_is_plain_json() -> None:
    body = client.encode_body("t", [1, "x", None], {"k": [1.5, True]})
    assert json.loads(body) == [[1, "x", None], {"k": [1.5, True]}, message.EMBED]


def test_no_row_is_written_when_enqueueing(db: None) -> None:
    tasks.multiply.delay(1, 2)
    assert TaskResult.objects.count() == 0


@pytest.mark.django_db(transaction=True)
def test_on_django_broker_the_message_is_part_of_the_transaction(settings: pytest.FixtureRequest
                                                                 ) -> None:
    from django_tasks_q.models import QueueMessage

    settings.TASKS_Q = {"BROKER_URL": "django://"}
    with pytest.raises(RuntimeError), transaction.atomic():
        tasks.multiply.delay(1, 2)
        assert QueueMessage.objects.count() == 1  # written in the transaction, not after it
        raise RuntimeError("rollback")
    assert QueueMessage.objects.count() == 0
    with transaction.atomic():
        r = tasks.multiply.delay(3, 4)
    [row] = QueueMessage.objects.all()
    assert r.id in row.payload


def test_enqueue_during_an_outage_retries_briefly_then_raises(settings: pytest.FixtureRequest
                                                              ) -> None:
    import time

    from django_tasks_q.exceptions import EnqueueError

    # Nothing listens on port 1: every connection attempt is refused at once.
    settings.TASKS_Q = {"BROKER_URL": "redis://:s3cret@127.0.0.1:1/0"}
    start = time.monotonic()
    with pytest.raises(EnqueueError, match=r"Could not publish to redis://:\*\*@127.0.0.1:1/0"
                       ) as caught:
        tasks.multiply.delay(1, 2)
    assert 1 < time.monotonic() - start < 15  # retried, but not for long
    assert "s3cret" not in str(caught.value)
