"""`python -m uvicorn ...` with a wall-clock timeline of every request, written to
$TIMELINE_OUT (JSON lines) when the process gets SIGTERM. bench/throughput.py
--timeline FILE starts Pantheon this way; `--timeline-report FILE` prints the medians.

Each request's events, in milliseconds from the moment the ASGI app was called: each
unit of database work (queued, started and ended on its thread or on the loop, resumed), the
upstream call opened, the response's start, its first `chunk` frame, and its last body;
the preflight's and the close's main steps. TIMELINE_MARK="module:function,module:Class.method"
marks more (entered `>`, left `<`), e.g. "psycopg:Connection.wait" for each wait on the
server. A profiler distorts where a millisecond goes; this only reads the clock.
TIMELINE_CLOCK=cpu reads the event loop thread's CPU time instead (`time.thread_time`): in a
sequential run, where one request is in flight, what each phase cost the loop, waits left out.
"""

from __future__ import annotations

import contextvars
import functools
import importlib
import inspect
import json
import os
import signal
import sys
import time

_events: contextvars.ContextVar[list | None] = contextvars.ContextVar("timeline", default=None)
_requests: list[tuple[str, list]] = []
now = time.thread_time if os.environ.get("TIMELINE_CLOCK") == "cpu" else time.perf_counter


def mark(name: str) -> None:
    events = _events.get()
    if events is not None:
        events.append((name, now()))


def install() -> None:
    import core.db as db

    original_db_call = db.db_call

    def db_call(fn=None, *, on_loop=False):
        if fn is None:
            return functools.partial(db_call, on_loop=on_loop)
        name = f"db {fn.__name__}"
        work = _marked(fn, f"{name} work-start", f"{name} work-end")  # on a thread, or in a unit on the loop
        return _marked(original_db_call(work, on_loop=on_loop), f"{name} queued", f"{name} resumed")

    db.db_call = db_call

    from llm_gateway import openrouter

    openrouter.OpenRouterGateway._open = _marked(openrouter.OpenRouterGateway._open, "upstream open",
                                                 "upstream headers")

    from sessions_app import turn_views, turns

    for module, names in ((turn_views, ("parse_turn_input", "load_preflight", "begin_turn")),
                          (turns, ("_close_locked",))):
        for name in names:
            function = getattr(module, name)
            setattr(module, name, _marked(function, f"{name} >", f"{name} <"))
    extra = os.environ.get("TIMELINE_MARK", "")  # more: module:function,...
    for spec in filter(None, extra.split(",")):
        module_name, name = spec.split(":")
        module = importlib.import_module(module_name)
        owner, _, attr = name.rpartition(".")
        target = getattr(module, owner) if owner else module
        setattr(target, attr, _marked(getattr(target, attr), f"{spec} >", f"{spec} <"))


def _marked(fn, enter: str, leave: str):
    """`fn` (sync or async) marking `enter` when called and `leave` when it returns or raises."""
    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def marked_async(*args, **kwargs):
            mark(enter)
            try:
                return await fn(*args, **kwargs)
            finally:
                mark(leave)

        return marked_async

    @functools.wraps(fn)
    def marked(*args, **kwargs):
        mark(enter)
        try:
            return fn(*args, **kwargs)
        finally:
            mark(leave)

    return marked


class Timeline:
    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        events: list = [("app", now())]
        _events.set(events)
        _requests.append((scope["path"], events))
        chunked = False

        async def timed_send(message):
            nonlocal chunked
            if message["type"] == "http.response.start":
                events.append(("response start", now()))
            elif message["type"] == "http.response.body":
                body = message.get("body", b"")
                if not chunked and b"chunk" in body:
                    chunked = True
                    events.append(("first chunk sent", now()))
                if not message.get("more_body"):
                    events.append(("last body sent", now()))
            await send(message)

        return await self.app(scope, receive, timed_send)


def dump(*_) -> None:
    with open(os.environ["TIMELINE_OUT"], "w") as out:
        for path, events in _requests:
            start = events[0][1]
            out.write(json.dumps({"path": path, "events": [(name, round((t - start) * 1000, 3))
                                                           for name, t in events]}) + "\n")
    os._exit(0)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, dump)
    sys.path.insert(0, os.getcwd())
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "pantheon.settings")
    import django

    django.setup()
    install()  # before the app's modules make their db_calls
    import pantheon.asgi

    pantheon.asgi.application = Timeline(pantheon.asgi.application)
    sys.argv = ["uvicorn", *sys.argv[1:]]
    import uvicorn.main

    uvicorn.main.main()
