"""The consumer's watchdog, on every broker: a subscription lost while the connection stays up.

The fault is the one the watchdog exists for: the consumer stops receiving (here its
subscription is cancelled behind its back) while the connection still works and the queue
fills up. The real worker consumer must notice, reconnect by itself and run what waits.
"""

from __future__ import annotations

import logging
import threading

import pytest

from django_tasks_q.execute import Outcome
from django_tasks_q.worker.consumer import Consumer
from django_tasks_q.worker.pool import Job, SoloPool

from .test_broker_contract import publish, qname, target  # noqa: F401 - fixtures

pytestmark = [pytest.mark.broker, pytest.mark.django_db(transaction=True)]

INTERVAL = 0.3  # the watchdog's interval in this test (10 s in a worker)
GIVE_UP = 30.0  # seconds before the test stops a consumer that never recovers


def test_watchdog_reconnects_a_consumer_that_receives_nothing(
        qname: str, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    caplog.set_level(logging.INFO, logger="django_tasks_q.worker")
    first = publish(qname, args=[1, 2])
    later: list[str] = []
    done: list[tuple[str, str]] = []
    pool = SoloPool(1, "watchdog", on_done=lambda j, o: None)
    consumer = Consumer([qname], pool, "watchdog", prefetch=4, watchdog_interval=INTERVAL)
    settle = consumer.on_done

    def on_done(job: Job, outcome: Outcome) -> None:
        done.append((job.msg.id, outcome.status))
        settle(job, outcome)
        if len(done) == 1:
            # The subscription goes away; the connection stays up. Then work arrives.
            assert consumer.kombu is not None
            consumer.kombu.cancel()
            later.extend(publish(qname, args=[i, 3]).id for i in range(3))
        elif len(done) == 4:
            consumer.stopping = True

    pool.on_done = on_done
    pool.start()
    timer = threading.Timer(GIVE_UP, lambda: setattr(consumer, "cold", True))
    timer.start()
    try:
        consumer.run()
    finally:
        timer.cancel()
    assert done == [(first.id, "SUCCESS")] + [(i, "SUCCESS") for i in later], caplog.text
    stalls = [r.getMessage() for r in caplog.records if "Received nothing" in r.getMessage()]
    assert len(stalls) == 1, caplog.text
    assert "3 message(s) wait in " + qname in stalls[0]
    assert any("Reconnected to" in r.getMessage() for r in caplog.records), caplog.text


def test_watchdog_leaves_an_idle_consumer_alone(
        qname: str, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    """An empty queue is not a stall: no reconnect however long nothing arrives."""
    caplog.set_level(logging.INFO, logger="django_tasks_q.worker")
    pool = SoloPool(1, "watchdog", on_done=lambda j, o: None)
    consumer = Consumer([qname], pool, "watchdog", prefetch=4, watchdog_interval=INTERVAL)
    pool.start()
    timer = threading.Timer(INTERVAL * 8, lambda: setattr(consumer, "stopping", True))
    timer.start()
    consumer.run()
    assert "Received nothing" not in caplog.text
    assert "Reconnected" not in caplog.text
