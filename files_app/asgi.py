"""ASGI guard for uploads.

Django's ASGI handler reads the whole request body (into a temporary file) before any view
runs, so the view's size check comes after a huge body has already been written to disk.
This wrapper answers 413 `file_too_large` for an upload body over the limit *before* Django
reads it: at once when Content-Length says so, or as soon as a body without one
(chunked) passes the limit. Wire it in pantheon/asgi.py:

    application = UploadSizeLimit(get_asgi_application())
"""

from __future__ import annotations

import json

from django.conf import settings

UPLOAD_PATH = "/api/v1/files"


class UploadSizeLimit:
    def __init__(self, app, *, path: str = UPLOAD_PATH) -> None:
        self.app = app
        self.path = path.rstrip("/")

    def _limit(self) -> int:
        from files_app.services import MULTIPART_OVERHEAD_BYTES

        return settings.PANTHEON_MAX_UPLOAD_BYTES + MULTIPART_OVERHEAD_BYTES

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path", "").rstrip("/") != self.path:
            return await self.app(scope, receive, send)
        limit = self._limit()
        for name, value in scope.get("headers", ()):
            if name.lower() == b"content-length" and value.strip().isdigit() and int(value) > limit:
                return await self._reject(send)

        received = 0
        too_big = False

        async def limited_receive():
            nonlocal received, too_big
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # Django treats this as the client leaving: it stops reading and sends nothing.
                    too_big = True
                    return {"type": "http.disconnect"}
            return message

        await self.app(scope, limited_receive, send)
        if too_big:
            await self._reject(send)

    async def _reject(self, send) -> None:
        limit = settings.PANTHEON_MAX_UPLOAD_BYTES
        body = json.dumps({"detail": f"The file is larger than the upload limit of {limit} bytes.",
                           "code": "file_too_large"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
