"""Surface: ``manage.py taskctl``: operations on the task system from the command line."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from django_tasks_q import conf, results


class Command(BaseCommand):
    help = "Operate django-tasks-q: prune old task results."

    def add_arguments(self, parser: CommandParser) -> None:
        commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
        prune = commands.add_parser(
            "prune", help="Delete task results older than RESULT_EXPIRES, in batches.")
        prune.add_argument("--older-than", type=float, metavar="SECONDS", default=None,
                           help="Another cut-off: results finished more than SECONDS ago.")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["command"] == "prune":
            self.prune(options["older_than"])

    def prune(self, older_than: float | None) -> None:
        if older_than is not None and older_than < 0:
            raise CommandError(f"--older-than must be 0 or more seconds, not {older_than:g}")
        age = (timedelta(seconds=older_than) if older_than is not None
               else conf.get().RESULT_EXPIRES)
        cutoff = timezone.now() - age
        self.stdout.write(f"Deleting task results finished before {cutoff:%Y-%m-%d %H:%M:%S %Z}")
        total = results.prune(cutoff, progress=lambda n: self.stdout.write(f"  {n} deleted"))
        self.stdout.write(self.style.SUCCESS(f"Deleted {total} task result(s)."))
