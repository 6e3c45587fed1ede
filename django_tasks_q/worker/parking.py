"""Processes: parking: messages due later wait in the database, not in a worker's memory."""

from __future__ import annotations

import json
import logging
from datetime import timedelta

from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from .. import client, message
from ..models import ParkedMessage

logger = logging.getLogger("django_tasks_q.worker")

#: A message due further away than this is parked; a nearer one is held in memory.
PARK_AFTER = 30.0
#: How long a worker has to publish the parked messages it claimed before others may.
CLAIM_SECONDS = 60
RELEASE_BATCH = 500
#: At most this many messages are parked in one transaction ...
PARK_BATCH = 200
#: ... collected for at most this many seconds after the first of them arrived.
PARK_COLLECT = 0.05


class Parking:
    """Parks messages and publishes them again once they are due."""

    def __init__(self, owner: str) -> None:
        self.owner = owner

    def park(self, msgs: list[message.TaskMessage]) -> None:
        """Store ``msgs`` until their eta, in one transaction committed before the caller
        acknowledges them. A message parked already (redelivered) is stored once."""
        rows = []
        for msg in msgs:
            if msg.eta is None:
                raise ValueError(f"task {msg.id} has no eta to wait for")
            body, headers, _ = message.encode(msg)
            rows.append(ParkedMessage(queue=msg.queue, task_id=msg.id, retries=msg.retries,
                                      due_at=msg.eta, headers=headers, body=body,
                                      priority=msg.priority))
        with transaction.atomic():
            ParkedMessage.objects.bulk_create(rows, ignore_conflicts=True)

    def release_due(self) -> int:
        """Publish the parked messages that are due; returns how many went out."""
        now = timezone.now()
        free = Q(claimed_until__isnull=True) | Q(claimed_until__lt=now)
        due = ParkedMessage.objects.filter(free, due_at__lte=now)
        ids = list(due.order_by("due_at").values_list("id", flat=True)[:RELEASE_BATCH])
        if not ids:
            return 0
        # One statement claims them: a row another worker claimed first is no longer free.
        ParkedMessage.objects.filter(free, id__in=ids).update(
            claimed_until=now + timedelta(seconds=CLAIM_SECONDS), claimed_by=self.owner)
        released: list[int] = []
        try:
            for row in ParkedMessage.objects.filter(id__in=ids, claimed_by=self.owner,
                                                    claimed_until__gt=now):
                msg = message.decode(row.headers, json.loads(row.body), queue=row.queue,
                                     priority=row.priority)
                # Due now: without its eta, a worker whose clock runs behind does not park it
                # a second time.
                msg.eta = None
                client.publish(msg, row.body)
                released.append(row.pk)
        finally:
            # What was published goes; the rest is claimed again once the claim runs out.
            ParkedMessage.objects.filter(id__in=released).delete()
        return len(released)
