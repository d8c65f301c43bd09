"""core.db_on_loop: a unit of core.sql work runs on the event loop's thread, on an async
connection, with the same transaction semantics as on Django's connection in a thread."""

import asyncio
import threading

import pytest
from django.db import IntegrityError, OperationalError, connection
from django.utils import timezone

from billing_app.models import Provider
from core import db_on_loop, sql
from core.db import db_call
from sessions_app.models import Turn
from tests.sessions_app.helpers import auth, read_stream

pytestmark = [
    pytest.mark.skipif(connection.vendor != "postgresql", reason="the event loop's connections are PostgreSQL's"),
    pytest.mark.django_db(transaction=True),
]


def _row(name: str) -> dict:
    now = timezone.now()
    return {"name": name, "base_url": "http://127.0.0.1:9/v1", "api_key_env": "", "api_key": "",
            "timeout_seconds": None, "created_at": now, "updated_at": now}


def _store(*names: str) -> str:
    """One transaction inserting a provider per name (unique); the thread it ran on."""
    with sql.transaction():
        for name in names:
            sql.insert(Provider, [_row(name)])
    return threading.current_thread().name


def _keys() -> list[str]:
    return sorted(Provider.objects.values_list("name", flat=True))


@pytest.fixture
def fresh_pools(monkeypatch):
    monkeypatch.setattr(db_on_loop, "_pools", {})
    monkeypatch.setattr(db_on_loop, "fallbacks", db_on_loop.fallbacks.__class__())


async def test_a_unit_runs_on_the_loop_thread_and_commits(fresh_pools):
    loop_thread = threading.current_thread().name
    assert await db_call(_store, on_loop=True)("a", "b") == loop_thread
    assert await db_call(_keys)() == ["a", "b"]
    assert not db_on_loop.fallbacks
    await db_on_loop.close()


async def test_its_errors_are_djangos_and_its_transaction_rolls_back(fresh_pools):
    with pytest.raises(IntegrityError):
        await db_call(_store, on_loop=True)("a", "a")  # the second breaks the unique key
    assert await db_call(_keys)() == []
    assert await db_call(_store, on_loop=True)("c")  # the connection is usable again
    assert await db_call(_keys)() == ["c"]
    await db_on_loop.close()


async def test_a_unit_starts_at_once_not_at_the_loop_s_next_turn(fresh_pools):
    """Until its first wait for the server the unit runs in its caller's step: a unit that
    never waits costs no turn of the loop, one that does has sent its statements by then."""
    await db_call(_keys, on_loop=True)()  # the pool's connection made
    turns = []
    asyncio.get_running_loop().call_soon(turns.append, "the loop turned")
    assert await db_call(lambda: "done", on_loop=True)() == "done"
    assert turns == []
    await db_on_loop.close()


async def test_a_unit_that_reaches_the_orm_runs_again_on_the_threads(fresh_pools):
    threads = []

    def store_then_count() -> int:
        threads.append(threading.current_thread().name)
        with sql.transaction():
            sql.insert(Provider, [_row("once")])
            return Provider.objects.count()  # the ORM: refused on the loop's thread

    assert await db_call(store_then_count, on_loop=True)() == 1
    assert threads[0] == threading.current_thread().name and threads[1].startswith("db_call"), threads
    assert await db_call(_keys)() == ["once"]  # the first run's insert was rolled back
    assert list(db_on_loop.fallbacks.values()) == [1]
    await db_on_loop.close()


async def test_units_interleave_on_the_loop_each_in_its_own_transaction(fresh_pools, settings):
    settings.PANTHEON_DB_LOOP_CONNECTIONS = 2  # fewer connections than units: they queue for them
    ticks = 0

    def store_slowly(key: str) -> str:
        with sql.transaction():
            sql.insert(Provider, [_row(key)])
            sql.fetch_one("SELECT pg_sleep(0.05)", [])
            # This transaction's row, and none of the others' uncommitted ones.
            mine = sql.fetch_all(f"SELECT name FROM {sql.table(Provider)} WHERE name = %s", [key])
            return mine[0][0]

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.005)
            ticks += 1

    ticking = asyncio.ensure_future(ticker())
    keys = [f"k{n}" for n in range(8)]
    results = await asyncio.gather(*(db_call(store_slowly, on_loop=True)(key) for key in keys))
    ticking.cancel()
    assert results == keys
    assert await db_call(_keys)() == sorted(keys)
    assert ticks >= 5  # the loop ran other tasks while PostgreSQL slept
    await db_on_loop.close()


