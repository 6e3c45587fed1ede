"""Surface: the admin: stored outcomes, groups and chords, periodic tasks and the dashboard."""

from . import dashboard, groups, periodic, results

__all__ = ["dashboard", "groups", "periodic", "results"]
