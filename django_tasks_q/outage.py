"""Foundation: saying once that something keeps failing, and once that it works again.

Timers that retry every second would otherwise repeat the same warning for as long as an
outage lasts; the repeats go to DEBUG.
"""

from __future__ import annotations

import logging
from typing import Any


class Outage:
    """The state of one thing that can fail and come back (the database, the broker)."""

    def __init__(self, logger: logging.Logger, back: str) -> None:
        self.logger = logger
        self.back = back  # what is said when it works again
        self.down = False

    def failed(self, text: str, *args: Any) -> None:
        """It failed: a warning the first time, DEBUG while it stays down."""
        self.logger.log(logging.DEBUG if self.down else logging.WARNING, text, *args)
        self.down = True

    def ok(self) -> None:
        """It worked: if it had been failing, say it is back."""
        if self.down:
            self.down = False
            self.logger.warning(self.back)
