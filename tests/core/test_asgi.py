"""core.asgi.SharedThreads: no thread created per request."""

import threading
import time

import httpx

from tests.conftest import client_for


def test_requests_create_no_threads(alice, live_server_url, monkeypatch):
    key = client_for(alice).raw_key
    with httpx.Client(base_url=live_server_url, headers={"Authorization": f"Bearer {key}"}) as http:
        stream = "/api/v1/sessions/00000000-0000-0000-0000-000000000000/turns/stream"
        for _ in range(3):  # warm up: the database threads, and the loop's own, start once
            assert http.get("/api/v1/wallet").status_code == 200
            assert http.post(stream, json={"content": "hi"}).status_code == 404
        started = []
        real_start = threading.Thread.start

        def counting_start(thread):
            started.append(thread.name)
            return real_start(thread)

        monkeypatch.setattr(threading.Thread, "start", counting_start)
        for _ in range(10):
            assert http.get("/api/v1/wallet").status_code == 200  # a sync DRF view
            assert http.post(stream, json={"content": "hi"}).status_code == 404
    # Django alone makes two per request (its thread-sensitive context and the join at its end).
    assert [name for name in started if not name.startswith(("db_call", "db_sync"))] == [], started


def _describe(fn, args) -> str:
    # asgiref submits SyncToAsync.thread_handler(loop, exc_info, task_context, func, ...):
    # name the functions it runs, which is what a failure needs to show.
    def name(part) -> str:
        part = getattr(part, "func", part)  # a functools.partial
        return getattr(part, "__qualname__", None) or repr(part)[:60]

    inner = getattr(fn, "args", ()) + tuple(args)
    return " -> ".join(name(part) for part in (fn, *inner) if callable(part))


def test_no_thread_hop_before_the_view(alice, live_server_url, monkeypatch):
    # Django runs its sync request_started receivers through sync_to_async: a thread hop
    # before every view, on the path to the first token. Under Pantheon's ASGI app a turn
    # request sends the threads its preflight (unless it runs on the event loop: PostgreSQL,
    # core.db_on_loop), then Django's response.close(), and no more.
    from core import db_on_loop
    from core.asgi import no_thread_hop_at_request_start
    from core.db import database_threads

    no_thread_hop_at_request_start()  # again: a test client's request (other tests) undoes it
    threads = database_threads()
    submitted = []
    real_submit = type(threads).submit

    def counting_submit(executor, fn, /, *args, **kwargs):
        submitted.append(_describe(fn, args))
        return real_submit(executor, fn, *args, **kwargs)

    # response.close() is sent to the threads after the last byte went out: the client may
    # have the response before it is submitted. So each request's submissions are awaited
    # (and the warm-up's are counted out) before the next is made.
    expected = 1 if db_on_loop.enabled() else 2

    def settle() -> None:
        deadline = time.monotonic() + 5
        while len(submitted) < expected and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)  # and nothing more comes

    key = client_for(alice).raw_key
    stream = "/api/v1/sessions/00000000-0000-0000-0000-000000000000/turns/stream"
    monkeypatch.setattr(type(threads), "submit", counting_submit)
    with httpx.Client(base_url=live_server_url, headers={"Authorization": f"Bearer {key}"}) as http:
        assert http.post(stream, json={"content": "hi"}).status_code == 404  # warm up
        settle()
        submitted.clear()
        assert http.post(stream, json={"content": "hi"}).status_code == 404
        settle()
    assert len(submitted) == expected, submitted


def test_lifespan_runs_every_shutdown_hook_and_passes_other_scopes_on():
    import asyncio

    from core.asgi import Lifespan

    ran, seen = [], []

    async def failing() -> None:
        ran.append("failing")
        raise RuntimeError("boom")

    async def closing() -> None:
        ran.append("closing")

    async def inner(scope, receive, send) -> None:
        seen.append(scope["type"])

    app = Lifespan(inner, on_shutdown=[failing, closing])

    async def drive() -> list[str]:
        messages = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
        sent: list[str] = []

        async def receive():
            return next(messages)

        async def send(message):
            sent.append(message["type"])

        await app({"type": "lifespan"}, receive, send)
        await app({"type": "http"}, receive, send)
        return sent

    assert asyncio.run(drive()) == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert ran == ["failing", "closing"] and seen == ["http"]


def test_the_garbage_collector_is_tuned_for_serving():
    import gc

    from core.asgi import GC_THRESHOLDS, tune_garbage_collector

    before = gc.get_threshold()
    try:
        tune_garbage_collector()
        assert gc.get_threshold() == GC_THRESHOLDS and gc.get_freeze_count() > 10_000
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_a_failing_startup_hook_fails_the_startup():
    import asyncio

    from core.asgi import Lifespan

    def failing() -> None:
        raise RuntimeError("no")

    async def drive() -> list[dict]:
        sent: list[dict] = []

        async def receive():
            return {"type": "lifespan.startup"}

        async def send(message):
            sent.append(message)

        await Lifespan(None, on_startup=[failing])({"type": "lifespan"}, receive, send)
        return sent

    assert asyncio.run(drive()) == [{"type": "lifespan.startup.failed", "message": "RuntimeError('no')"}]