async def test_the_loop_has_its_own_number_of_connections_not_the_threads(fresh_pools, settings):
    """PANTHEON_DB_LOOP_CONNECTIONS, not PANTHEON_DB_CALL_THREADS, bounds the units running at
    once: under load four made 200 streams' preflights queue for them (docs/performance.md)."""
    settings.PANTHEON_DB_CALL_THREADS = 1
    settings.PANTHEON_DB_LOOP_CONNECTIONS = 3
    running = peak = 0

    def sleep_a_little() -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        try:
            sql.fetch_one("SELECT pg_sleep(0.1)", [])
        finally:
            running -= 1

    await asyncio.gather(*(db_call(sleep_a_little, on_loop=True)() for _ in range(5)))
    assert peak == 3
    assert len(db_on_loop._pools[asyncio.get_running_loop()].idle) == 3
    await db_on_loop.close()


async def test_a_cancelled_caller_leaves_its_unit_to_finish(fresh_pools):
    def sleep_then_store() -> None:
        sql.fetch_one("SELECT pg_sleep(0.2)", [])
        _store("late")

    caller = asyncio.ensure_future(db_call(sleep_then_store, on_loop=True)())
    await asyncio.sleep(0.05)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    for _ in range(100):
        if await db_call(_keys)():
            break
        await asyncio.sleep(0.02)
    assert await db_call(_keys)() == ["late"]  # as a thread would have
    await db_on_loop.close()


def test_an_ended_loops_connections_are_closed(fresh_pools):
    async def one_unit():
        await db_call(_store, on_loop=True)(f"x{len(db_on_loop._pools)}")
        return db_on_loop._pools[asyncio.get_running_loop()]

    pool = asyncio.run(one_unit())  # ends with the unit's connection idle, not closed
    (raw, _), = pool.idle
    asyncio.run(one_unit())  # a new loop's first unit closes what the ended loops left
    assert raw.closed and not pool.idle


async def test_no_free_connection_in_time_is_an_operational_error(fresh_pools, settings, monkeypatch):
    settings.PANTHEON_DB_LOOP_CONNECTIONS = 1
    options = dict(connection.settings_dict.get("OPTIONS", {}))
    options["pool"] = {**(options.get("pool") or {}), "timeout": 0.2}
    monkeypatch.setitem(connection.settings_dict, "OPTIONS", options)
    busy = asyncio.ensure_future(db_call(lambda: sql.fetch_one("SELECT pg_sleep(1)", []), on_loop=True)())
    await asyncio.sleep(0.1)
    with pytest.raises(OperationalError):
        await db_call(_store, on_loop=True)("y")
    await busy
    await db_on_loop.close()


def test_a_streamed_turn_runs_its_database_work_on_the_loop(alice, session_of, live_server_url, fake_openrouter,
                                                             fake_openrouter_settings, monkeypatch):
    """Through the real server: the preflight and the close of a session's turn ran as units
    on the server's loop, and never needed the threads (no fallback)."""
    from tests.conftest import client_for

    ran = []
    original = db_on_loop.run

    async def counted(fn, *args, **kwargs):
        ran.append(fn.__name__)
        return await original(fn, *args, **kwargs)

    monkeypatch.setattr(db_on_loop, "fallbacks", db_on_loop.fallbacks.__class__())
    monkeypatch.setattr(db_on_loop, "run", counted)
    session = session_of(alice, title="Named already")
    fake_openrouter.enqueue(fake_openrouter.sse_stream(["Hel", "lo"], usage=(12, 2)))
    _, events, _ = read_stream(live_server_url, session, auth(client_for(alice)))
    assert events[-1][0] == "done"
    assert "_preflight" in ran and "close_turn" in ran, ran
    assert not db_on_loop.fallbacks
    assert Turn.objects.get(pk=events[-1][1]["turn_id"]).status == "completed"


