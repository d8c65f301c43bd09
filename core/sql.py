"""Plain SQL on Django's connection, for the few statements on the hot path of a turn.

Building a query with the ORM costs about half a millisecond of Python on these machines,
several times the query itself; a turn used to make two dozen. The hot statements are
written once as SQL that PostgreSQL and SQLite both accept, with table and column names
taken from the models and values prepared by the models' own fields, so the schema stays
Django's (migrations, admin, the ORM everywhere else).

`pipeline()` sends what runs inside it to PostgreSQL without waiting for each answer (one
round trip for many statements); on SQLite it does nothing. `transaction()` is one
transaction whose statements travel that way too, BEGIN and COMMIT included.

On PostgreSQL these statements bind their values on the server and are prepared on each
connection at their first use (`PANTHEON_DB_PREPARED_STATEMENTS=false` turns that off): the
server then neither parses nor plans them again, which was most of their time (the
preflight's joined read: 0.7 ms as a new statement, 0.08 ms prepared). Django's ORM keeps
its own cursors (client-side binding, never prepared).

The same functions run a unit of work on the event loop's thread with psycopg's
AsyncConnection (core.db_on_loop: the turn's preflight, renewals and close), which is why
the connection, the cursor and the transaction's state are looked up through it first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, ProgrammingError, connection, connections, models
from django.db import transaction as django_transaction
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from core import db_on_loop
from core.money import quantize_money


def table(model: type[models.Model]) -> str:
    return connection.ops.quote_name(model._meta.db_table)


def column(model: type[models.Model], field: str) -> str:
    return connection.ops.quote_name(model._meta.get_field(field).column)


@functools.cache
def _insert_sql(model: type[models.Model], fields: tuple[str, ...], rows: int, vendor: str,
                ignore_conflicts: bool) -> str:
    columns = ", ".join(column(model, name) for name in fields)
    one = "(" + ", ".join(["%s"] * len(fields)) + ")"
    return (f"INSERT INTO {table(model)} ({columns}) VALUES " + ", ".join([one] * rows)
            + (" ON CONFLICT DO NOTHING" if ignore_conflicts else ""))


@dataclasses.dataclass(frozen=True)
class Write:
    """One data-modifying statement, its values prepared: see write_together(). `name`: what
    the others may call it (its CTE's name), for a statement that reads its RETURNING."""

    sql: str
    params: list[Any]
    name: str | None = None


def inserting(model: type[models.Model], rows: Sequence[dict[str, Any]], *,
              ignore_conflicts: bool = False) -> Write | None:
    """The INSERT of `rows` (dicts of field name to value, all with the same keys) in one
    statement, values through each field's `get_db_prep_save` as the ORM would send them;
    None for no rows."""
    if not rows:
        return None
    db = _db()
    names = tuple(rows[0])
    fields = [model._meta.get_field(name) for name in names]
    params = [field.get_db_prep_save(row[name], db) for row in rows
              for name, field in zip(names, fields, strict=True)]
    return Write(_insert_sql(model, names, len(rows), db.vendor, ignore_conflicts), params)


def updating(model: type[models.Model], pk: Any, values: dict[str, Any], *, after: str | None = None) -> Write:
    """The UPDATE of one row by primary key, values prepared by the fields. `after`: the name
    of a Write sent together with it (PostgreSQL) whose RETURNING row this one joins, so that
    it takes its row lock only once that one has returned its row (and taken its own locks):
    a lock order that one statement's parts would not otherwise keep. No row there, no update.
    On PostgreSQL: elsewhere the writes go one after another, in order anyway."""
    sql = _update_sql(model, tuple(values), vendor())
    if after is not None and vendor() == "postgresql":
        sql = _after_sql(sql, after)
    return Write(sql, _update_params(model, pk, values))


@functools.cache
def _after_sql(sql: str, after: str) -> str:
    return sql.replace(" WHERE ", f" FROM (SELECT FROM {after} LIMIT 1) AS {after}_ WHERE ", 1)


def insert(model: type[models.Model], rows: Sequence[dict[str, Any]], *, ignore_conflicts: bool = False) -> None:
    """INSERT `rows` (see `inserting`) in one statement, which does not wait for its answer
    (see `execute`)."""
    write_together(inserting(model, rows, ignore_conflicts=ignore_conflicts))


def write_together(*writes: Write | None) -> None:
    """Statements that need nothing of each other before the commit (None: left out), on
    PostgreSQL as one statement, each but the last a CTE (PostgreSQL runs every
    data-modifying CTE to its end, whether the statement reads it or not), elsewhere one
    after another. None waits for its answer (see `execute`). They see one snapshot, in an
    order PostgreSQL does not promise: so no two of them may write the same row, and one
    that takes a row lock (an UPDATE) takes it at the statement's place in the
    transaction's lock order. Django's foreign keys are checked at the commit (DEFERRABLE
    INITIALLY DEFERRED): an INSERT may refer to a row another one inserts."""
    present = [write for write in writes if write is not None]
    if len(present) == 1 or (present and vendor() != "postgresql"):
        for write in present:
            execute(write.sql, write.params, count=False)
    elif present:
        execute(_together_sql(tuple((write.name, write.sql) for write in present)),
                [param for write in present for param in write.params], count=False)


@functools.cache
def _together_sql(parts: tuple[tuple[str | None, str], ...]) -> str:
    return ("WITH " + ", ".join(f"{name or f'w{i}'} AS ({part})" for i, (name, part) in enumerate(parts[:-1]))
            + " " + parts[-1][1])


@functools.cache
def _update_sql(model: type[models.Model], fields: tuple[str, ...], vendor: str) -> str:
    assignments = ", ".join(f"{column(model, name)} = %s" for name in fields)
    return f"UPDATE {table(model)} SET {assignments} WHERE {column(model, model._meta.pk.name)} = %s"


def _update_params(model: type[models.Model], pk: Any, values: dict[str, Any]) -> list[Any]:
    db = _db()
    params = [model._meta.get_field(name).get_db_prep_save(value, db) for name, value in values.items()]
    params.append(model._meta.pk.get_db_prep_value(pk, db))
    return params


def update(model: type[models.Model], pk: Any, values: dict[str, Any], *, count: bool = True) -> int:
    """UPDATE one row by primary key, values prepared by the fields; returns the rows
    changed (-1 with `count=False`, which does not wait for the answer: see `execute`)."""
    return execute(_update_sql(model, tuple(values), vendor()), _update_params(model, pk, values), count=count)


@functools.cache
def _guarded_update_sql(model: type[models.Model], fields: tuple[str, ...], where: str) -> str:
    assignments = ", ".join(f"{column(model, name)} = %s" for name in fields)
    return (f"UPDATE {table(model)} SET {assignments} "
            f"WHERE {column(model, model._meta.pk.name)} = %s AND {where} RETURNING 1")


_MATCHED_ONE = Write("SELECT 1 / COUNT(*) FROM updated", [])


def update_or_fail(model: type[models.Model], pk: Any, values: dict[str, Any], *, where: str,
                   together: Sequence[Write | None] = ()) -> None:
    """update() of the row `pk` if `where` (SQL on its columns) holds, waiting for no answer.
    If no row matches, the statement fails in the server (a division by zero: see
    `matched_nothing`), which aborts the transaction it is in, so nothing sent after it
    commits either: one round trip, where a locking read would be one more. `together`:
    writes that go in the same statement (write_together) and fail with it; PostgreSQL may
    run them before the UPDATE, so they must take no row lock of their own. PostgreSQL."""
    write_together(Write(_guarded_update_sql(model, tuple(values), where), _update_params(model, pk, values),
                         name="updated"), *together, _MATCHED_ONE)


def matched_nothing(error: Exception) -> bool:
    """Whether `error` (Django's DataError) is update_or_fail() finding no row."""
    return getattr(error.__cause__, "sqlstate", None) == "22012"


def vendor() -> str:
    """The database's vendor ("postgresql", "sqlite"): for the statements' variants. Not
    `connection.vendor`, which on the event loop makes a connection object per request."""
    return db_on_loop.vendor()


def value(model: type[models.Model], field: str, python_value: Any) -> Any:
    """A value as a query parameter for `model.field` (a UUID for SQLite is its hex, ...)."""
    return model._meta.get_field(field).get_db_prep_value(python_value, _db())


def _db():
    """This thread's connection itself: `django.db.connection` is a proxy that looks it up
    again (in an asgiref Local) on every attribute, which the field methods read often. In a
    unit on the event loop, the loop's own (core.db_on_loop: never connected)."""
    on_loop = db_on_loop.current()
    return on_loop.db if on_loop is not None else connections[DEFAULT_DB_ALIAS]


# Uses of a statement on a connection before psycopg prepares it there: 0, at its first.
# Not more: psycopg (3.3) takes a statement it prepares on a later use inside a pipeline for
# prepared before the server answers, and when an earlier statement of the pipeline failed
# the server skipped it, so its next use fails ("prepared statement _pg3_7 does not exist");
# one prepared at its first use is checked against the answer. psycopg keeps at most 100
# per connection, the least recently used going first (one protocol message each).
PREPARE_THRESHOLD = 0


def _new_cursor(db) -> Any:
    """A cursor of Django's (its error wrapping, query logging, execute wrappers) that binds
    values on the server, so that psycopg can prepare its statements (PostgreSQL); Django's
    own cursor elsewhere; in a unit on the event loop (core.db_on_loop), one of its
    connection's."""
    on_loop = db_on_loop.current()
    if on_loop is not None:
        return on_loop.new_cursor()
    if db.vendor != "postgresql" or not settings.PANTHEON_DB_PREPARED_STATEMENTS:
        return db.cursor()
    from django.db.backends.postgresql.base import ServerBindingCursor  # PostgreSQL only

    db.close_if_health_check_failed()
    db.ensure_connection()
    raw = db.connection
    if raw.prepare_threshold is None:  # Django's default (None: never prepare) for the ORM's
        raw.prepare_threshold = PREPARE_THRESHOLD  # cursors, which never prepare anyway
    with db.wrap_database_errors:
        factory, raw.cursor_factory = raw.cursor_factory, ServerBindingCursor  # for this one cursor:
        try:  # Django's create_cursor() adds the time zone as for any cursor
            return db._prepare_cursor(db.create_cursor())
        finally:
            raw.cursor_factory = factory


@contextlib.contextmanager
def _cursor(prepare: bool = True) -> Iterator[Any]:
    """The open transaction's cursor (one for all its statements: PostgreSQL, see
    `transaction()`), else a new one. Each statement's result is read before the next is
    sent on it, or not at all (`count=False`). `prepare=False`: Django's own cursor, for a
    statement whose text varies (it would take a prepared slot for each variant)."""
    _sending()
    shared = getattr(_st(), "cursor", None)
    if shared is not None and prepare:
        yield shared
        return
    on_loop = db_on_loop.current()
    if on_loop is not None:
        with on_loop.new_cursor(prepare=prepare) as cursor:
            yield cursor
        return
    with (_new_cursor(_db()) if prepare else _db().cursor()) as cursor:
        yield cursor


def fetch_one(sql: str, params: Sequence[Any] | dict[str, Any]) -> tuple | None:
    with _cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchone()


def fetch_all(sql: str, params: Sequence[Any] | dict[str, Any], *, prepare: bool = True) -> list[tuple]:
    with _cursor(prepare) as cursor:
        cursor.execute(sql, params)
        return cursor.fetchall()


def fetch_later(sql: str, params: Sequence[Any] | dict[str, Any]) -> Callable[[], tuple | None]:
    """Send one statement now and read its row later: the returned function gives it (call
    it once). In a pipeline (PostgreSQL) the statement joins the next round trip, the
    COMMIT's inside `transaction()`, and its row is read once that has answered: it runs on
    a cursor of its own, since the transaction's cursor moves on to the next statement.
    Elsewhere it runs at once. Reading it inside the pipeline waits for the answer."""
    if not _pipelined():
        row = fetch_one(sql, params)
        return lambda: row
    _sending()
    on_loop = db_on_loop.current()
    cursor = on_loop.new_cursor() if on_loop is not None else _new_cursor(_db())
    try:
        cursor.execute(sql, params)
    except BaseException:
        cursor.close()
        raise

    def row() -> tuple | None:
        try:
            return cursor.fetchone()
        finally:
            cursor.close()
    return row


def execute(sql: str, params: Sequence[Any] | dict[str, Any], *, count: bool = True) -> int:
    """Run one statement; returns the number of rows it changed. With `count=False` the
    answer is not waited for (inside `pipeline()`, the statement joins the next round trip)
    and -1 is returned."""
    with _cursor() as cursor:
        if count and _pipelined():
            # In a pipeline the count comes with the answer: a nested pipeline block sends
            # what is pending and waits for the answers when it ends (one round trip).
            with _raw_pipeline():
                cursor.execute(sql, params)
            return cursor.rowcount
        cursor.execute(sql, params)
        return cursor.rowcount if count else -1


def _pipelined() -> bool:
    on_loop = db_on_loop.current()
    if on_loop is not None:
        return on_loop.in_pipeline()
    db = _db()
    if db.vendor != "postgresql" or db.connection is None:
        return False
    from psycopg import pq  # here: only PostgreSQL gets this far

    return db.connection.pgconn.pipeline_status != pq.PipelineStatus.OFF


def fetch_together(queries: Sequence[tuple[str, Sequence[Any] | dict[str, Any]]]) -> list[list[tuple]]:
    """Run independent reads in one round trip (pipelined on PostgreSQL): their rows, in order."""
    _sending()
    cursors = []
    try:
        with pipeline():
            for query, params in queries:
                cursor = _new_cursor(_db())
                cursors.append(cursor)
                cursor.execute(query, params)
        return [cursor.fetchall() for cursor in cursors]
    finally:
        for cursor in cursors:
            cursor.close()


def as_uuid(raw: Any) -> uuid.UUID:
    """A UUID column read back (PostgreSQL gives a UUID, SQLite its hex)."""
    return raw if isinstance(raw, uuid.UUID) else uuid.UUID(str(raw))


def as_datetime(raw: Any) -> datetime | None:
    """A datetime column read back (SQLite gives a naive one, or its text), timezone-aware."""
    if raw is None:
        return None
    parsed = raw if isinstance(raw, datetime) else parse_datetime(str(raw))
    return parsed if parsed is None or timezone.is_aware(parsed) else timezone.make_aware(parsed, UTC)


def as_json(raw: Any) -> Any:
    """A JSON column read back (PostgreSQL gives the value, SQLite its text)."""
    return json.loads(raw) if isinstance(raw, str | bytes) else raw


def as_money(raw: Any) -> Decimal:
    """A money column read back (SQLite keeps decimals as floats): 6 places."""
    return quantize_money(Decimal(str(raw)))


@contextlib.contextmanager
def pipeline() -> Iterator[None]:
    """Pipeline mode on PostgreSQL (psycopg 3): statements inside are sent at once and
    their answers collected at the next fetch or at the end. A no-op elsewhere."""
    if db_on_loop.current() is None and connection.vendor != "postgresql":
        yield
        return
    with _raw_pipeline():
        yield


def _raw_pipeline():
    on_loop = db_on_loop.current()
    if on_loop is not None:
        return on_loop.pipeline()
    _db().ensure_connection()
    return _db().connection.pipeline()


# A transaction's depth and cursor (core.sql's own), per thread; a unit on the event loop
# keeps its own on its connection (the loop's thread runs many units at once).
_state = threading.local()


def _st() -> Any:
    on_loop = db_on_loop.current()
    return on_loop if on_loop is not None else _state


@contextlib.contextmanager
def alone() -> Iterator[None]:
    """Room for one statement that needs no transaction around it: a statement is a
    transaction of its own, so BEGIN and COMMIT would be two statements (and on PostgreSQL
    two of psycopg's sends) for nothing. A second one inside raises before it is sent (it
    would commit apart from the first: use `transaction()`, which may itself be the one).
    Inside a transaction it is part of that one."""
    state = _st()
    if getattr(state, "depth", 0):
        yield
        return
    state.alone = 0
    try:
        yield
    finally:
        state.alone = None


def _sending() -> None:
    """A statement (or a transaction) about to go out: the one `alone()` allows."""
    state = _st()
    sent = getattr(state, "alone", None)
    if sent is None:
        return
    if sent:
        raise ProgrammingError("a second statement inside sql.alone(): it would commit apart from the first")
    state.alone = 1


@contextlib.contextmanager
def transaction() -> Iterator[None]:
    """One transaction for the statements inside; a nested call joins the outer one.

    On PostgreSQL, outside any Django `atomic` block, BEGIN and COMMIT are sent as plain
    statements in pipeline mode: whatever inside does not wait for an answer goes out with
    the COMMIT, in one round trip (psycopg's own transactions in pipeline mode add two).
    If anything fails the transaction is rolled back. Code inside must not open a Django
    `atomic` block (it would try to leave autocommit mid-transaction); the ORM's plain
    queries are fine (not in a unit on the event loop: core.db_on_loop, whose statements
    all go through here on its own connection, in the same way). Elsewhere (SQLite, or
    inside a caller's or a test's `atomic`) it is Django's `atomic` (a savepoint inside an
    enclosing one, so a refusal raised through it leaves the enclosing transaction usable).
    """
    state = _st()
    if getattr(state, "alone", None) is None or getattr(state, "depth", 0):
        with _transaction():
            yield
        return
    _sending()  # inside alone(), the transaction is its one statement
    state.alone = None
    try:
        with _transaction():
            yield
    finally:
        state.alone = 1


@contextlib.contextmanager
def _transaction() -> Iterator[None]:
    state, on_loop = _st(), db_on_loop.current()
    if getattr(state, "depth", 0):
        state.depth += 1
        try:
            yield
        finally:
            state.depth -= 1
        return
    if on_loop is None and (connection.vendor != "postgresql" or connection.in_atomic_block
                            or not connection.get_autocommit()):
        with django_transaction.atomic():
            state.depth = 1
            try:
                yield
            finally:
                state.depth = 0
        return
    if on_loop is None:
        db = _db()
        db.ensure_connection()
        raw, errors = db.connection, db.wrap_database_errors
    else:  # its statements' errors are Django's already
        raw, errors = None, contextlib.nullcontext()
    state.depth = 1
    try:
        # Errors surface at the pipeline's sync points: Django's wrapper makes them Django's.
        with errors, _raw_pipeline(), _new_cursor(_db()) as cursor:
            state.cursor = cursor  # one cursor for the plain statements (not the ORM's)
            execute("BEGIN", [], count=False)
            yield
            execute("COMMIT", [], count=False)
    except BaseException:
        if on_loop is not None:
            if on_loop.in_transaction():
                on_loop.execute("ROLLBACK")
        else:
            from psycopg.pq import TransactionStatus  # here: only PostgreSQL gets this far

            if raw.info.transaction_status != TransactionStatus.IDLE:
                raw.execute("ROLLBACK")
        raise
    finally:
        state.depth = 0
        state.cursor = None
