import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from asgiref.sync import AsyncToSync, sync_to_async
from django.conf import settings
from django.db import close_old_connections, connection

from core import db_on_loop


class _DatabaseThreads(ThreadPoolExecutor):
    """Threads that hand their database connection back (to the pool) after every piece of
    work, as Django does at the end of a request (CONN_MAX_AGE = 0 under ASGI)."""

    def submit(self, fn, /, *args, **kwargs):
        return super().submit(_closing_connections, fn, *args, **kwargs)


def _closing_connections(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    finally:
        # Inside an atomic block only when a test wraps everything in a transaction.
        if not connection.in_atomic_block:
            close_old_connections()


_executors: dict[str, ThreadPoolExecutor] = {}


def _pool_size() -> int:
    pool = settings.DATABASES["default"].get("OPTIONS", {}).get("pool") or {}
    return pool.get("max_size", 20) if isinstance(pool, dict) else 20


def thread_counts() -> tuple[int, int]:
    """(call threads, sync threads): PANTHEON_DB_CALL_THREADS, at most the pool's size, and
    what the pool has left beside them (at least one)."""
    pool = _pool_size()
    calls = max(1, min(settings.PANTHEON_DB_CALL_THREADS, pool))
    return calls, max(1, pool - calls)


def call_threads() -> ThreadPoolExecutor:
    """The threads of every `db_call` (the async views' database work: a turn's preflight,
    its renewals, its close): few, PANTHEON_DB_CALL_THREADS (4), at most the pool's size.

    With the GIL they add no parallelism to Python; what they overlap is waiting on the
    database. Each more thread competing for the GIL with the event loop costs CPU: psycopg
    lets the GIL go around every libpq call, and a thread that wants it back while the loop
    runs waits and switches. Under load (200 streams) 4 threads spent about a fifth less CPU
    than 20, with 40 % fewer context switches (docs/performance.md). So a unit of work must
    never wait for another one to run (a poll until some other request's close committed):
    a few such waits would hold every lane."""
    executor = _executors.get("call")
    if executor is None:
        executor = _executors["call"] = _DatabaseThreads(max_workers=thread_counts()[0], thread_name_prefix="db_call")
    return executor


def database_threads() -> ThreadPoolExecutor:
    """The threads of the rest of the process's sync work: Django's sync parts of each
    request (through core.asgi.SharedThreads: `response.close()`, the sync DRF views, static
    files), as many as the connection pool has connections left beside `call_threads()`, so
    that a thread does not wait for a connection and no request makes a thread of its own
    (Django's default creates one per request, and another to join it). A slow sync view
    holds one of these, never a turn's lane."""
    executor = _executors.get("sync")
    if executor is None:
        executor = _executors["sync"] = _DatabaseThreads(max_workers=thread_counts()[1], thread_name_prefix="db_sync")
    return executor


def db_call(fn: Callable[..., Any] | None = None, *, on_loop: bool = False) -> Any:
    """`sync_to_async` for one unit of database work from async code.

    The connection goes back (to the pool) as soon as the work is done, so a stream that
    lasts a minute does not hold a database connection for that minute. The work runs on
    the process's call threads (`call_threads()`), unless a sync caller is waiting on this
    event loop (Django's test client, a sync middleware): then in that caller's thread, so
    what it holds (a test's transaction) stays visible.

    `on_loop=True` (the turn's preflight, renewals and close, written with core.sql): on
    PostgreSQL the work runs on the event loop's own thread instead, on an async connection
    (core.db_on_loop), and on the threads only if it reaches the ORM. Either way it runs to
    its end when the awaiting caller is cancelled, as a thread would.
    """
    if fn is None:
        return functools.partial(db_call, on_loop=on_loop)
    in_caller_thread = sync_to_async(functools.partial(_closing_connections, fn))
    on_call_threads = None  # made at the first call: the settings size the threads

    async def on_threads(*args: Any, **kwargs: Any) -> Any:
        nonlocal on_call_threads
        if on_call_threads is None:
            # The threads hand the connection back after each call themselves.
            on_call_threads = sync_to_async(fn, thread_sensitive=False, executor=call_threads())
        return await on_call_threads(*args, **kwargs)

    async def on_the_loop(*args: Any, **kwargs: Any) -> Any:
        try:
            return await db_on_loop.run(fn, *args, **kwargs)
        except db_on_loop.NeedsThread:
            return await on_threads(*args, **kwargs)

    @functools.wraps(fn)
    async def call(*args: Any, **kwargs: Any) -> Any:
        if getattr(AsyncToSync.executors, "current", None) is not None:
            return await in_caller_thread(*args, **kwargs)
        if on_loop and db_on_loop.enabled():
            # Started at once, not at the loop's next turn: the unit runs here until it
            # first waits for the server (its statements are sent by then).
            task = asyncio.Task(on_the_loop(*args, **kwargs), loop=asyncio.get_running_loop(), eager_start=True)
            if task.done():
                return task.result()
            task.add_done_callback(_retrieved)
            return await asyncio.shield(task)
        return await on_threads(*args, **kwargs)

    return call


def _retrieved(task: asyncio.Future) -> None:
    """Mark a unit's outcome as seen: its caller may have been cancelled meanwhile."""
    if not task.cancelled():
        task.exception()
