"""core.db: the async views' database work runs on a few threads of its own, beside the
threads of Django's sync parts."""

import asyncio
import threading
import time

import pytest

from core import db


@pytest.fixture
def fresh_threads(monkeypatch):
    monkeypatch.setattr(db, "_executors", {})  # sized afresh from the settings
    yield
    for executor in db._executors.values():
        executor.shutdown(wait=True)


def test_db_calls_run_on_at_most_the_call_threads(fresh_threads, settings):
    settings.PANTHEON_DB_CALL_THREADS = 3
    lock, running, most, names = threading.Lock(), [0], [0], set()

    @db.db_call
    def work() -> None:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
            names.add(threading.current_thread().name)
        time.sleep(0.05)
        with lock:
            running[0] -= 1

    async def many() -> None:
        await asyncio.gather(*(work() for _ in range(12)))

    asyncio.run(many())
    assert most[0] == 3
    assert len(names) == 3 and all(name.startswith("db_call") for name in names), names


@pytest.mark.parametrize(("pool", "call_threads", "expected"), [
    (20, 4, (4, 16)),  # the defaults: four lanes for the turns, the rest for Django's sync parts
    (10, 4, (4, 6)),
    (3, 4, (3, 1)),  # a small pool: the lanes take it all, one thread stays for the rest
    (1, 4, (1, 1)),
])
def test_the_two_kinds_of_threads_share_the_pool(monkeypatch, settings, pool, call_threads, expected):
    monkeypatch.setattr(db, "_pool_size", lambda: pool)
    settings.PANTHEON_DB_CALL_THREADS = call_threads
    assert db.thread_counts() == expected


def test_sync_work_runs_on_its_own_threads(fresh_threads):
    name = db.database_threads().submit(lambda: threading.current_thread().name).result()
    assert name.startswith("db_sync"), name