def test_a_session_s_first_turn_queues_its_title_on_the_loop(alice, session_of, live_server_url, fake_openrouter,
                                                             fake_openrouter_settings, monkeypatch, settings):
    """The close of an untitled session's first turn queues the title task (core.tasks.enqueue:
    core.sql's INSERT, not the ORM's), so it stays on the loop too; the task is there after."""
    from django_tasks_db.models import DBTaskResult

    from sessions_app.tasks import title_session_task
    from tests.conftest import client_for

    settings.PANTHEON_AUTO_TITLE = True
    monkeypatch.setattr(db_on_loop, "fallbacks", db_on_loop.fallbacks.__class__())
    session = session_of(alice, title="")
    fake_openrouter.enqueue(fake_openrouter.sse_stream(["Hel", "lo"], usage=(12, 2)))
    _, events, _ = read_stream(live_server_url, session, auth(client_for(alice)))
    assert events[-1][0] == "done" and events[-1][1]["status"] == "completed"
    assert not db_on_loop.fallbacks
    task = DBTaskResult.objects.get(task_path=title_session_task.module_path)
    assert task.args_kwargs == {"args": [str(session.id)], "kwargs": {}} and task.status == "READY"


def test_a_key_s_first_openai_call_makes_its_session_on_the_loop(alice, price, live_server_url, fake_openrouter,
                                                                  fake_openrouter_settings, monkeypatch):
    """The OpenAI front door's first call of a key makes the key's API session (a plain INSERT,
    not the ORM's), so that preflight stays on the loop too; a second call finds the session."""
    import httpx

    from accounts.models import ApiKey
    from sessions_app.models import ChatSession
    from tests.conftest import MODEL, client_for

    monkeypatch.setattr(db_on_loop, "fallbacks", db_on_loop.fallbacks.__class__())
    key = client_for(alice)
    ApiKey.objects.update(name="script")
    with httpx.Client(base_url=live_server_url, headers=auth(key), timeout=30) as http:
        for _ in range(2):
            fake_openrouter.enqueue(fake_openrouter.sse_stream(["Hel", "lo"], usage=(12, 2)))
            response = http.post("/v1/chat/completions", json={
                "model": MODEL, "stream": True, "messages": [{"role": "user", "content": "hi"}]})
            assert response.status_code == 200 and "data: [DONE]" in response.text
    assert not db_on_loop.fallbacks
    session = ChatSession.objects.get(api_key__name="script")
    assert session.title == "API: script" and session.user_id == alice.pk and session.model == MODEL
    assert session.turns.count() == 2


def test_a_streamed_turn_makes_no_django_connection_objects_on_the_loop(alice, session_of, live_server_url,
                                                                         monkeypatch):
    """On the event loop every request has its own context, so `connections[...]` would make
    a DatabaseWrapper (its features, operations, introspection) for each: the units use their
    loop's own, and the vendor is read from the settings."""
    from django.db import connections

    from tests.conftest import client_for

    session, headers = session_of(alice), auth(client_for(alice))
    _, events, _ = read_stream(live_server_url, session, headers)  # warm up: the loop's pool
    made = []
    real = type(connections).create_connection

    def counting(handler, alias):
        made.append(threading.current_thread().name)
        return real(handler, alias)

    monkeypatch.setattr(type(connections), "create_connection", counting)
    for _ in range(2):
        _, events, _ = read_stream(live_server_url, session, headers)
        assert events[-1][0] == "done"
    assert "uvicorn-test" not in made, made


def test_a_statement_is_numbered_once_as_postgresql_s_placeholders():
    # The loop's cursors send statements as they are (psycopg's raw cursor): numbered here.
    assert db_on_loop._numbered("SELECT %s, %s WHERE a = '%%'") == (b"SELECT $1, $2 WHERE a = '%'", None)
    assert db_on_loop._numbered("UPDATE t SET a = %(x)s WHERE b = %(y)s OR c = %(x)s") == (
        b"UPDATE t SET a = $1 WHERE b = $2 OR c = $1", ("x", "y"))
    assert db_on_loop._numbered("BEGIN") == (b"BEGIN", None)
    for bad in ("SELECT %d", "SELECT %s, %(x)s", "SELECT 5 % 2"):
        with pytest.raises(ValueError):
            db_on_loop._numbered(bad)


def test_named_and_positional_parameters_reach_postgresql_alike():
    async def run():
        try:
            return await db_call(lambda: (sql.fetch_one("SELECT %(a)s::int + %(b)s::int, %(a)s::int", {"a": 2, "b": 3}),
                                          sql.fetch_one("SELECT %s::text || %s::text", ["x", "y"])), on_loop=True)()
        finally:
            await db_on_loop.close()

    given_up = sum(db_on_loop.fallbacks.values())
    assert asyncio.run(run()) == ((5, 2), ("xy",))
    assert sum(db_on_loop.fallbacks.values()) == given_up  # on the loop's own connection
