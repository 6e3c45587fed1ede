"""Surface: pytest fixtures for users' tests of code that sends tasks.

Enable them in the root ``conftest.py``: ``pytest_plugins = ["django_tasks_q.testing.pytest"]``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from . import CapturedTasks, capture_tasks


@pytest.fixture
def captured_tasks() -> Iterator[CapturedTasks]:
    """The tasks the test sends, captured instead of published (see ``capture_tasks()``)."""
    with capture_tasks() as captured:
        yield captured


@pytest.fixture
def eager_tasks() -> Iterator[None]:
    """Tasks run inline when they are sent, for this test (``TASKS_Q["EAGER"] = True``)."""
    from django.conf import settings
    from django.test import override_settings

    with override_settings(TASKS_Q={**getattr(settings, "TASKS_Q", {}), "EAGER": True}):
        yield
