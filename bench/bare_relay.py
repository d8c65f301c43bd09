"""The floor: a bare relay (plain ASGI and an HTTP client, no database, no auth) that
forwards a chat completion request to the provider and its streamed answer back, byte for
byte, as it arrives. Run it under uvicorn with BENCH_UPSTREAM set to the provider's
completions URL. BENCH_RELAY_CLIENT: `httpx` (the issue's floor, the default) or `aiohttp`
(the client Pantheon's gateway uses: the lower floor)."""

from __future__ import annotations

import os

from bench.asgi_body import read_body

UPSTREAM = os.environ.get("BENCH_UPSTREAM", "http://127.0.0.1:9/v1/chat/completions")
CLIENT = os.environ.get("BENCH_RELAY_CLIENT", "httpx")
HEADERS = {"content-type": "application/json", "accept-encoding": "identity"}
START = {"type": "http.response.start", "status": 200,
         "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]}
_client = None


async def _httpx_relay(body: bytes, send) -> None:
    import httpx

    global _client
    if _client is None:
        _client = httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=2000,
                                                                    max_keepalive_connections=100))
    upstream = await _client.send(_client.build_request("POST", UPSTREAM, content=body, headers=HEADERS),
                                  stream=True)
    try:
        await send({**START, "status": upstream.status_code})
        async for data in upstream.aiter_raw():
            await send({"type": "http.response.body", "body": data, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    finally:
        await upstream.aclose()


async def _aiohttp_relay(body: bytes, send) -> None:
    import aiohttp

    global _client
    if _client is None:
        _client = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=2000),
                                        timeout=aiohttp.ClientTimeout(total=60))
    async with _client.post(UPSTREAM, data=body, headers=HEADERS) as upstream:
        await send({**START, "status": upstream.status})
        async for data in upstream.content.iter_any():
            await send({"type": "http.response.body", "body": data, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


_relay = _aiohttp_relay if CLIENT == "aiohttp" else _httpx_relay


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await _relay(await read_body(receive), send)
