import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from asgiref.sync import AsyncToSync, sync_to_async
from django.conf import settings
from django.db import close_old_connections, connection


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


_executor: ThreadPoolExecutor | None = None


def database_threads() -> ThreadPoolExecutor:
    """One pool of threads for the sync work of the process (every db_call, and through
    core.asgi.SharedThreads Django's sync parts of each request), as many as the connection
    pool has connections: a thread never waits for a connection, and no request makes a
    thread of its own (Django's default creates one per request, and another to join it)."""
    global _executor
    if _executor is None:
        pool = settings.DATABASES["default"].get("OPTIONS", {}).get("pool") or {}
        size = pool.get("max_size", 20) if isinstance(pool, dict) else 20
        _executor = _DatabaseThreads(max_workers=size, thread_name_prefix="db_call")
    return _executor


def db_call(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`sync_to_async` for one unit of database work from async code.

    The connection goes back (to the pool) as soon as the work is done, so a stream that
    lasts a minute does not hold a database connection for that minute. The work runs on
    the process's database threads, unless a sync caller is waiting on this event loop
    (Django's test client, a sync middleware): then in that caller's thread, so what it
    holds (a test's transaction) stays visible.
    """
    in_caller_thread = sync_to_async(functools.partial(_closing_connections, fn))
    on_database_threads = None  # made at the first call: the settings size the threads

    @functools.wraps(fn)
    async def call(*args: Any, **kwargs: Any) -> Any:
        nonlocal on_database_threads
        if getattr(AsyncToSync.executors, "current", None) is not None:
            return await in_caller_thread(*args, **kwargs)
        if on_database_threads is None:
            # The threads hand the connection back after each call themselves.
            on_database_threads = sync_to_async(fn, thread_sensitive=False, executor=database_threads())
        return await on_database_threads(*args, **kwargs)

    return call
