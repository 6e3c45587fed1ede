"""Surface: admin lists that stay fast on big tables: bounded counts, index-friendly sorting."""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING, Any

from django.contrib.admin.views.main import ORDER_VAR, ChangeList
from django.core.paginator import Paginator
from django.http import HttpRequest

if TYPE_CHECKING:
    from django.db.models import Model

    PaginatorBase = Paginator[Model]
else:
    PaginatorBase = Paginator  # Django's Paginator takes no type arguments at run time

#: The most rows a list counts; past it the page says "N+" and offers no further pages.
COUNT_LIMIT = 10_000


class BoundedPaginator(PaginatorBase):
    """Counts at most ``limit`` rows, over a LIMITed subquery, never the whole table."""

    limit = COUNT_LIMIT

    @cached_property
    def _found(self) -> int:
        # COUNT(*) FROM (SELECT … LIMIT limit + 1): the + 1 tells "exactly limit" from "more".
        rows: Any = self.object_list  # a QuerySet: the admin pages through nothing else
        return int(rows.values("pk")[: self.limit + 1].count())

    @property
    def count(self) -> int:
        """Rows found, up to ``limit``."""
        return min(self._found, self.limit)

    @property
    def capped(self) -> bool:
        """True when there are more rows than were counted (the page shows "N+")."""
        return self._found > self.limit


class BoundedChangeList(ChangeList):
    """A change list sortable only by its ``sortable_by`` columns (each backed by an index),
    which loads only what its columns show."""

    #: Columns a list page does not show; loaded again for an action that needs them.
    deferred: tuple[str, ...] = ()

    def get_ordering_field(self, field_name: Any) -> Any:
        # ?o= is honoured for the columns offered as sortable only: any other ordering would
        # sort the whole table for each page.
        if self.sortable_by is not None and field_name not in self.sortable_by:
            return None
        return super().get_ordering_field(field_name)

    def get_ordering(self, request: HttpRequest, queryset: Any) -> list[Any]:
        ordering = list(super().get_ordering(request, queryset))
        if self.params.get(ORDER_VAR) and ordering == ["-pk"]:
            # ?o= named no sortable column: the default order, rather than by primary key.
            del self.params[ORDER_VAR]
            ordering = list(super().get_ordering(request, queryset))
        return ordering

    def get_queryset(self, request: HttpRequest, exclude_parameters: Any = None) -> Any:
        queryset = super().get_queryset(request, exclude_parameters)
        return queryset.defer(*self.deferred) if self.deferred else queryset
