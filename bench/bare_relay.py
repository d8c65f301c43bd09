"""The floor: a bare relay (plain ASGI + httpx, no database, no auth) that forwards a chat
completion request to the provider and its streamed answer back, byte for byte, as it
arrives. Run it under uvicorn with BENCH_UPSTREAM set to the provider's completions URL."""

from __future__ import annotations

import os

import httpx

from bench.asgi_body import read_body

UPSTREAM = os.environ.get("BENCH_UPSTREAM", "http://127.0.0.1:9/v1/chat/completions")
_client: httpx.AsyncClient | None = None


def client() -> httpx.AsyncClient:
    global _client
    if _client is None:
        _client = httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=2000,
                                                                    max_keepalive_connections=100))
    return _client


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    body = await read_body(receive)
    request = client().build_request("POST", UPSTREAM, content=body,
                                     headers={"content-type": "application/json", "accept-encoding": "identity"})
    upstream = await client().send(request, stream=True)
    try:
        await send({"type": "http.response.start", "status": upstream.status_code,
                    "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]})
        async for data in upstream.aiter_raw():
            await send({"type": "http.response.body", "body": data, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    finally:
        await upstream.aclose()
