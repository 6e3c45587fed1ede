"""End-to-end tests: an email backend for the workers that makes ``send_receipt`` slow or failing.

The example project reads ``EMAIL_BACKEND`` from the environment; the e2e workers point it here.
The recipient's address says what happens, so a test picks the behaviour per order:

- ``slow-<seconds>@…``: the send takes that long (a long-running task);
- ``down@…``: the mail server refuses the connection (``ConnectionRefusedError``, which
  ``send_receipt`` retries through ``autoretry_for=(ConnectionError,)``);
- ``crash@…``: the process sending it dies at once (``SIGKILL``), as on a segfault or the
  kernel's out-of-memory killer;
- anything else: sent at once.

Each send logs one line (``e2e-mail: …``) so the worker's log shows when a task started.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Sequence
from typing import Any

from django.core.mail.backends.base import BaseEmailBackend

logger = logging.getLogger("django_tasks_q.e2e_mail")


class Backend(BaseEmailBackend):
    """Sends nothing; sleeps or fails as the recipient asks."""

    def send_messages(self, email_messages: Sequence[Any]) -> int:
        sent = 0
        for email in email_messages:
            for address in email.recipients():
                local = address.split("@", 1)[0]
                if local == "crash":
                    logger.warning("e2e-mail: crashing on %s", address)
                    os.kill(os.getpid(), signal.SIGKILL)
                if local == "down":
                    logger.warning("e2e-mail: refusing %s", address)
                    raise ConnectionRefusedError(
                        f"mail server refused the connection for {address}")
                if local.startswith("slow-"):
                    seconds = float(local.removeprefix("slow-"))
                    logger.warning("e2e-mail: sending to %s takes %.1fs", address, seconds)
                    time.sleep(seconds)
                    logger.warning("e2e-mail: sent to %s", address)
            sent += 1
        return sent
