"""Surface: what every read-only admin with a Retry has: the permission, the detail page's
button and its URL, and refusing actions the user may not run."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, TypeVar

from django.contrib import admin
from django.contrib.admin.utils import unquote
from django.core.exceptions import PermissionDenied
from django.db.models import Model
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseNotAllowed
from django.shortcuts import redirect
from django.urls import URLPattern, path, reverse

M = TypeVar("M", bound=Model)

if TYPE_CHECKING:
    _Base = admin.ModelAdmin
else:
    class _Base(admin.ModelAdmin):
        # Django's admin classes take no type arguments at run time.
        def __class_getitem__(cls, item: Any) -> type:
            return cls


class RetryingAdmin(_Base[M]):
    """Rows the workers write: read, retried (``retry_<model>`` permission) and deleted."""

    #: The detail page, with its Retry button.
    change_form_template = "admin/django_tasks_q/taskresult/change_form.html"

    def retry_title(self, obj: M) -> str:
        """What the detail page's Retry button does, as its tooltip."""
        raise NotImplementedError

    def _retry(self, request: HttpRequest, rows: Iterable[M]) -> None:
        raise NotImplementedError

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # the workers write these rows; the admin reads, retries, deletes

    def has_retry_permission(self, request: HttpRequest) -> bool:
        """May send these again (``retry_<model>``)."""
        opts = self.opts
        return self.has_view_permission(request) and request.user.has_perm(
            f"{opts.app_label}.retry_{opts.model_name}")

    def _url_name(self, view: str) -> str:
        return f"{self.opts.app_label}_{self.opts.model_name}_{view}"

    def get_urls(self) -> list[URLPattern]:
        retry_url = path("<path:object_id>/retry/", self.admin_site.admin_view(self.retry_view),
                         name=self._url_name("retry"))
        return [retry_url, *super().get_urls()]

    def changelist_view(self, request: HttpRequest,
                        extra_context: dict[str, Any] | None = None) -> HttpResponse:
        # An action the user may not run is refused outright, not just left out of the menu.
        chosen = set(request.POST.getlist("action")) if request.method == "POST" else set()
        if ("retry" in chosen and not self.has_retry_permission(request)) or (
                "delete_selected" in chosen and not self.has_delete_permission(request)):
            raise PermissionDenied
        return super().changelist_view(request, extra_context)

    def render_change_form(self, request: HttpRequest, context: dict[str, Any],
                           add: bool = False, change: bool = False, form_url: str = "",
                           obj: M | None = None) -> HttpResponse:
        if obj is not None and self.has_retry_permission(request):
            context = {**context, "can_retry": True, "retry_title": self.retry_title(obj),
                       "retry_url": reverse(f"admin:{self._url_name('retry')}", args=[obj.pk],
                                            current_app=self.admin_site.name)}
        return super().render_change_form(request, context, add, change, form_url, obj)

    def retry_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        """The detail page's Retry button (POST only)."""
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        if not self.has_retry_permission(request):
            raise PermissionDenied
        row = self.get_object(request, unquote(object_id))
        if row is None:
            raise Http404(f"No {self.opts.verbose_name} with id {object_id!r}.")
        self._retry(request, [row])
        return redirect(reverse(f"admin:{self._url_name('change')}", args=[row.pk],
                                current_app=self.admin_site.name))
