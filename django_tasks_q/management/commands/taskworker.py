"""Surface: ``manage.py taskworker``: runs a worker for the given queues."""

from __future__ import annotations

import logging
import os
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from django_tasks_q.exceptions import ExtensionError, ImproperlyConfigured
from django_tasks_q.extensions import WorkerExtension
from django_tasks_q.management import configure_logging
from django_tasks_q.startchecks import run_start_checks
from django_tasks_q.worker import extensions
from django_tasks_q.worker.main import Worker, WorkerOptions, parse_autoscale, queues_from
from django_tasks_q.worker.pool import POOLS


class Command(BaseCommand):
    help = "Run a django-tasks-q worker."
    requires_system_checks = "__all__"

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("-Q", "--queues", help="Comma-separated queues (default: QUEUES).")
        parser.add_argument("-c", "--concurrency", type=int, default=None,
                            help="Number of pool processes or threads (default: CPU count).")
        parser.add_argument("--autoscale", metavar="MAX,MIN", default=None,
                            help="Prefork only: start MIN children, grow up to MAX while work "
                                 "waits, shrink back after AUTOSCALE_KEEPALIVE seconds idle. "
                                 "Overrides -c.")
        parser.add_argument("-P", "--pool", choices=sorted(POOLS), default="prefork")
        parser.add_argument("-l", "--loglevel", default="INFO",
                            help="DEBUG, INFO, WARNING, ERROR (default INFO).")
        parser.add_argument("-n", "--hostname", default="", help="Worker name.")
        parser.add_argument("--prefetch-multiplier", type=int, default=4,
                            help="Messages reserved per pool slot (default 4).")
        parser.add_argument("--max-tasks-per-child", type=int, default=None,
                            help="Replace a pool child after this many tasks.")
        parser.add_argument("--max-memory-per-child", type=int, default=None, metavar="KIB",
                            help="Replace a pool child, after its current task, once its "
                                 "resident memory passes this many KiB.")
        parser.add_argument("--time-limit", type=float, default=None,
                            help="Hard limit in seconds for tasks that set none (prefork: the "
                                 "child is killed and replaced).")
        parser.add_argument("-B", "--beat", action="store_true",
                            help="Also run taskbeat, in a process of its own (for development; "
                                 "in production run manage.py taskbeat).")
        parser.add_argument("-E", "--events", action="store_true",
                            help="Send Celery-compatible monitoring events (for Flower or "
                                 "celery events); Redis and RabbitMQ only.")
        parser.add_argument("--soft-time-limit", type=float, default=None,
                            help="Soft limit in seconds for tasks that set none (raises "
                                 "SoftTimeLimitExceeded inside the task).")
        # Worker extensions' own options, each in a group of its own (worker/extensions.py).
        self.extension_dests: dict[type[WorkerExtension], list[str]] = {}
        try:
            self.extension_dests = extensions.add_arguments(parser)
        except (ExtensionError, ImproperlyConfigured) as exc:
            parser.error(str(exc))

    def handle(self, *args: Any, **options: Any) -> None:
        configure_logging(options["loglevel"])
        concurrency, scale = options["concurrency"], options["autoscale"]
        try:
            autoscale = parse_autoscale(scale) if scale is not None else None
            worker = Worker(WorkerOptions(
                queues=queues_from(options["queues"]),
                concurrency=concurrency if concurrency is not None else os.cpu_count() or 1,
                autoscale=autoscale, pool=options["pool"], hostname=options["hostname"],
                prefetch_multiplier=options["prefetch_multiplier"],
                max_tasks_per_child=options["max_tasks_per_child"],
                max_memory_per_child=options["max_memory_per_child"],
                time_limit=options["time_limit"], soft_time_limit=options["soft_time_limit"],
                beat=options["beat"], events=options["events"],
                extensions=list(self.extension_dests),
                extension_options={cls: {dest: options[dest] for dest in dests}
                                   for cls, dests in self.extension_dests.items()}))
        except (ValueError, ExtensionError, ImproperlyConfigured) as exc:
            raise CommandError(str(exc)) from exc
        if autoscale is not None and concurrency is not None:
            # As with Celery, the range sizes the pool; said once rather than silently.
            logging.getLogger("django_tasks_q.worker").warning(
                "-c/--concurrency %d is ignored: --autoscale %d,%d sizes the pool",
                concurrency, *autoscale)
        if not options["skip_checks"]:  # with the database and the pool: see startchecks.py
            run_start_checks(self, worker.options)
        try:
            worker.run()
        except ExtensionError as exc:  # logged with its traceback where it happened
            raise CommandError(f"{exc}; the worker stopped") from exc
