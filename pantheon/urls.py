from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView

from pantheon.views import healthz

urlpatterns = [
    path("admin/", admin.site.urls),
    path("healthz", healthz, name="healthz"),
    path("api/v1/", include("pantheon.api_urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    # The browser chat page at "/" and /accounts/login/, /accounts/logout/.
    path("", include("web.urls")),
]

handler400 = "pantheon.views.bad_request"
handler403 = "pantheon.views.permission_denied"
handler404 = "pantheon.views.not_found"
handler500 = "pantheon.views.server_error"
