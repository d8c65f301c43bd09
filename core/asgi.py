"""ASGI wrappers of the kernel."""

from __future__ import annotations

from asgiref.sync import ThreadSensitiveContext

from core.db import database_threads


class SharedThreads:
    """Each request's sync work (Django's request signals and `response.close()`, the sync
    DRF views, static files) runs on the process's database threads, instead of a thread
    Django creates for the request and a second one that joins it at the end: about half a
    millisecond of CPU per request. It also bounds the threads that hold a database
    connection to the pool's size. Django's own per-request context finds this one and
    uses it."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        async with ThreadSensitiveContext(executor=database_threads()):
            return await self.app(scope, receive, send)
