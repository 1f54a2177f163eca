from __future__ import annotations

from django.urls import path

from limits import views

urlpatterns = [
    path("check", views.CheckView.as_view(), name="api-check"),
    path("usage", views.UsageView.as_view(), name="api-usage"),
    path("quota", views.QuotaView.as_view(), name="api-quota"),
]
