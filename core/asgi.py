"""ASGI wrappers of the kernel."""

from __future__ import annotations

import gc
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


# The collector's thresholds for a serving process (Python's defaults: 2000, 10, 10): the
# young generation collected every 20,000 allocations (net), the middle one every 20 of
# those, the whole heap every 100 of those (and only when it grew by a quarter, Python's rule).
GC_THRESHOLDS = (20_000, 20, 100)


def tune_garbage_collector() -> None:
    """Set up the cyclic garbage collector for a serving process, at its start.

    Under the bench's load (docs/performance.md), with Python's defaults the collector took
    about 6 % of the process's CPU (1.3-1.4 s in a `--quick --load-only` run), and a full
    collection walked 165,000 objects, holding the event loop for 250 ms. A streamed turn
    makes thousands of short-lived objects, which reference counting frees and a collection
    only walks again; and those made before the server started (Django, the models, the
    apps' modules) live as long as the process. So the garbage there is now is collected,
    the survivors are frozen (no collection walks them again), and collections come less
    often: 0.25 s of the same run."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


class Lifespan:
    """Answers the ASGI lifespan protocol, which Django's handler refuses. A server that
    starts runs `on_startup`; one that stops (uvicorn on SIGTERM, after its requests ended)
    runs `on_shutdown` on the event loop that served them: the connections that belong to
    that loop (the gateway's HTTP session, core.db_on_loop's database connections) are
    closed, not left to the garbage collector's warnings. Each shutdown hook runs even if
    one before it failed; a failing startup hook stops the server (uvicorn reports it)."""

    def __init__(self, app, *, on_startup: Sequence[Callable[[], None]] = (),
                 on_shutdown: Sequence[Callable[[], Awaitable[None]]] = ()) -> None:
        self.app = app
        self.on_startup = tuple(on_startup)
        self.on_shutdown = tuple(on_shutdown)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "lifespan":
            return await self.app(scope, receive, send)
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    for hook in self.on_startup:
                        hook()
                except Exception as exc:
                    await send({"type": "lifespan.startup.failed", "message": repr(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                for hook in self.on_shutdown:
                    try:
                        await hook()
                    except Exception:  # the others still run; the process is stopping anyway
                        logger.exception("shutdown hook %s failed", getattr(hook, "__qualname__", hook))
                await send({"type": "lifespan.shutdown.complete"})
                return
