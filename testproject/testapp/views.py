"""Views of the example shop: placing an order sends its receipt in the background."""

from django import forms
from django.db import transaction
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_GET, require_http_methods

from .models import Order
from .tasks import send_receipt


class OrderForm(forms.ModelForm):
    class Meta:
        model = Order
        fields = ("customer_email", "total")


@require_http_methods(["GET", "POST"])
def order_create(request: HttpRequest) -> HttpResponse:
    """Place an order and enqueue its receipt."""
    form = OrderForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        with transaction.atomic():
            order = form.save()
            # Published only when the transaction commits: the worker never looks for an
            # order that is not there yet, and a rolled-back order sends no receipt.
            send_receipt.delay(order.pk)
        return redirect("order-detail", pk=order.pk)
    return render(request, "testapp/order_form.html", {"form": form})


@require_GET
def order_detail(request: HttpRequest, pk: int) -> JsonResponse:
    """The order as JSON; ``receipt_sent_at`` fills in once the worker has run the task."""
    order = get_object_or_404(Order, pk=pk)
    return JsonResponse(
        {
            "id": order.pk,
            "customer_email": order.customer_email,
            "total": str(order.total),
            "status": order.status,
            "receipt_sent_at": order.receipt_sent_at,
        }
    )
