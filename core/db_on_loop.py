"""A unit of database work (core.sql's statements) run on the event loop's own thread, on
psycopg's AsyncConnection: no thread hand-off, and no thread competing with the loop for the
GIL around every libpq call (docs/performance.md: 3-4 ms of CPU per streamed turn under load).

The unit stays ordinary sync code, so the money path is written once: it runs in a greenlet,
and where core.sql would wait for PostgreSQL it hands the awaitable to the event loop's task
(`await_only`), which awaits it, the loop free meanwhile, and resumes the greenlet with the
answer (SQLAlchemy's asyncio layer works the same way). The same code runs on Django's
connection in a thread for everything else (tasks, the sweep, tests in a transaction, SQLite).

A unit that reaches the ORM (Django refuses it on the loop's thread, before any query) is
given up, its transaction rolled back, and run again on the threads (`core.db.db_call`): so a
unit must be safe to run twice up to its first ORM call, which holds for the turn's preflight
and close (reads, then one transaction). The hot paths never reach it; `fallbacks` counts.

PostgreSQL only; each event loop has its own PANTHEON_DB_LOOP_CONNECTIONS connections at most.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import functools
import logging
import re
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

import greenlet
from django.conf import settings
from django.core.exceptions import SynchronousOnlyOperation
from django.db import DEFAULT_DB_ALIAS, OperationalError, connections

logger = logging.getLogger(__name__)

# Units given up for the threads, by function name (the hot paths must leave it empty).
fallbacks: collections.Counter[str] = collections.Counter()


class NeedsThread(Exception):
    """The unit reached the ORM: run it on the threads instead (nothing of it committed)."""


class _Unit(greenlet.greenlet):
    """One unit of work: its greenlet, and the connection its statements use (which also
    keeps core.sql's transaction state for it: thread-local state would be shared by every
    unit on the loop's thread)."""

    def __init__(self, fn: Callable[..., Any], connection: LoopConnection) -> None:
        super().__init__(fn)
        self.connection = connection
        self.gr_context = contextvars.copy_context()  # the request's context (its log fields)


def current() -> LoopConnection | None:
    """The connection of the unit running now, or None (Django's connection is the one)."""
    unit = greenlet.getcurrent()
    return unit.connection if isinstance(unit, _Unit) else None


def await_only(awaitable: Awaitable[Any]) -> Any:
    """Wait for `awaitable` from a unit's sync code: the event loop's task awaits it."""
    unit = greenlet.getcurrent()
    if not isinstance(unit, _Unit):
        raise RuntimeError("await_only() outside a unit of work on the event loop")
    return unit.parent.switch(awaitable)


async def _drive(unit: _Unit, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    pending = unit.switch(*args, **kwargs)
    while not unit.dead:
        try:
            answer = await pending
        except BaseException:  # the statement failed (or the task was cancelled): in the unit
            pending = unit.throw(*sys.exc_info())
        else:
            pending = unit.switch(answer)
    return pending


_PLACEHOLDER = re.compile(r"%(?:(s)|\((\w+)\)s|(%))|%")


@functools.lru_cache(maxsize=1024)
def _numbered(query: str) -> tuple[bytes, tuple[str, ...] | None]:
    """`query`'s `%s` (or `%(name)s`: the names, in order) as PostgreSQL's `$1, $2, ...`, and
    `%%` as `%`, once per text: psycopg would convert it at every execution, and a statement
    of over 50 parameters or 4 kB (the writes of a turn in one statement) it does not cache,
    so it parsed it again each time (a regular expression over the whole text)."""
    names: list[str] = []
    numbers: dict[str, int] = {}
    positional = 0

    def number(match: re.Match) -> str:
        nonlocal positional
        plain, name, percent = match.groups()
        if percent:
            return "%"
        if plain:
            positional += 1
            return f"${positional}"
        if name:
            if name not in numbers:
                names.append(name)
                numbers[name] = len(names)
            return f"${numbers[name]}"
        raise ValueError(f"a lone % in a statement: {query[:80]!r}")

    text = _PLACEHOLDER.sub(number, query)
    if positional and names:
        raise ValueError(f"a statement mixes %s and %(name)s: {query[:80]!r}")
    return text.encode(), tuple(names) if names else None


class LoopCursor:
    """An AsyncCursor seen from a unit's sync code, its errors Django's (as a Django cursor's).
    Its statements are numbered once (`_numbered`) and sent as they are (psycopg's raw cursor)."""

    def __init__(self, cursor: Any, prepare: bool, errors: Any) -> None:
        self._cursor = cursor
        self._prepare = None if prepare else False  # None: the connection's threshold decides
        self._errors = errors

    def execute(self, query: str, params: Sequence[Any] | dict[str, Any] | None = None) -> None:
        text, names = _numbered(query)
        if names is not None:
            params = [params[name] for name in names]
        with self._errors:
            await_only(self._cursor.execute(text, params or None, prepare=self._prepare))

    def fetchone(self) -> tuple | None:
        with self._errors:
            return await_only(self._cursor.fetchone())

    def fetchall(self) -> list[tuple]:
        with self._errors:
            return await_only(self._cursor.fetchall())

    @property
    def rowcount(self) -> int:
        return self._cursor.rowcount

    def close(self) -> None:
        await_only(self._cursor.close())

    def __enter__(self) -> LoopCursor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class LoopConnection:
    """A pooled AsyncConnection seen from a unit's sync code (what core.sql needs of it)."""

    def __init__(self, connection: Any, db: Any) -> None:
        self.raw = connection
        # Django's DatabaseWrapper of the loop (never connected) for what core.sql asks of
        # one: the fields' value preparation, and psycopg's exceptions as Django's
        # (IntegrityError, OperationalError, ...), as Django's cursors raise them: callers
        # catch Django's. One wrapper, reusable, per unit.
        self.db = db
        self.errors = db.wrap_database_errors
        self.depth = 0  # core.sql.transaction()'s nesting in this unit, and its cursor
        self.cursor: LoopCursor | None = None
        self.alone: int | None = None  # core.sql.alone(): statements sent inside it

    def new_cursor(self, *, prepare: bool = True) -> LoopCursor:
        import psycopg

        return LoopCursor(psycopg.AsyncRawCursor(self.raw), prepare, self.errors)

    @contextlib.contextmanager
    def pipeline(self) -> Iterator[None]:
        manager = self.raw.pipeline()
        with self.errors:
            await_only(manager.__aenter__())
        try:
            yield
        except BaseException:
            with self.errors:
                if not await_only(manager.__aexit__(*sys.exc_info())):
                    raise
        else:
            with self.errors:
                await_only(manager.__aexit__(None, None, None))

    def in_pipeline(self) -> bool:
        from psycopg import pq

        return self.raw.pgconn.pipeline_status != pq.PipelineStatus.OFF

    def in_transaction(self) -> bool:
        from psycopg.pq import TransactionStatus

        return self.raw.info.transaction_status != TransactionStatus.IDLE

    def execute(self, query: str) -> None:
        with self.errors:
            await_only(self.raw.execute(query))


@functools.cache
def _vendor(engine: str) -> str:
    from django.db.utils import load_backend

    return load_backend(engine).DatabaseWrapper.vendor


def vendor() -> str:
    """The default database's vendor, without `connections[...]`: on the event loop that
    makes a DatabaseWrapper for each request's context (its features, operations and
    introspection objects), a tenth of a millisecond per request."""
    return _vendor(connections.settings[DEFAULT_DB_ALIAS]["ENGINE"])


def enabled() -> bool:
    """Whether db_call may run its on-loop units here: PostgreSQL, PANTHEON_DB_ON_LOOP."""
    return settings.PANTHEON_DB_ON_LOOP and vendor() == "postgresql"


class _LoopPool:
    """One event loop's connections: at most PANTHEON_DB_LOOP_CONNECTIONS, made when needed and
    kept idle between units. Not psycopg_pool's AsyncConnectionPool: its background tasks
    swallow a cancellation while they connect, which hangs the loop's shutdown (asyncio.run
    cancels every task, then waits for them); here everything runs in the units' tasks."""

    def __init__(self) -> None:
        # The loop's own wrapper (connections[...] would give each request context its own).
        self.db = db = connections.create_connection(DEFAULT_DB_ALIAS)
        params = db.get_connection_params()
        params.pop("cursor_factory", None)  # Django's sync classes; AsyncConnection's own
        params["autocommit"] = True  # as Django's: core.sql.transaction() sends BEGIN/COMMIT
        from core.sql import PREPARE_THRESHOLD  # (core.sql imports this module)

        params["prepare_threshold"] = PREPARE_THRESHOLD if settings.PANTHEON_DB_PREPARED_STATEMENTS else None
        options = db.settings_dict.get("OPTIONS", {}).get("pool") or {}
        self.params = params
        self.timezone = db.timezone_name
        self.timeout = options.get("timeout", 10.0) if isinstance(options, dict) else 10.0
        self.slots = asyncio.Semaphore(settings.PANTHEON_DB_LOOP_CONNECTIONS)
        self.idle: collections.deque[tuple[Any, float]] = collections.deque()

    @contextlib.asynccontextmanager
    async def connection(self):
        try:
            async with asyncio.timeout(self.timeout):
                await self.slots.acquire()
        except TimeoutError:  # as Django's pool: every connection stayed busy
            raise OperationalError(f"no free database connection on the event loop in {self.timeout} s") from None
        try:
            raw = await self._take()
            try:
                yield raw
            finally:
                await self._give_back(raw)
        finally:
            self.slots.release()

    async def _take(self) -> Any:
        import psycopg

        while self.idle:
            raw, returned = self.idle.pop()
            if time.monotonic() - returned < settings.PANTHEON_DB_CHECK_IDLE_SECONDS and not raw.broken:
                return raw  # in use moments ago (as core.pool's check for Django's pool)
            try:
                await raw.execute("")
                return raw
            except psycopg.Error:
                await raw.close()
        with self.db.wrap_database_errors:
            async with asyncio.timeout(self.timeout):
                raw = await psycopg.AsyncConnection.connect(**self.params)
            # Django sets its connections' time zone the same way (UTC unless TIME_ZONE says).
            await raw.execute("SELECT set_config('TimeZone', %s, false)", [self.timezone])
        return raw

    async def _give_back(self, raw: Any) -> None:
        from psycopg.pq import TransactionStatus

        if raw.closed or raw.broken:
            return
        if raw.info.transaction_status != TransactionStatus.IDLE:
            await raw.close()  # a unit left it mid-transaction (an error): not reused
            return
        self.idle.append((raw, time.monotonic()))

    async def close(self) -> None:
        while self.idle:
            await self.idle.pop()[0].close()

    def discard(self) -> None:
        """Close the idle connections of a loop that ended (no loop to await on)."""
        while self.idle:
            self.idle.pop()[0].pgconn.finish()


_pools: dict[asyncio.AbstractEventLoop, _LoopPool] = {}


def _pool() -> _LoopPool:
    loop = asyncio.get_running_loop()
    pool = _pools.get(loop)
    if pool is None:
        discard_ended_loops()
        pool = _pools[loop] = _LoopPool()
    return pool


def discard_ended_loops() -> None:
    """Close the connections of the loops that have ended (tests' loops)."""
    for loop in [loop for loop in _pools if loop.is_closed()]:
        _pools.pop(loop).discard()


async def close() -> None:
    """Close the running loop's idle connections (a test's server, before its loop ends)."""
    pool = _pools.pop(asyncio.get_running_loop(), None)
    if pool is not None:
        await pool.close()


async def run(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run `fn(*args, **kwargs)` on the event loop with a connection of its pool; raises
    NeedsThread if `fn` reached the ORM (its transaction rolled back)."""
    pool = _pool()
    async with pool.connection() as raw:
        try:
            return await _drive(_Unit(fn, LoopConnection(raw, pool.db)), args, kwargs)
        except SynchronousOnlyOperation:
            name = getattr(fn, "__qualname__", repr(fn))
            fallbacks[name] += 1
            logger.debug("%s reached the ORM: run again on the threads", name, exc_info=True)
            raise NeedsThread from None
