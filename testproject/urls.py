"""URLs of the example project: the admin and the shop's order views."""

from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    path("", include("testproject.testapp.urls")),
]
