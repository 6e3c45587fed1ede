"""Surface: ``manage.py taskbeat``: sends the tasks of the schedules in the database."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from django_tasks_q.beat import Beat
from django_tasks_q.management import configure_logging
from django_tasks_q.startchecks import run_start_checks


class Command(BaseCommand):
    help = ("Run the periodic-task scheduler. Several may run against one database: one leads, "
            "the others stand by, and each slot is sent once.")
    requires_system_checks = "__all__"

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("-l", "--loglevel", default="INFO",
                            help="DEBUG, INFO, WARNING, ERROR (default INFO).")
        parser.add_argument("-n", "--name", default="",
                            help="Name in logs (default beat.PID@HOST).")

    def handle(self, *args: Any, **options: Any) -> None:
        configure_logging(options["loglevel"])
        if not options["skip_checks"]:  # with the database: see startchecks.py
            run_start_checks(self)
        try:
            Beat(options["name"]).run()
        except ValueError as exc:  # a BEAT_SCHEDULE entry that is not a schedule
            raise CommandError(str(exc)) from exc
