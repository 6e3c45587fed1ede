"""Surface: the admin dashboard: workers, queue lengths and tasks per minute, refreshing itself."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

from django.apps import apps
from django.apps.registry import Apps
from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.db import models
from django.http import HttpRequest, JsonResponse
from django.template.response import TemplateResponse
from django.urls import URLPattern, path
from django.utils import timezone

from .. import monitor

#: Seconds between the page's refreshes: as often as workers report.
REFRESH_INTERVAL = monitor.HEARTBEAT_INTERVAL
#: Who may see the dashboard: staff who may see task results (view or change).
PERMISSIONS = ("django_tasks_q.view_taskresult", "django_tasks_q.change_taskresult")


class Dashboard(models.Model):
    """The admin's index lists registered models; this one stands for the dashboard there.

    It lives in a registry of its own, so it has no table, no migration and no permissions.
    """

    class Meta:
        apps = Apps()
        app_label = "django_tasks_q"
        managed = False
        verbose_name = verbose_name_plural = "dashboard"

    def __str__(self) -> str:
        return "dashboard"


def may_view(request: HttpRequest) -> bool:
    """True for active staff who may view (or change) task results."""
    user: Any = request.user
    return bool(user.is_active and user.is_staff
                and any(user.has_perm(name) for name in PERMISSIONS))


def ago(seconds: float) -> str:
    """``12 s ago``, ``5 min ago``, ``3 h ago``: how long since a heartbeat."""
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 2 * 3600:
        return f"{seconds // 60:.0f} min ago"
    return f"{seconds // 3600:.0f} h ago"


if TYPE_CHECKING:
    DashboardAdminBase = admin.ModelAdmin[Dashboard]
else:
    # Django's admin classes take no type arguments at run time.
    DashboardAdminBase = admin.ModelAdmin


@admin.register(Dashboard)
class DashboardAdmin(DashboardAdminBase):
    """The dashboard page and its JSON data; nothing to add, change or delete."""

    def has_module_permission(self, request: HttpRequest) -> bool:
        return may_view(request)

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return may_view(request)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def get_urls(self) -> list[URLPattern]:
        page = self.admin_site.admin_view(self.dashboard_view)
        return [
            path("", page, name="django_tasks_q_dashboard"),
            path("data/", self.admin_site.admin_view(self.data_view),
                 name="django_tasks_q_dashboard_data"),
            # The name the admin's index links a model by: the same page.
            path("", page, name="django_tasks_q_dashboard_changelist"),
        ]

    def dashboard_view(self, request: HttpRequest) -> TemplateResponse:
        """The page, rendered in full here; dashboard.js keeps it up to date."""
        if not may_view(request):
            raise PermissionDenied
        now = timezone.now()
        data = monitor.snapshot(now)
        for worker in data["workers"]:
            worker["ago"] = ago(worker["seen_ago"])
        context = {
            **self.admin_site.each_context(request),
            "title": "Dashboard",
            "opts": self.opts,
            "app_name": apps.get_app_config("django_tasks_q").verbose_name,
            "data": data,
            "now": now,
            "busy_minutes": [{**m, "minute": datetime.fromisoformat(m["minute"])}
                             for m in data["minutes"] if m["processed"]],
            "total_processed": sum(m["processed"] for m in data["minutes"]),
            "total_failed": sum(m["failed"] for m in data["minutes"]),
            "refresh": REFRESH_INTERVAL,
        }
        return TemplateResponse(request, "admin/django_tasks_q/dashboard.html", context)

    def data_view(self, request: HttpRequest) -> JsonResponse:
        """What the page shows, as JSON (``monitor.snapshot``), for its refreshes."""
        if not may_view(request):
            raise PermissionDenied
        return JsonResponse(monitor.snapshot())
