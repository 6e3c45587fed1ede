"""Test helper: run the worker's real consumer in the test's own thread until enough jobs end."""

from __future__ import annotations

import threading

from django_tasks_q.execute import Outcome
from django_tasks_q.worker.consumer import Consumer
from django_tasks_q.worker.pool import Job


def run_consumer(consumer: Consumer, expected: int,
                 timeout: float) -> list[tuple[Job, Outcome]]:
    """Start ``consumer``'s pool and consume until ``expected`` jobs finished (warm stop) or
    ``timeout`` seconds passed (cold stop); the finished jobs with their outcomes, in order."""
    done: list[tuple[Job, Outcome]] = []
    pool = consumer.pool
    settle = consumer.on_done

    def on_done(job: Job, outcome: Outcome) -> None:
        done.append((job, outcome))
        settle(job, outcome)
        if len(done) >= expected:
            consumer.stopping = True

    consumer.on_done = on_done  # type: ignore[method-assign]
    pool.on_done = on_done
    timer = threading.Timer(timeout, lambda: setattr(consumer, "cold", True))
    timer.start()
    pool.start()
    try:
        consumer.run()
    finally:
        timer.cancel()
        pool.stop()
    return done
