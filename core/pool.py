"""Health checks for pooled PostgreSQL connections (psycopg_pool's `check` and `reset`
callbacks, set in pantheon.settings) that cost a round trip only when it can find something.

Django's default checks every connection the pool hands out with an empty query: a round trip
(and 100-150 µs of CPU here) for each unit of database work: the preflight, each checkpoint
and the close of every streamed turn. A
connection handed back moments ago went through a statement just before; one that sat idle
longer than PANTHEON_DB_CHECK_IDLE_SECONDS (2 s) may have been closed by the server (a
restart, an idle timeout) and is checked as before. The price: a connection the server closes
within that time of its last use fails its next statement once (then the pool drops it),
which the turn lifecycle retries (the close, a checkpoint) or answers 503 (a preflight).

No Django imports: the settings module refers to these functions.
"""

from __future__ import annotations

import time
from typing import Any

_RETURNED_AT = "_pantheon_returned_at"


def note_returned(connection: Any) -> None:
    """The pool's `reset` callback: remember when the connection came back."""
    setattr(connection, _RETURNED_AT, time.monotonic())


def checker(idle_seconds: float):
    """The pool's `check` callback: an empty query unless the connection was in use less
    than `idle_seconds` ago (raising, as psycopg_pool expects, when it is broken)."""

    def check(connection: Any) -> None:
        returned = getattr(connection, _RETURNED_AT, None)
        if returned is not None and time.monotonic() - returned < idle_seconds and not connection.broken:
            return
        connection.execute("")

    return check
