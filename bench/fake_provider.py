"""A fast loopback model provider for the benchmark: OpenRouter's streaming wire format,
as a plain ASGI app (run it under uvicorn), so the provider costs as little as possible.

The model name picks the answer's pace: `bench/1s` streams CHUNKS pieces over one second,
any other model streams them at once. Every answer ends with a usage chunk and `[DONE]`.
"""

from __future__ import annotations

import asyncio
import json

from bench.asgi_body import read_body

CHUNKS = 20


def _event(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def _chunk(piece: str) -> bytes:
    return _event({"id": "gen-bench", "model": "bench/upstream", "object": "chat.completion.chunk",
                   "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]})


PIECES = [_chunk(f"p{i} ") for i in range(CHUNKS)]
TAIL = (_event({"id": "gen-bench", "model": "bench/upstream", "choices": [{"index": 0, "delta": {},
                                                                           "finish_reason": "stop"}]})
        + _event({"id": "gen-bench", "model": "bench/upstream", "choices": [],
                  "usage": {"prompt_tokens": 20, "completion_tokens": CHUNKS, "total_tokens": 20 + CHUNKS}})
        + b"data: [DONE]\n\n")


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    body = await read_body(receive)
    try:
        model = json.loads(body).get("model", "")
    except ValueError:
        model = ""
    interval = 1.0 / CHUNKS if model == "bench/1s" else 0.0
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]})
    for index, piece in enumerate(PIECES):
        if index and interval:
            await asyncio.sleep(interval)
        await send({"type": "http.response.body", "body": piece, "more_body": True})
    await send({"type": "http.response.body", "body": TAIL, "more_body": False})
