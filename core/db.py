import functools
from collections.abc import Callable
from typing import Any

from asgiref.sync import sync_to_async
from django.db import close_old_connections, connection


def db_call(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`sync_to_async` for one unit of database work from async code.

    The connection goes back (to the pool) as soon as the work is done, so a stream that
    lasts a minute does not hold a database connection for that minute.
    """

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        finally:
            # Inside an atomic block only when a test wraps everything in a transaction.
            if not connection.in_atomic_block:
                close_old_connections()

    return sync_to_async(run)
