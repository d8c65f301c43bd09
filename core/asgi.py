"""ASGI wrappers of the kernel."""

from __future__ import annotations

from asgiref.sync import ThreadSensitiveContext
from django.core import signals
from django.core.handlers.wsgi import WSGIHandler
from django.db import close_old_connections, reset_queries

from core.db import database_threads


class SharedThreads:
    """Each request's sync work (Django's request signals and `response.close()`, the sync
    DRF views, static files) runs on the process's database threads (`database_threads()`,
    beside db_call's own), instead of a thread Django creates for the request and a second
    one that joins it at the end: about half a millisecond of CPU per request. It also
    bounds the threads that hold a database connection to the pool's size. Django's own
    per-request context finds this one and uses it."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        async with ThreadSensitiveContext(executor=database_threads()):
            return await self.app(scope, receive, send)


def no_thread_hop_at_request_start() -> None:
    """Django's `request_started` receivers (close_old_connections, reset_queries) are sync,
    so the ASGI handler runs them through `sync_to_async`: a thread hop before every view,
    on the path to the first token. Under this app they find nothing to do: every piece of
    sync work runs on the database threads, which hand their connection back after each
    piece (core.db), and the event loop's thread has no connection. They stay connected for
    Django's WSGI handler (runserver). The end of a request is left as Django does it
    (`response.close()` runs in a thread anyway, after the last byte went out)."""
    for receiver in (close_old_connections, reset_queries):
        signals.request_started.disconnect(receiver)
        signals.request_started.connect(receiver, sender=WSGIHandler)
