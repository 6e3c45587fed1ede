"""Surface: the admin: stored outcomes, periodic tasks and the dashboard."""

from . import periodic, results

__all__ = ["periodic", "results"]
