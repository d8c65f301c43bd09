"""How much latency does Pantheon add to a streamed turn?

Starts the loopback fake OpenRouter (tests/fake_openrouter.py) and Pantheon in uvicorn, then
streams the same answer directly from the fake upstream and through Pantheon, sequentially
and with concurrent clients, and prints time-to-first-chunk and total time for both.

    .venv/bin/python bench/stream_overhead.py [--streams 50] [--concurrency 10] [--pieces 50]

Uses a throwaway SQLite database unless DATABASE_URL is set (use a scratch PostgreSQL
database for numbers that mean something for production).
"""

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def setup_django(upstream_url: str) -> None:
    os.environ.setdefault("DATABASE_URL", f"sqlite:///{tempfile.mkdtemp()}/bench.sqlite3")
    os.environ.update({"DJANGO_SETTINGS_MODULE": "pantheon.settings", "PANTHEON_LLM_PROVIDER": "openrouter",
                       "OPENROUTER_BASE_URL": upstream_url, "OPENROUTER_API_KEY": "bench",
                       "PANTHEON_CREDIT_ENFORCEMENT": "true", "PANTHEON_LOG_LEVEL": "WARNING"})
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


def make_user() -> tuple[str, str]:
    from decimal import Decimal

    from django.contrib.auth import get_user_model

    from accounts.models import ApiKey
    from billing_app import services
    from sessions_app.models import ChatSession

    services.set_price(model="bench/model", prompt_per_mtok=Decimal("1"), completion_per_mtok=Decimal("1"))
    user, _ = get_user_model().objects.get_or_create(username=f"bench-{time.time_ns()}")
    services.grant(user_id=user.pk, amount=Decimal("1000"))
    _, key = ApiKey.issue(user=user)
    return key, str(ChatSession.objects.create(user=user, model="bench/model").pk)


def start_uvicorn():
    import uvicorn

    from pantheon.asgi import application

    server = uvicorn.Server(uvicorn.Config(application, host="127.0.0.1", port=0, log_level="warning",
                                           lifespan="off", access_log=False))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.01)
    return f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"


async def one_stream(http, url: str, body: dict, headers: dict) -> tuple[float, float]:
    start = time.perf_counter()
    first = None
    async with http.stream("POST", url, json=body, headers=headers) as response:
        async for data in response.aiter_raw():
            if first is None and (b"chunk" in data or b'"content": "p' in data):
                first = time.perf_counter() - start
    return first or float("nan"), time.perf_counter() - start


async def run(label, url, body, headers, streams, concurrency):
    import httpx

    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=concurrency + 5)) as http:
        async def guarded():
            async with limit:
                return await one_stream(http, url, body, headers)

        results = await asyncio.gather(*[guarded() for _ in range(streams)])
    firsts = sorted(r[0] for r in results)
    totals = sorted(r[1] for r in results)
    p95 = lambda xs: xs[int(len(xs) * 0.95) - 1]  # noqa: E731
    print(f"{label:<28} first chunk median {statistics.median(firsts) * 1000:7.1f} ms  p95 {p95(firsts) * 1000:7.1f} ms"
          f"   total median {statistics.median(totals) * 1000:7.1f} ms  p95 {p95(totals) * 1000:7.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--pieces", type=int, default=50)
    args = parser.parse_args()

    from tests.fake_openrouter import FakeOpenRouter, sse_stream

    upstream = FakeOpenRouter().start()
    setup_django(upstream.base_url)
    reply = sse_stream([f"p{i} " for i in range(args.pieces)])
    upstream._take_reply = lambda request: reply  # every request gets the same stream
    key, session_id = make_user()
    base = start_uvicorn()

    direct = (f"{upstream.base_url}/chat/completions", {"model": "m", "stream": True, "messages": []}, {})
    pantheon = (f"{base}/api/v1/sessions/{session_id}/turns/stream", {"content": "bench"},
                {"Authorization": f"Bearer {key}"})
    for concurrency in (1, args.concurrency):
        asyncio.run(run(f"upstream direct (c={concurrency})", *direct, args.streams, concurrency))
        asyncio.run(run(f"through Pantheon (c={concurrency})", *pantheon, args.streams, concurrency))
    upstream.stop()


if __name__ == "__main__":
    main()
