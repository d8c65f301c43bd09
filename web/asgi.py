"""The ASGI front of the app (see pantheon/asgi.py): static files for uvicorn, and a guard
that answers 400 for request headers Django itself would turn into a 500."""

from __future__ import annotations

import codecs
import json

from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler
from django.core.exceptions import SuspiciousOperation
from django.core.handlers.exception import response_for_exception
from django.utils.http import parse_header_parameters

FORM_URLENCODED = "application/x-www-form-urlencoded"


def content_type_problem(headers) -> tuple[str, str] | None:
    """`(code, detail)` when Django would fail on the request's Content-Type, else None.

    `headers` are the ASGI scope's `(name, value)` byte pairs. Each case is a 500 in Django
    6.1, before any view or DRF error handling can answer:
    - a Content-Type over 10,000 characters (any URL): the request object cannot be built;
    - a charset Django accepts (any name `codecs.lookup` knows) that cannot decode text with
      errors replaced: bytes-to-bytes codecs (`base64`, `zlib`, `rot13`), `idna`,
      `undefined`. Django's multipart parser (uploads, the login form, CSRF checks) raises;
    - a form-urlencoded body whose charset is not `utf-8` spelled so: Django refuses it with
      a 400, but in DEBUG its error page reads the form again and fails.
    """
    # Django joins repeated headers with commas and decodes them as latin-1, as here.
    values = [value.decode("latin-1") for name, value in headers if name.lower() == b"content-type"]
    if not values:
        return None
    try:
        media_type, params = parse_header_parameters(",".join(values))
    except ValueError:  # too long, or an RFC 2231 parameter in an unknown charset
        return "invalid_content_type", "The Content-Type header is malformed or too long."
    charset = params.get("charset")
    if not charset:
        return None
    try:
        codecs.lookup(charset)
    except LookupError:
        return None  # Django ignores a charset it does not know and reads UTF-8
    unsupported = ("unsupported_charset", f"The request body's charset {charset[:100]!r} is not supported.")
    try:
        b"x".decode(charset, "replace")  # only text codecs that can replace undecodable bytes
    except (LookupError, UnicodeError):
        return unsupported
    if media_type == FORM_URLENCODED and charset.lower() != "utf-8":
        return unsupported
    return None


async def refuse_bad_request(scope, send) -> bool:
    """Answer 400 `{"detail", "code"}` for an HTTP request `content_type_problem` refuses,
    before Django reads it. Returns whether it answered."""
    if scope["type"] != "http" or not (problem := content_type_problem(scope.get("headers", ()))):
        return False
    code, detail = problem
    body = json.dumps({"detail": detail, "code": code}).encode()
    # The body was not read: close the connection rather than leave it on the wire.
    await send({"type": "http.response.start", "status": 400,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
    return True


class ContentTypeGuard:
    """ASGI wrapper: every request first passes `refuse_bad_request`, so a Content-Type
    Django cannot handle is a 400, not a 500."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if await refuse_bad_request(scope, send):
            return None
        return await self.app(scope, receive, send)


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
