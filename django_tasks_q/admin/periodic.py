"""Surface: the admin for periodic tasks: one form for every kind of schedule, a live preview."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo, available_timezones

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db.models import OuterRef, QuerySet, Subquery
from django.http import HttpRequest, JsonResponse
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.dateparse import parse_datetime, parse_duration
from django.utils.html import format_html

from .. import conf, registry, schedules
from ..exceptions import TaskNotRegistered
from ..models import PeriodicRun, PeriodicTask, TaskResult, TaskState, timetable_zone

#: How many coming runs the form shows.
PREVIEW_RUNS = 5
#: What a schedule defined in BEAT_SCHEDULE takes from the code (the admin shows them only).
CODE_FIELDS = ("name", "description", "task", "crontab", "interval", "run_at", "timezone",
               "catch_up", "args", "kwargs", "queue", "priority", "expires")
KINDS = (("crontab", "Crontab"), ("interval", "Every (interval)"), ("run_at", "Once, at a time"))


def _zone_choices() -> list[tuple[str, str]]:
    default = conf.get().TIMEZONE
    return [("", f"TASKS_Q TIMEZONE ({default})"),
            *((name, name) for name in sorted(available_timezones()))]


if TYPE_CHECKING:
    PeriodicTaskFormBase = forms.ModelForm[PeriodicTask]
    PeriodicTaskAdminBase = admin.ModelAdmin[PeriodicTask]
else:
    # Django's forms and admin classes take no type arguments at run time.
    PeriodicTaskFormBase = forms.ModelForm
    PeriodicTaskAdminBase = admin.ModelAdmin


class PeriodicTaskForm(PeriodicTaskFormBase):
    """One form: the schedule type, then its fields; the task from the registered ones."""

    kind = forms.ChoiceField(choices=KINDS, initial="crontab", widget=forms.RadioSelect,
                             label="Schedule type")
    task = forms.ChoiceField(choices=(), help_text="One of the tasks the project registers.")

    class Meta:
        model = PeriodicTask
        fields = ("name", "description", "task", "kind", "crontab", "interval", "run_at",
                  "timezone", "args", "kwargs", "queue", "priority", "expires", "catch_up",
                  "enabled")
        widgets = {"timezone": forms.Select(), "description": forms.Textarea(attrs={"rows": 2})}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        names = registry.names()
        current = self.instance.task
        choices = [(name, name) for name in names]
        if current and current not in names:
            choices.insert(0, (current, f"{current} (not registered)"))
        if "crontab" not in self.fields:  # read-only (defined in code): no schedule to choose
            self.fields.pop("kind", None)
        task_field = self.fields.get("task")
        if isinstance(task_field, forms.ChoiceField):  # absent when read-only (defined in code)
            task_field.choices = [("", "---------"), *choices]
        if "timezone" in self.fields:
            self.fields["timezone"].widget.choices = _zone_choices()
        if self.instance.pk is not None and "kind" in self.fields:
            self.fields["kind"].initial = next(
                (kind for kind, _ in KINDS if getattr(self.instance, kind) not in ("", None)),
                "crontab")

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        if "kind" not in self.fields:  # defined in code: only ``enabled`` is edited here
            return data
        kind = data.get("kind") or "crontab"
        for other, _ in KINDS:
            if other != kind:
                data[other] = "" if other == "crontab" else None
        if data.get(kind) in ("", None) and kind not in self.errors:
            self.add_error(kind, "Required for this schedule type.")
        if kind == "crontab" and data.get("crontab"):
            try:
                data["crontab"] = schedules.check_crontab(data["crontab"])
            except ValueError as exc:
                self.add_error("crontab", str(exc))
        if kind == "interval" and data.get("interval") is not None and (
                data["interval"] <= timedelta(0)):
            self.add_error("interval", "An interval must be longer than zero.")
        self._check_arguments(data)
        return data

    def _check_arguments(self, data: dict[str, Any]) -> None:
        args, kwargs = data.get("args"), data.get("kwargs")
        if args is not None and not isinstance(args, list):
            self.add_error("args", 'A JSON list, such as [1, "two"].')
            return
        if kwargs is not None and not isinstance(kwargs, dict):
            self.add_error("kwargs", 'A JSON object, such as {"send_to": "ops@example.com"}.')
            return
        try:
            task = registry.get(data.get("task") or "")
        except TaskNotRegistered:
            return  # the task field says so
        try:
            task.check_arguments(args or [], kwargs or {})
        except TypeError as exc:
            self.add_error("kwargs" if kwargs and not args else "args", str(exc))


@admin.register(PeriodicTask)
class PeriodicTaskAdmin(PeriodicTaskAdminBase):
    """Schedules: edited here, sent by taskbeat within a second or two of saving."""

    form = PeriodicTaskForm
    list_display = ("name", "task", "schedule_words", "next_run_at", "last_run", "enabled",
                    "from_code")
    list_filter = ("enabled", "from_code")
    search_fields = ("name", "task", "description")
    actions = ("run_now", "enable", "disable")
    readonly_fields = ("preview", "next_run_at", "last_run_at", "total_run_count", "from_code")
    fieldsets = (
        (None, {"fields": ("name", "description", "task", "enabled")}),
        ("Schedule", {"fields": ("kind", "crontab", "interval", "run_at", "timezone", "preview",
                                 "catch_up")}),
        ("Arguments and routing", {"fields": ("args", "kwargs", "queue", "priority",
                                              "expires")}),
        ("Runs", {"fields": ("next_run_at", "last_run_at", "total_run_count", "from_code")}),
    )

    class Media:
        js = ("django_tasks_q/periodic_task.js",)

    def get_readonly_fields(self, request: HttpRequest,
                            obj: PeriodicTask | None = None) -> list[str]:
        fields = list(super().get_readonly_fields(request, obj))
        if obj is not None and obj.from_code:  # BEAT_SCHEDULE would undo an edit at next start
            fields += [f for f in CODE_FIELDS if f not in fields]
        return fields

    def get_fieldsets(self, request: HttpRequest, obj: PeriodicTask | None = None) -> Any:
        fieldsets = super().get_fieldsets(request, obj)
        if obj is None or not obj.from_code:
            return fieldsets
        return [(title, {**options, "fields": [f for f in options["fields"] if f != "kind"]})
                for title, options in fieldsets]

    def get_queryset(self, request: HttpRequest) -> QuerySet[PeriodicTask]:
        last = PeriodicRun.objects.filter(periodic_task=OuterRef("pk")).order_by("-slot")
        outcome = TaskResult.objects.filter(task_id=OuterRef("last_task_id"))
        return super().get_queryset(request).annotate(
            last_task_id=Subquery(last.values("task_id")[:1])).annotate(
            last_status=Subquery(outcome.values("status")[:1]),
            last_result_pk=Subquery(outcome.values("pk")[:1]))

    def get_urls(self) -> list[URLPattern]:
        preview = path("preview/", self.admin_site.admin_view(self.preview_view),
                       name="django_tasks_q_periodictask_preview")
        return [preview, *super().get_urls()]

    # -- columns -------------------------------------------------------------------------------
    @admin.display(description="schedule")
    def schedule_words(self, row: PeriodicTask) -> str:
        try:
            return schedules.describe(row.schedule(), timetable_zone(row.timezone))
        except ValueError as exc:
            return f"not a schedule: {exc}"

    @admin.display(description="last run", ordering="last_run_at")
    def last_run(self, row: PeriodicTask) -> str:
        if row.last_run_at is None:
            return "-"
        when = timezone.localtime(row.last_run_at).strftime("%Y-%m-%d %H:%M:%S")
        status = getattr(row, "last_status", None)
        if status == TaskState.FAILURE:
            url = reverse("admin:django_tasks_q_taskresult_change",
                          args=[row.last_result_pk])  # type: ignore[attr-defined]
            return format_html('{} <a href="{}">FAILURE</a>', when, url)
        return f"{when} {status or 'sent'}"

    @admin.display(description="next runs")
    def preview(self, row: PeriodicTask) -> str:
        """Where the form shows the schedule in words and its next runs (kept up to date as the
        schedule fields change, by periodic_task.js)."""
        try:
            text = _preview(row.schedule(), timetable_zone(row.timezone)) if row.pk else ""
        except ValueError as exc:
            text = str(exc)
        url = reverse("admin:django_tasks_q_periodictask_preview")
        return format_html('<div id="dtq-preview" data-url="{}" style="white-space: pre-line">'
                           "{}</div>", url, text)

    # -- the live preview ---------------------------------------------------------------------
    def preview_view(self, request: HttpRequest) -> JsonResponse:
        """The schedule described by the form's fields so far: in words, and its next runs."""
        if not (self.has_view_permission(request) or self.has_add_permission(request)):
            raise PermissionDenied
        query = request.GET
        kind = query.get("kind", "crontab")
        try:
            tz = timetable_zone(query.get("timezone", ""))
            schedule = _schedule_from(kind, query, tz)
        except ValueError as exc:
            return JsonResponse({"ok": False, "text": str(exc)})
        return JsonResponse({"ok": True, "text": _preview(schedule, tz)})

    # -- actions ------------------------------------------------------------------------------
    @admin.action(description="Run the selected periodic tasks now", permissions=["change"])
    def run_now(self, request: HttpRequest, queryset: QuerySet[PeriodicTask]) -> None:
        from ..client import send_task

        for row in queryset:
            result = send_task(row.task, row.args, row.kwargs, queue=row.queue or None,
                               priority=row.priority)
            self.message_user(request, f"Sent {row.task}[{result.id}] for {row.name!r}.",
                              messages.SUCCESS)

    @admin.action(description="Enable the selected periodic tasks", permissions=["change"])
    def enable(self, request: HttpRequest, queryset: QuerySet[PeriodicTask]) -> None:
        self._set_enabled(request, queryset, True)

    @admin.action(description="Disable the selected periodic tasks", permissions=["change"])
    def disable(self, request: HttpRequest, queryset: QuerySet[PeriodicTask]) -> None:
        self._set_enabled(request, queryset, False)

    def _set_enabled(self, request: HttpRequest, queryset: QuerySet[PeriodicTask],
                     enabled: bool) -> None:
        changed = 0
        for row in queryset.filter(enabled=not enabled):
            row.enabled = enabled
            row.save()  # through save(): the next run is worked out again
            changed += 1
        self.message_user(request, f"{'Enabled' if enabled else 'Disabled'} {changed} "
                                   f"periodic task(s).", messages.SUCCESS)


