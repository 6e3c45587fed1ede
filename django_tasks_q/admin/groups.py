"""Surface: the admin for groups and chords: how far each got, and retry as a whole."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from django.contrib import admin, messages
from django.db.models import Count, OuterRef, Q, QuerySet, Subquery
from django.http import HttpRequest
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html
from django.utils.safestring import SafeString, mark_safe

from .. import broker, canvas
from ..exceptions import EnqueueError, TasksQError
from ..models import READY_STATES, TaskGroup, TaskResult, TaskState
from .paging import BoundedChangeList, BoundedPaginator
from .results import pretty, results_url
from .retrying import RetryingAdmin

#: Options a retry leaves out of every signature it sends again: where the first sending
#: placed it (its ids, its group, chord and chain) and when that sending was to run (an eta or
#: expiry long past would stop the retry from running at all).
STALE_OPTIONS = ("task_id", *canvas.PLACED, "eta", "countdown", "expires")
#: Built-in tasks whose ``task`` argument is a signature (``map``, ``starmap``, ``chunks``).
_TAKES_A_SIGNATURE = frozenset(canvas.BUILTINS)

def fresh(sig: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a stored signature (a group, chord, chain or task) to send anew: every
    nested signature loses its ids and its place in the first sending's workflow, so the
    retry gets new ones; names, arguments, queues, priorities and callbacks stay."""
    new = copy.deepcopy(dict(sig))
    _strip(new)
    return new


def _strip(sig: dict[str, Any]) -> None:
    options = sig.get("options")
    if isinstance(options, dict):
        for key in STALE_OPTIONS:
            options.pop(key, None)
        for key in ("link", "link_error"):
            linked = options.get(key)
            # A list as this library writes it; a single dict as some Celery clients do.
            for callback in linked if isinstance(linked, list) else [linked]:
                if isinstance(callback, dict):
                    _strip(callback)
    if sig.get("chord_size") is not None:
        sig["chord_size"] = None  # counted again when the chord is sent
    for nested in _nested(sig):
        _strip(nested)


