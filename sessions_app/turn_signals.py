"""Signals between the processes serving turns: PostgreSQL LISTEN/NOTIFY.

A process that serves turns listens on one channel with one connection of its own (outside
the pool), opened when its first turn starts. Others send it `cancel <turn id>` (POST
.../cancel reached the wrong process) or `watch <turn id>` (a client follows the turn from
another process, so the serving one checkpoints more often while it does). The database
is already the source of truth for turns, so this needs no other service; a notification
that is lost (the listener was reconnecting) is covered by the turn row itself: the
serving process reads `cancel_requested` at every lease write, and followers poll the row.

On SQLite (the one-process local run) there is nothing to signal: every turn is local.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable

from django.db import connections

from core import db_on_loop, sql

logger = logging.getLogger(__name__)

CHANNEL = "pantheon_turns"
_handlers: dict[str, Callable[[uuid.UUID], None]] = {}
_listener: tuple[asyncio.AbstractEventLoop, asyncio.Task] | None = None


def subscribe(kind: str, handler: Callable[[uuid.UUID], None]) -> None:
    """Call `handler(turn_id)` in this process for each `kind` signal it receives."""
    _handlers[kind] = handler


def enabled() -> bool:
    return db_on_loop.vendor() == "postgresql"


def notify(kind: str, turn_id: uuid.UUID) -> None:
    """Send a signal to every process (sync: call it inside a db_call). Nothing on SQLite."""
    if enabled():
        sql.fetch_one("SELECT pg_notify(%s, %s)", [CHANNEL, f"{kind} {turn_id}"])


def ensure_listening() -> None:
    """Start this process's listener if it does not run yet (on this event loop)."""
    global _listener
    if not enabled():
        return
    loop = asyncio.get_running_loop()
    if _listener is not None and _listener[0] is loop and not _listener[1].done():
        return
    _listener = (loop, loop.create_task(_listen(), name="pantheon-turn-signals"))


def _conninfo() -> str:
    from psycopg.conninfo import make_conninfo

    params = connections["default"].get_connection_params()
    return make_conninfo(**{k: v for k, v in params.items()
                            if k in ("dbname", "user", "password", "host", "port", "sslmode") and v not in (None, "")})


async def _listen() -> None:
    import psycopg

    while True:
        try:
            conn = await psycopg.AsyncConnection.connect(_conninfo(), autocommit=True)
            async with conn:
                await conn.execute(f"LISTEN {CHANNEL}")
                async for note in conn.notifies():
                    _dispatch(note.payload)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the database restarted, say: listen again shortly
            logger.warning("turn signals: listener failed (%s); reconnecting", exc)
            await asyncio.sleep(1)


def _dispatch(payload: str) -> None:
    kind, _, ident = payload.partition(" ")
    handler = _handlers.get(kind)
    if handler is None:
        return
    with contextlib.suppress(ValueError):
        turn_id = uuid.UUID(ident)
        try:
            handler(turn_id)
        except Exception:
            logger.exception("turn signals: %s handler failed", kind)
