"""The task the fault-injection workers run: start, sleep, finish, each written to the ledger."""

from __future__ import annotations

import time
from typing import Any

from django_tasks_q import task

from .. import ledger


# results="all": every finished run also leaves a SUCCESS row, which the tests cross-check.
@task(name=ledger.WORK, bind=True, results="all")
def work(self: Any, n: int, seconds: float) -> int:
    """Record a start, take ``seconds``, record a finish; returns ``n``."""
    ledger.record("start", self.request.id)
    time.sleep(seconds)
    ledger.record("finish", self.request.id)
    return n
