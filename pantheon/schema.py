"""The OpenAPI schema endpoint, /api/schema/ (drf-spectacular; see docs/api.md)."""

from django.conf import settings
from drf_spectacular.views import SpectacularAPIView
from rest_framework.renderers import JSONRenderer


class SchemaView(SpectacularAPIView):
    """The schema, YAML by default (`?format=json` for JSON). Its errors (a 405, an unknown
    `?format`: 404) are JSON `{"detail", "code"}` like every other /api/ answer, not YAML."""

    # A fixed version: drf-spectacular would copy ?version= into a header (a 500 for "%0a").
    api_version = settings.SPECTACULAR_SETTINGS["VERSION"]

    def finalize_response(self, request, response, *args, **kwargs):
        response = super().finalize_response(request, response, *args, **kwargs)
        if response.status_code >= 400:
            response.accepted_renderer = JSONRenderer()
            response.accepted_media_type = JSONRenderer.media_type
        return response
