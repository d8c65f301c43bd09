from django.conf import settings
from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView

from pantheon.views import healthz

urlpatterns = [
    path("admin/", admin.site.urls),
    path("healthz", healthz, name="healthz"),
    path("api/v1/", include("pantheon.api_urls")),
    # A fixed version: drf-spectacular would copy ?version= into a header (a 500 for "%0a").
    path("api/schema/", SpectacularAPIView.as_view(api_version=settings.SPECTACULAR_SETTINGS["VERSION"]),
         name="schema"),
    # The browser chat page at "/" and /accounts/login/, /accounts/logout/.
    path("", include("web.urls")),
]

handler400 = "pantheon.views.bad_request"
handler403 = "pantheon.views.permission_denied"
handler404 = "pantheon.views.not_found"
handler500 = "pantheon.views.server_error"