def _schedule_from(kind: str, query: Any, tz: ZoneInfo) -> schedules.Schedule:
    value = (query.get(kind) or "").strip()
    if not value:
        raise ValueError("Fill in the schedule to see its next runs.")
    if kind == "crontab":
        return schedules.Crontab(value, tz)
    if kind == "interval":
        every = parse_duration(value)
        if every is None:
            raise ValueError(f"{value!r} is not a duration: use HH:MM:SS or 'D HH:MM:SS'.")
        return schedules.Interval(every, timezone.now())
    if kind == "run_at":
        return schedules.Once(_parse_local(query))
    raise ValueError(f"unknown schedule type {kind!r}")


def _parse_local(query: Any) -> datetime:
    # The admin's split date and time inputs arrive as run_at_0 and run_at_1.
    text = " ".join(part for part in (query.get("run_at_0"), query.get("run_at_1")) if part)
    at = parse_datetime(text or query.get("run_at", ""))
    if at is None:
        raise ValueError("Give a date and a time to see when it runs.")
    return at if at.tzinfo else timezone.make_aware(at, timezone.get_current_timezone())


def _preview(schedule: schedules.Schedule, tz: ZoneInfo) -> str:
    shown_tz = schedule.tz if isinstance(schedule, schedules.Crontab) else tz
    runs: Sequence[datetime] = list(schedules.upcoming(schedule, timezone.now(), PREVIEW_RUNS))
    lines = [schedules.describe(schedule, tz)]
    lines += [f"{run.astimezone(shown_tz):%a %Y-%m-%d %H:%M:%S %Z}" for run in runs]
    if not runs:
        lines.append("No run to come.")
    return "\n".join(lines)

