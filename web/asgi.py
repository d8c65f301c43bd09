"""Static files for uvicorn, at the ASGI level (see pantheon/asgi.py)."""

from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler
from django.core.exceptions import SuspiciousOperation
from django.core.handlers.exception import response_for_exception


class StaticFiles(ASGIStaticFilesHandler):
    """Django's ASGIStaticFilesHandler: requests under STATIC_URL are answered from the
    staticfiles finders (the apps' static/ folders; no collectstatic needed), every other
    request goes to the wrapped application untouched.

    One change: Django's handler only turns Http404 into a response, so a path that tries
    to climb out of a static folder (`/static/%2e%2e/...`: SuspiciousFileOperation) would
    be a 500. Here it is a 400, as it is everywhere else in Django.
    """

    def serve(self, request):  # runs in a worker thread (sync_to_async in the base class)
        try:
            return super().serve(request)
        except SuspiciousOperation as exc:
            return response_for_exception(request, exc)
