"""Surface: the admin for stored outcomes and schedules."""

from __future__ import annotations

from django.contrib import admin

from .models import PeriodicTask, TaskResult


@admin.register(TaskResult)
class TaskResultAdmin(admin.ModelAdmin):
    """Stored outcomes: failures with their tracebacks, successes when kept."""

    list_display = ("task_name", "task_id", "status", "queue", "worker", "retries", "date_done")
    list_filter = ("status", "task_name", "queue")
    search_fields = ("task_id", "task_name")
    date_hierarchy = "date_done"
    readonly_fields = ("task_id", "task_name", "status", "args", "kwargs", "result", "traceback",
                       "worker", "queue", "retries", "date_created", "date_started", "date_done")


@admin.register(PeriodicTask)
class PeriodicTaskAdmin(admin.ModelAdmin):
    """Schedules."""

    list_display = ("name", "task", "crontab", "interval", "run_at", "enabled", "last_run_at",
                    "total_run_count")
    list_filter = ("enabled",)
    search_fields = ("name", "task")
