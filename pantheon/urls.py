from django.contrib import admin
from django.urls import include, path, re_path

from pantheon.metrics_view import metrics_view
from pantheon.schema import SchemaView
from pantheon.views import api_docs, api_not_found, healthz
from sessions_app import openai_views

urlpatterns = [
    path("admin/", admin.site.urls),
    path("healthz", healthz, name="healthz"),
    path("metrics", metrics_view, name="metrics"),  # Prometheus: docs/metrics.md
    path("api/v1/", include("pantheon.api_urls")),
    path("api/schema/", SchemaView.as_view(), name="schema"),
    path("api/docs/", api_docs, name="api-docs"),  # Swagger UI over the schema (docs/api.md)
    # Anything else under /api/: a JSON 404, with DEBUG on too (not Django's HTML page).
    re_path(r"^api(?:/|$)", api_not_found),
    # The OpenAI-compatible API (SPEC section 14, docs/openai.md); OpenAI error bodies.
    path("v1/models", openai_views.models, name="openai-models"),
    path("v1/chat/completions", openai_views.chat_completions, name="openai-chat-completions"),
    re_path(r"^v1/(?P<path>.*)$", openai_views.not_found),
    # The browser chat page at "/" and /accounts/login/, /accounts/logout/.
    path("", include("web.urls")),
]

handler400 = "pantheon.views.bad_request"
handler403 = "pantheon.views.permission_denied"
handler404 = "pantheon.views.not_found"
handler500 = "pantheon.views.server_error"
