"""Surface: the admin for stored task outcomes: failure triage, retry."""

from __future__ import annotations

from django.contrib import admin

from ..models import TaskResult


@admin.register(TaskResult)
class TaskResultAdmin(admin.ModelAdmin):
    """Stored outcomes: failures with their tracebacks, successes when kept."""

    list_display = ("task_name", "task_id", "status", "queue", "worker", "retries", "date_done")
    list_filter = ("status", "task_name", "queue")
    search_fields = ("task_id", "task_name")
    date_hierarchy = "date_done"
    readonly_fields = ("task_id", "task_name", "status", "args", "kwargs", "result", "traceback",
                       "worker", "queue", "retries", "date_created", "date_started", "date_done")
