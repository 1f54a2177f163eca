from __future__ import annotations

from django.contrib import admin
from django.urls import include, path
from django.views.generic import RedirectView
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from limits import authz, passthrough
from quota_platform import ops

urlpatterns = [
    path("", RedirectView.as_view(pattern_name="admin:index", permanent=False)),
    path("admin/", admin.site.urls),
    path("billing/", include("billing.urls")),
    path("api/v1/authz", authz.authz, name="api-authz"),
    path("api/v1/authz/<path:forwarded_path>", authz.authz, name="api-authz-path"),
    path("api/v1/", include("limits.urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="api-docs"),
    path("healthz", ops.healthz, name="healthz"),
    path("readyz", ops.readyz, name="readyz"),
    path("metrics", ops.metrics, name="metrics"),
    path("v1/chat/completions", passthrough.chat_completions, name="v1-chat-completions"),
    path("v1/completions", passthrough.completions, name="v1-completions"),
    path("v1/embeddings", passthrough.embeddings, name="v1-embeddings"),
]
