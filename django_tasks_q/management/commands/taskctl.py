"""Surface: ``manage.py taskctl``: operations on the task system from the command line."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from django_tasks_q import conf, control, monitor, results
from django_tasks_q.exceptions import TasksQError

#: Exit status when no worker answered (``ping``/``inspect``): what a health check looks at.
NO_ANSWER = 2


class Command(BaseCommand):
    help = ("Operate django-tasks-q: ping and inspect workers, revoke tasks, show and purge "
            "queues, prune old results.")

    def add_arguments(self, parser: CommandParser) -> None:
        commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

        def sub(name: str, help_text: str, workers: bool = False) -> Any:
            cmd = commands.add_parser(name, help=help_text, description=help_text)
            cmd.add_argument("--json", action="store_true", help="Print JSON instead of text.")
            if workers:
                cmd.add_argument("--timeout", type=float, default=control.DEFAULT_TIMEOUT,
                                 help="Seconds to wait for replies (default %(default)s).")
                cmd.add_argument("-d", "--destination", default=None, metavar="NAME[,NAME]",
                                 help="Only these workers (their -n/--hostname names).")
            return cmd

        sub("ping", "Ask every worker to answer; exit status 2 when none does (health checks).",
            workers=True)
        inspect = sub("inspect", "Ask the workers what they are doing.", workers=True)
        inspect.add_argument("what", choices=control.INSPECT)
        sub("queues", "Show how many messages wait in each queue.").add_argument(
            "queues", nargs="*", metavar="QUEUE", help="Default: the configured QUEUES.")
        revoke = sub("revoke", "Revoke tasks: workers skip them; with --terminate, kill the "
                               "process running one.", workers=True)
        revoke.add_argument("task_ids", nargs="+", metavar="ID")
        revoke.add_argument("--terminate", action="store_true",
                            help="Also kill the pool process running it now (prefork).")
        purge = sub("purge", "Delete every message waiting in the given queues.")
        purge.add_argument("queues", nargs="+", metavar="QUEUE")
        purge.add_argument("-y", "--yes", action="store_true", help="Do not ask to confirm.")
        prune = sub("prune", "Delete task results older than RESULT_EXPIRES, in batches.")
        prune.add_argument("--older-than", type=float, metavar="SECONDS", default=None,
                           help="Another cut-off: results finished more than SECONDS ago.")

    def handle(self, *args: Any, **options: Any) -> None:
        self.as_json: bool = options["json"]
        action: Callable[..., None] = getattr(self, f"do_{options['command']}")
        try:
            action(**options)
        except TasksQError as exc:
            raise CommandError(str(exc)) from exc

    # -- output -------------------------------------------------------------------------------
    def emit(self, data: Any, text: Callable[[], None]) -> None:
        if self.as_json:
            self.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str))
        else:
            text()

    def answered(self, replies: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
        """``replies``; when there are none, say so and exit with NO_ANSWER."""
        if replies:
            return replies
        if self.as_json:
            self.stdout.write("{}")
        who = f"of {options['destination']} " if options.get("destination") else ""
        raise CommandError(f"No worker {who}answered within {options['timeout']:g}s. Is a "
                           f"worker running (manage.py taskworker) on this broker?",
                           returncode=NO_ANSWER)

    @staticmethod
    def destination(options: dict[str, Any]) -> list[str] | None:
        value = options.get("destination")
        return [name.strip() for name in value.split(",") if name.strip()] if value else None

    # -- commands -----------------------------------------------------------------------------
    def do_ping(self, **options: Any) -> None:
        replies = self.answered(control.ping(self.destination(options), options["timeout"]),
                                options)

        def text() -> None:
            for name, reply in sorted(replies.items()):
                self.stdout.write(f"-> {name}: {_reply_text(reply)}")
            self.stdout.write(f"{len(replies)} worker(s) online.")

        self.emit(replies, text)

    def do_inspect(self, **options: Any) -> None:
        what = options["what"]
        replies = self.answered(
            control.inspect(what, self.destination(options), options["timeout"]), options)

        def text() -> None:
            for name, reply in sorted(replies.items()):
                self.stdout.write(f"-> {name}:")
                for line in _describe(what, reply):
                    self.stdout.write(f"    {line}")

        self.emit(replies, text)

    def do_queues(self, **options: Any) -> None:
        names = options["queues"] or list(conf.get().QUEUES)
        sizes = control.queue_lengths(names)

        def text() -> None:
            width = max(len(name) for name in sizes)
            for name, size in sizes.items():
                shown = "does not exist" if size is None else str(size)
                self.stdout.write(f"{name:<{width}}  {shown}")

        self.emit(sizes, text)

    def do_revoke(self, **options: Any) -> None:
        ids = options["task_ids"]
        replies = control.revoke(ids, options["terminate"], self.destination(options),
                                 options["timeout"])

        def text() -> None:
            self.stdout.write(f"Revoked {len(ids)} task(s): {', '.join(ids)}.")
            for name, reply in sorted(replies.items()):
                self.stdout.write(f"-> {name}: {_reply_text(reply)}")
            if not replies:
                self.stdout.write("No worker answered; the revocation is stored, so workers "
                                  "skip these tasks when they receive them.")

        self.emit({"revoked": ids, "replies": replies}, text)

    def do_purge(self, **options: Any) -> None:
        names = options["queues"]
        sizes = control.queue_lengths(names)
        missing = [name for name, size in sizes.items() if size is None]
        if missing:
            raise CommandError(f"No such queue on the broker: {', '.join(missing)}. "
                               f"`manage.py taskctl queues` lists the configured ones.")
        if not options["yes"]:
            summary = ", ".join(f"{size} from {name}" for name, size in sizes.items())
            if not sys.stdin.isatty():
                raise CommandError(f"Would purge {summary}; add --yes to confirm when not "
                                   f"running in a terminal.")
            answer = input(f"Delete {summary} waiting message(s)? This cannot be undone. "
                           f"[y/N] ")
            if answer.strip().lower() not in ("y", "yes"):
                raise CommandError("Nothing purged.")
        counts = control.purge(names)

        def text() -> None:
            for name, count in counts.items():
                self.stdout.write(f"Purged {count} message(s) from {name}.")

        self.emit(counts, text)

    def do_prune(self, **options: Any) -> None:
        older_than: float | None = options["older_than"]
        if older_than is not None and older_than < 0:
            raise CommandError(f"--older-than must be 0 or more seconds, not {older_than:g}")
        age = (timedelta(seconds=older_than) if older_than is not None
               else conf.get().RESULT_EXPIRES)
        cutoff = timezone.now() - age
        quiet = self.as_json
        if not quiet:
            self.stdout.write(
                f"Deleting task results finished before {cutoff:%Y-%m-%d %H:%M:%S %Z}")
        total = results.prune(cutoff, progress=None if quiet else
                              lambda n: self.stdout.write(f"  {n} deleted"))
        monitor.prune()  # the dashboard's history, as the hourly prune does
        self.emit({"deleted": total, "before": cutoff.isoformat()},
                  lambda: self.stdout.write(self.style.SUCCESS(f"Deleted {total} task "
                                                               f"result(s).")))


def _reply_text(reply: Any) -> str:
    if isinstance(reply, dict) and "ok" in reply:
        return f"OK {reply['ok']}"
    if isinstance(reply, dict) and "error" in reply:
        return f"ERROR {reply['error']}"
    return json.dumps(reply, default=str)


def _describe(what: str, reply: Any) -> list[str]:
    """Lines that show one worker's reply to ``inspect what``."""
    if isinstance(reply, dict) and "error" in reply:
        return [f"ERROR {reply['error']}"]
    if what in ("active", "reserved", "scheduled"):
        if not reply:
            return [f"- nothing {what}"]
        lines = []
        for item in reply:
            request = item.get("request", item)
            eta = f" eta {item['eta']}" if what == "scheduled" else ""
            lines.append(f"* {request.get('name')}[{request.get('id')}] "
                         f"args={json.dumps(request.get('args'), default=str)} "
                         f"kwargs={json.dumps(request.get('kwargs'), default=str)}{eta}")
        return lines
    if what in ("registered", "revoked"):
        return [f"* {item}" for item in reply] or ["- none"]
    if what == "stats" and isinstance(reply, dict):
        pool = reply.get("pool", {})
        total = reply.get("total", {})
        return [f"pid {reply.get('pid')}, up {reply.get('uptime')}s, "
                f"pool {pool.get('implementation')} x{pool.get('max-concurrency')}",
                f"processed {reply.get('processed')}, failed {reply.get('failed')}",
                *(f"{name}: {count}" for name, count in sorted(total.items()))]
    return json.dumps(reply, indent=2, default=str).splitlines()
