"""Surface: the admin for stored task outcomes: failure triage, retry."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from datetime import timedelta
from typing import Any
from urllib.parse import urlencode

from django.contrib import admin, messages
from django.db.models import Q, QuerySet
from django.http import HttpRequest
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html
from django.utils.safestring import SafeString

from .. import broker, conf, registry
from ..exceptions import EnqueueError, TaskNotRegistered, TasksQError
from ..models import TaskResult, TaskState
from .paging import BoundedChangeList, BoundedPaginator
from .retrying import RetryingAdmin

#: Rows the task and queue filters look at for names beyond the registered ones (newest first).
RECENT_ROWS = 1000
#: New task ids listed in the message after retrying many rows.
IDS_SHOWN = 20
#: What a task id looks like (a UUID, as Celery and this library make them).
TASK_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.I)


def readable(span: timedelta | None) -> str:
    """A duration as people read it: "250 ms", "3.4 s", "2 min 5 s", "1 h 4 min"."""
    if span is None or span < timedelta(0):
        return "-"
    seconds = span.total_seconds()
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours} h {minutes} min"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h"


def pretty(value: Any) -> SafeString:
    """``value`` as indented JSON in a scrollable monospace block."""
    text = json.dumps(value, indent=2, ensure_ascii=False, default=str)
    return format_html('<pre class="dtq-pre">{}</pre>', text)


def resend(row: TaskResult) -> str:
    """Send ``row``'s task again with the name, arguments, queue and priority stored with it
    (not its old eta or expiry: those concerned the first run); returns the new task id."""
    from ..client import send_task

    args, kwargs, queue = row.args, row.kwargs, row.queue or None
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise TypeError("its stored args are not a JSON list, or its kwargs not a JSON object")
    try:
        task = registry.get(row.task_name)
    except TaskNotRegistered:  # it may live in another service: sent by name
        new = send_task(row.task_name, args, kwargs, queue=queue, priority=row.priority).id
    else:
        task.check_arguments(args, kwargs)
        new = task.apply_async(args=args, kwargs=kwargs, queue=queue, priority=row.priority).id
    broker.flush()  # on RabbitMQ, its confirm is in before the admin says it was sent
    return new


def _recent(request: HttpRequest) -> dict[str, set[str]]:
    # The newest rows' task names and queues, read once per request through the date_done
    # index: a DISTINCT over the whole table would scan it on every page.
    found: dict[str, set[str]] | None = getattr(request, "_dtq_recent", None)
    if found is None:
        rows = list(TaskResult.objects.order_by("-date_done")
                    .values_list("task_name", "queue")[:RECENT_ROWS])
        found = {"task_name": {name for name, _ in rows}, "queue": {q for _, q in rows if q}}
        setattr(request, "_dtq_recent", found)  # noqa: B010 - a request has no such attribute
    return found


class _NameFilter(admin.SimpleListFilter):
    """Exact match on one column, offering the known names rather than a DISTINCT scan."""

    field = ""

    def known(self) -> set[str]:
        """Names this process knows of without reading the table."""
        raise NotImplementedError

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        names = self.known() | _recent(request)[self.field]
        if self.value():
            names.add(str(self.value()))
        return [(name, name) for name in sorted(names)]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        value = self.value()
        return queryset.filter(**{self.field: value}) if value else queryset


class TaskFilter(_NameFilter):
    """By task: the registered tasks, and those seen in the newest rows."""

    title = "task"
    parameter_name = field = "task_name"

    def known(self) -> set[str]:
        return set(registry.names())


class QueueFilter(_NameFilter):
    """By queue: the queues of ``TASKS_Q["QUEUES"]``, and those seen in the newest rows."""

    title = "queue"
    parameter_name = field = "queue"

    def known(self) -> set[str]:
        cfg = conf.get()
        return {*cfg.QUEUES, cfg.DEFAULT_QUEUE}


class _LinkFilter(admin.SimpleListFilter):
    """Exact match on an id column, reached through a link from a detail page ("all tasks of
    this workflow"): shown, so that it can be cleared, only while it applies."""

    field = ""

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        value = self.value()
        return [(str(value), str(value))] if value else []

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        value = self.value()
        return queryset.filter(**{self.field: value}) if value else queryset


class WorkflowFilter(_LinkFilter):
    """The tasks of one workflow: those with this root id (an index lookup)."""

    title = "workflow"
    parameter_name = field = "root_id"


class GroupFilter(_LinkFilter):
    """The members of one group or chord (an index lookup)."""

    title = "group"
    parameter_name = field = "group_id"


class FinishedFilter(admin.DateFieldListFilter):
    """By date finished: today, the past 7 days, this month, this year (a range on the index)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.title = "finished"


class ResultChangeList(BoundedChangeList):
    """The list loads no arguments, return values or tracebacks."""

    deferred = ("args", "kwargs", "result", "traceback")


@admin.register(TaskResult)
class TaskResultAdmin(RetryingAdmin[TaskResult]):
    """Stored outcomes: failures with their tracebacks, successes when kept; read-only, with
    retry and delete."""

    list_display = ("task_id", "task", "status", "queue", "worker", "runtime", "finished")
    list_display_links = ("task_id",)
    list_filter = ("status", TaskFilter, QueueFilter, ("date_done", FinishedFilter),
                   WorkflowFilter, GroupFilter)
    search_fields = ("task_id", "task_name")  # shows the box; get_search_results decides
    search_help_text = ("A task id (exact), or part of a task name or of the exception "
                        "(the exception text is searched row by row: slow on a big table).")
    sortable_by = ("finished",)
    show_full_result_count = False
    show_facets = admin.ShowFacets.NEVER
    paginator = BoundedPaginator
    actions = ("retry",)
    readonly_fields = ("task_id", "task_name", "status", "exception", "traceback_text",
                       "result_json", "args_json", "kwargs_json", "date_created",
                       "date_started", "date_done", "runtime", "retries", "worker", "queue",
                       "priority", "root_link", "parent_link", "group_link")

    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> type[ResultChangeList]:
        return ResultChangeList

    def get_fieldsets(self, request: HttpRequest, obj: TaskResult | None = None) -> Any:
        outcome = (("Exception", {"fields": ("exception", "traceback_text")})
                   if obj is not None and _failed(obj) else
                   ("Result", {"fields": ("result_json",)}))
        return [
            (None, {"fields": ("task_id", "task_name", "status")}),
            outcome,
            ("Arguments", {"fields": ("args_json", "kwargs_json")}),
            ("Timings", {"fields": ("date_created", "date_started", "date_done", "runtime")}),
            ("Where it ran", {"fields": ("worker", "queue", "priority", "retries")}),
            ("Workflow", {"fields": ("root_link", "parent_link", "group_link")}),
        ]

    def get_search_results(self, request: HttpRequest, queryset: QuerySet[TaskResult],
                           search_term: str) -> tuple[QuerySet[TaskResult], bool]:
        term = search_term.strip()
        if not term:
            return queryset, False
        if TASK_ID.fullmatch(term):  # the unique index answers it
            return queryset.filter(task_id=term), False
        return queryset.filter(
            Q(task_id=term) | Q(task_name__icontains=term) | Q(traceback__icontains=term)
            | Q(result__exc_type__icontains=term) | Q(result__exc_message__icontains=term)
        ), False

    # -- columns and fields -------------------------------------------------------------------
    @admin.display(description="task")
    def task(self, row: TaskResult) -> str:
        return row.task_name

    @admin.display(description="runtime")
    def runtime(self, row: TaskResult) -> str:
        if row.date_started is None or row.date_done is None:
            return "-"
        return readable(row.date_done - row.date_started)

    @admin.display(description="finished", ordering="date_done")
    def finished(self, row: TaskResult) -> str:
        return f"{timezone.localtime(row.date_done):%Y-%m-%d %H:%M:%S}" if row.date_done else "-"

    @admin.display(description="exception")
    def exception(self, row: TaskResult) -> str:
        info = row.result if isinstance(row.result, dict) else {}
        name = info.get("exc_type") or "Exception"
        module = info.get("exc_module")
        full = f"{module}.{info.get('exc_qualname') or name}" if module not in (
            None, "", "builtins") else name
        return format_html('<strong title="{}">{}</strong>: {}', full, name,
                           info.get("exc_message", ""))

    @admin.display(description="traceback")
    def traceback_text(self, row: TaskResult) -> str:
        if not row.traceback:
            return "-"
        return format_html('<pre class="dtq-pre dtq-traceback">{}</pre>', row.traceback)

    @admin.display(description="result")
    def result_json(self, row: TaskResult) -> str:
        return pretty(row.result)

    @admin.display(description="args")
    def args_json(self, row: TaskResult) -> str:
        return pretty(row.args)

    @admin.display(description="kwargs")
    def kwargs_json(self, row: TaskResult) -> str:
        return pretty(row.kwargs)

    @admin.display(description="root id")
    def root_link(self, row: TaskResult) -> str:
        if not row.root_id:
            return "-"
        return format_html('{} (<a href="{}">all tasks of this workflow</a>)', row.root_id,
                           results_url(root_id=row.root_id))

    @admin.display(description="parent id")
    def parent_link(self, row: TaskResult) -> str:
        if not row.parent_id:
            return "-"
        return format_html('<a href="{}">{}</a>', results_url(q=row.parent_id), row.parent_id)

    @admin.display(description="group id")
    def group_link(self, row: TaskResult) -> str:
        if not row.group_id:
            return "-"
        groups = reverse("admin:django_tasks_q_taskgroup_changelist")
        return format_html('<a href="{}?{}">{}</a> (<a href="{}">all members of this group</a>)',
                           groups, urlencode({"q": row.group_id}), row.group_id,
                           results_url(group_id=row.group_id))

    def retry_title(self, obj: TaskResult) -> str:
        return "Send this task again with the same arguments, queue and priority"

    # -- actions ------------------------------------------------------------------------------
    @admin.action(description="Retry the selected tasks (send them again)",
                  permissions=["retry"])
    def retry(self, request: HttpRequest, queryset: QuerySet[TaskResult]) -> None:
        self._retry(request, queryset.defer(None))

    def _retry(self, request: HttpRequest, rows: Iterable[TaskResult]) -> None:
        sent: list[tuple[TaskResult, str]] = []
        for row in rows:
            try:
                sent.append((row, resend(row)))
            except EnqueueError as exc:  # the broker is down: the next rows would fail alike
                self.message_user(request, f"Could not send {row.task_name}[{row.task_id}] "
                                           f"again, and stopped there: {exc}", messages.ERROR)
                break
            except (TasksQError, TypeError, ValueError) as exc:
                self.message_user(request, f"Could not send {row.task_name}[{row.task_id}] "
                                           f"again: {exc}", messages.ERROR)
        if sent:
            self.message_user(request, self._sent_message(sent), messages.SUCCESS)

    def _sent_message(self, sent: list[tuple[TaskResult, str]]) -> str:
        if len(sent) == 1:
            (row, new), = sent
            return f"Sent {row.task_name}[{row.task_id}] again: the new task id is {new}."
        ids = ", ".join(new for _, new in sent[:IDS_SHOWN])
        more = f" and {len(sent) - IDS_SHOWN} more" if len(sent) > IDS_SHOWN else ""
        return f"Sent {len(sent)} tasks again; their new task ids: {ids}{more}."


def results_url(**query: str) -> str:
    """The list of stored results, filtered or searched by ``query``."""
    return f"{reverse('admin:django_tasks_q_taskresult_changelist')}?{urlencode(query)}"


def _failed(row: TaskResult) -> bool:
    return row.status == TaskState.FAILURE or (
        isinstance(row.result, dict) and "exc_type" in row.result)
