"""ASGI wrappers of the kernel."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence

from asgiref.sync import ThreadSensitiveContext
from django.core import signals
from django.core.handlers.wsgi import WSGIHandler
from django.db import close_old_connections, reset_queries

from core.db import database_threads

logger = logging.getLogger(__name__)


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


class Lifespan:
    """Answers the ASGI lifespan protocol, which Django's handler refuses, so a server that
    stops (uvicorn on SIGTERM, after its requests ended) runs `on_shutdown` on the event
    loop that served them: the connections that belong to that loop (the gateway's HTTP
    session, core.db_on_loop's database connections) are closed, not left to the garbage
    collector's warnings. Each hook runs even if one before it failed."""

    def __init__(self, app, *, on_shutdown: Sequence[Callable[[], Awaitable[None]]] = ()) -> None:
        self.app = app
        self.on_shutdown = tuple(on_shutdown)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "lifespan":
            return await self.app(scope, receive, send)
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                for hook in self.on_shutdown:
                    try:
                        await hook()
                    except Exception:  # the others still run; the process is stopping anyway
                        logger.exception("shutdown hook %s failed", getattr(hook, "__qualname__", hook))
                await send({"type": "lifespan.shutdown.complete"})
                return
