"""Admin for the example shop, with an action that enqueues receipts."""

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from .models import Order, OrderLine
from .tasks import send_receipt


class OrderLineInline(admin.TabularInline):
    model = OrderLine
    extra = 0


@admin.register(Order)
class OrderAdmin(admin.ModelAdmin):
    list_display = ("id", "customer_email", "total", "status", "receipt_sent_at", "created_at")
    list_filter = ("status",)
    search_fields = ("customer_email",)
    readonly_fields = ("created_at", "receipt_sent_at")
    inlines = (OrderLineInline,)
    actions = ("send_receipts",)

    @admin.action(description="Send receipt (in the background)")
    def send_receipts(self, request: HttpRequest, queryset: QuerySet[Order]) -> None:
        order_ids = list(queryset.values_list("pk", flat=True))
        for order_id in order_ids:
            send_receipt.delay(order_id)
        self.message_user(request, f"Queued {len(order_ids)} receipt(s).", messages.SUCCESS)
