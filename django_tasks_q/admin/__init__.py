"""Surface: the admin: stored outcomes, periodic tasks and the dashboard."""

from . import dashboard, periodic, results

__all__ = ["dashboard", "periodic", "results"]
