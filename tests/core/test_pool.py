"""The pooled connections' health check (core/pool.py): a round trip only for a connection
that sat idle, so a turn's units of database work do not each pay one."""

from __future__ import annotations

import time

import psycopg
import pytest
from django.conf import settings
from django.db import connection

from core.pool import checker, note_returned


class FakeConnection:
    def __init__(self, broken: bool = False) -> None:
        self.broken = broken
        self.queries: list[str] = []

    def execute(self, query: str) -> None:
        self.queries.append(query)


def test_a_connection_just_handed_back_is_not_queried():
    conn, check = FakeConnection(), checker(5.0)
    note_returned(conn)
    check(conn)
    assert conn.queries == []


def test_a_new_an_idle_or_a_broken_connection_is_checked(monkeypatch):
    check = checker(5.0)
    new = FakeConnection()
    check(new)
    assert new.queries == [""]

    idle = FakeConnection()
    note_returned(idle)
    now = time.monotonic()
    monkeypatch.setattr(time, "monotonic", lambda: now + 6)
    check(idle)
    assert idle.queries == [""]

    broken = FakeConnection(broken=True)
    note_returned(broken)
    monkeypatch.setattr(time, "monotonic", lambda: now)
    check(broken)
    assert broken.queries == [""]


@pytest.mark.skipif(connection.vendor != "postgresql", reason="the pool is PostgreSQL's")
def test_the_pool_uses_it_and_replaces_a_connection_killed_while_idle(transactional_db, monkeypatch):
    pool = settings.DATABASES["default"]["OPTIONS"]["pool"]
    assert pool["reset"] is note_returned and pool["check"].__qualname__ == "checker.<locals>.check"

    def backend_pid() -> int:
        connection.close()  # back to the pool
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            return cursor.fetchone()[0]

    first = backend_pid()
    with psycopg.connect(host="127.0.0.1", user="postgres", dbname=connection.settings_dict["NAME"],
                         autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", [first])
    # Killed while idle: once it is old enough to be checked, the pool replaces it.
    now = time.monotonic()
    monkeypatch.setattr(time, "monotonic", lambda: now + 3600)
    assert backend_pid() != first
    connection.close()
    connection.close_pool()  # others in the pool may be younger than the check's threshold
