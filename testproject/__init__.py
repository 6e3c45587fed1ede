"""The example project: a small shop whose orders send receipts through django-tasks-q."""
