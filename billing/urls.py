from __future__ import annotations

from django.urls import path

from billing import views

app_name = "billing"

urlpatterns = [
    path("", views.dashboard, name="dashboard"),
    path("export.csv", views.export_csv, name="export"),
    path("statements/", views.statements, name="statements"),
    path("statements/<str:tenant>/<str:month>/", views.statement, name="statement"),
]