def _nested(sig: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The signatures ``sig`` holds in its arguments (never a plain task's own arguments: those
    are the user's data, whatever their shape)."""
    kwargs = sig.get("kwargs")
    if not isinstance(kwargs, dict):
        return []
    kind = sig.get("subtask_type")
    if kind in ("group", "chain"):
        found = kwargs.get("tasks") or []
    elif kind == "chord":
        found = [kwargs.get("header"), kwargs.get("body")]
    elif sig.get("task") in _TAKES_A_SIGNATURE:
        found = [kwargs.get("task")]
    else:
        return []
    return [item for item in found if isinstance(item, dict)]


def resend(row: TaskGroup) -> str:
    """Send ``row``'s group or chord again from its stored canvas, with new ids; returns the
    new group id (a chord's: its header's)."""
    from ..results import GroupResult

    again = canvas.signature(fresh(row.canvas))
    if not isinstance(again, canvas.group | canvas.chord):
        raise TypeError(f"its stored canvas is a {again.get('subtask_type') or 'task'}, "
                        f"not a group or chord")
    handle = again.apply_async()
    broker.flush()  # on RabbitMQ, its confirms are in before the admin says it was sent
    header = handle if isinstance(handle, GroupResult) else handle.parent
    if not isinstance(header, GroupResult):
        raise TypeError("sent, but no group id came back")
    return str(header.id)


def kind_of(row: TaskGroup) -> str:
    """``"chord"`` (it has a body) or ``"group"``."""
    return "chord" if row.body_id else "group"


def chord_state(row: TaskGroup) -> str:
    """A chord's body: ``waiting`` for its members, ``sent``, or ``failed`` (a member failed, or
    the body itself did); ``-`` for a group. Reads ``body_status``, annotated by the admin."""
    if not row.body_id:
        return "-"
    if not row.fired_by:
        return "waiting"
    return "failed" if getattr(row, "body_status", None) == TaskState.FAILURE else "sent"


@dataclass(frozen=True)
class Progress:
    """How many members of a group finished, and of those, how many did not succeed."""

    finished: int
    failed: int


def progress(rows: Iterable[TaskGroup]) -> dict[str, Progress]:
    """Each row's progress by group id, from one query over the members' stored results."""
    rows = list(rows)
    counts: dict[str, Progress] = {}
    if rows:
        found = (TaskResult.objects.filter(group_id__in=[row.group_id for row in rows],
                                           status__in=READY_STATES)
                 .order_by().values("group_id")
                 .annotate(done=Count("pk"), bad=Count("pk", filter=~Q(status=TaskState.SUCCESS))))
        counts = {f["group_id"]: Progress(f["done"], f["bad"]) for f in found}
    mapped: dict[str, Progress] = {}
    for row in rows:
        if chord_state(row) == "sent":
            # Every member succeeded; their rows went once the body had their results.
            mapped[row.group_id] = Progress(row.size, 0)
        else:
            seen = counts.get(row.group_id, Progress(0, 0))
            mapped[row.group_id] = Progress(min(seen.finished, row.size), seen.failed)
    return mapped


class GroupChangeList(BoundedChangeList):
    """The list loads no canvases or results, and counts the members of the page's groups in
    one query."""

    deferred = ("task_ids", "canvas", "body", "results")

    def get_results(self, request: HttpRequest) -> None:
        super().get_results(request)
        rows = list(self.result_list)
        found = progress(rows)
        for row in rows:
            setattr(row, "progress", found[row.group_id])  # noqa: B010 - read by the columns
        self.result_list = rows


class KindFilter(admin.SimpleListFilter):
    """Groups, or chords (those with a body)."""

    title = "kind"
    parameter_name = "kind"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("group", "group"), ("chord", "chord")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        if self.value() == "group":
            return queryset.filter(body_id="")
        if self.value() == "chord":
            return queryset.exclude(body_id="")
        return queryset


@admin.register(TaskGroup)
class TaskGroupAdmin(RetryingAdmin[TaskGroup]):
    """Groups and chords as sent: how far their members got, a chord's body; read-only, with
    retry (the whole group or chord, with new ids) and delete."""

    list_display = ("group_id", "kind", "size", "finished", "body_state", "created", "done")
    list_display_links = ("group_id",)
    list_filter = (KindFilter,)
    search_fields = ("group_id",)  # shows the box; get_search_results decides
    search_help_text = "A group id (exact)."
    sortable_by = ("created",)
    show_full_result_count = False
    show_facets = admin.ShowFacets.NEVER
    paginator = BoundedPaginator
    actions = ("retry",)
    readonly_fields = ("group_id", "kind", "size", "finished", "body_state", "members",
                       "body_id_link", "fired_by_link", "body_json", "results_json",
                       "canvas_json", "date_created", "date_done")

    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> type[GroupChangeList]:
        return GroupChangeList

    def get_queryset(self, request: HttpRequest) -> QuerySet[TaskGroup]:
        # A chord's body state needs its body's stored status: one index lookup a row, in the
        # page's query rather than a query a row.
        status = TaskResult.objects.filter(task_id=OuterRef("body_id")).order_by()
        return super().get_queryset(request).annotate(
            body_status=Subquery(status.values("status")[:1]))

    def get_fieldsets(self, request: HttpRequest, obj: TaskGroup | None = None) -> Any:
        joined = obj is not None and bool(obj.body_id)
        head = ("group_id", "kind", "size", "finished", *(("body_state",) if joined else ()))
        sets: list[Any] = [(None, {"fields": head}), ("Members", {"fields": ("members",)})]
        if joined:
            sets.append(("Chord body", {"fields": ("body_id_link", "fired_by_link",
                                                   "body_json", "results_json")}))
        sets += [("As sent", {"fields": ("canvas_json",)}),
                 ("Dates", {"fields": ("date_created", "date_done")})]
        return sets

    def get_search_results(self, request: HttpRequest, queryset: QuerySet[TaskGroup],
                           search_term: str) -> tuple[QuerySet[TaskGroup], bool]:
        term = search_term.strip()
        return (queryset.filter(group_id=term), False) if term else (queryset, False)

    # -- columns and fields -------------------------------------------------------------------
    @admin.display(description="kind")
    def kind(self, row: TaskGroup) -> str:
        return kind_of(row)

    @admin.display(description="finished")
    def finished(self, row: TaskGroup) -> str:
        done: Progress | None = getattr(row, "progress", None)
        if done is None:  # the detail page: this row alone
            done = progress([row])[row.group_id]
        failed = f", {done.failed} failed" if done.failed else ""
        return f"{done.finished} of {row.size}{failed}"

    @admin.display(description="body")
    def body_state(self, row: TaskGroup) -> str:
        return chord_state(row)

    @admin.display(description="created", ordering="date_created")
    def created(self, row: TaskGroup) -> str:
        return _when(row.date_created)

    @admin.display(description="done")
    def done(self, row: TaskGroup) -> str:
        return _when(row.date_done)

    @admin.display(description="members")
    def members(self, row: TaskGroup) -> SafeString:
        ids = [str(task_id) for task_id in row.task_ids or []]
        return format_html('<a href="{}">Their stored results</a>{}',
                           results_url(group_id=row.group_id), pretty(ids))

    @admin.display(description="body task id")
    def body_id_link(self, row: TaskGroup) -> SafeString:
        return _task_link(row.body_id)

    @admin.display(description="fired by")
    def fired_by_link(self, row: TaskGroup) -> SafeString:
        return _task_link(row.fired_by)

    @admin.display(description="body")
    def body_json(self, row: TaskGroup) -> SafeString:
        return pretty(row.body)

    @admin.display(description="members' results")
    def results_json(self, row: TaskGroup) -> SafeString:
        return pretty(row.results)

    @admin.display(description="canvas")
    def canvas_json(self, row: TaskGroup) -> SafeString:
        return pretty(row.canvas)

    def retry_title(self, obj: TaskGroup) -> str:
        return f"Send this {kind_of(obj)} again, with new ids"

    # -- actions ------------------------------------------------------------------------------
    @admin.action(description="Retry the selected groups and chords (send them again, with "
                              "new ids)", permissions=["retry"])
    def retry(self, request: HttpRequest, queryset: QuerySet[TaskGroup]) -> None:
        self._retry(request, queryset.defer(None))

    def _retry(self, request: HttpRequest, rows: Iterable[TaskGroup]) -> None:
        for row in rows:
            what = f"{kind_of(row)} {row.group_id}"
            try:
                new = resend(row)
            except EnqueueError as exc:  # the broker is down: the next rows would fail alike
                self.message_user(request, f"Could not send the {what} again, and stopped "
                                           f"there: {exc}", messages.ERROR)
                break
            except (TasksQError, TypeError, ValueError, KeyError) as exc:
                self.message_user(request, f"Could not send the {what} again: {exc}",
                                  messages.ERROR)
                continue
            self.message_user(request, self._sent_message(what, new), messages.SUCCESS)

    def _sent_message(self, what: str, new: str) -> SafeString:
        pk = TaskGroup.objects.filter(group_id=new).values_list("pk", flat=True).first()
        if pk is None:  # a chord without members sends its body alone: no group to show
            return format_html("Sent the {} again: the new group id is {}.", what, new)
        url = reverse("admin:django_tasks_q_taskgroup_change", args=[pk],
                      current_app=self.admin_site.name)
        return format_html('Sent the {} again: the new group id is <a href="{}">{}</a>.',
                           what, url, new)


def _when(at: Any) -> str:
    return f"{timezone.localtime(at):%Y-%m-%d %H:%M:%S}" if at else "-"


def _task_link(task_id: str) -> SafeString:
    """``task_id``, linked to its stored result (the search finds an id through the unique
    index)."""
    if not task_id:
        return mark_safe("-")
    return format_html('<a href="{}">{}</a>', results_url(q=task_id), task_id)
