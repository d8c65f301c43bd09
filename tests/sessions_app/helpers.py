"""Helpers for turn tests."""

from __future__ import annotations

import json
import time

import httpx

from llm_gateway.sse import SSEDecoder
from sessions_app.models import Turn
from sessions_app.turns import PreparedTurn, TurnInput, begin_turn, load_preflight


def begun_turn(user, session, content: str = "q", **fields) -> PreparedTurn:
    """A turn that passed its preflight: `running`, with its hold and user message."""
    preflight = load_preflight(session_id=session.pk, model=fields.get("model"), user_id=user.pk)
    return begin_turn(preflight, TurnInput(content=content, **fields), streamed=False)


def wait_until_closed(timeout: float = 10.0, **filters) -> Turn:
    """The one turn matching `filters`, once it is no longer running (the server closes it
    in its own task, a moment after the client saw the end)."""
    deadline = time.monotonic() + timeout
    while True:
        turns = list(Turn.objects.filter(**filters))
        if len(turns) == 1 and turns[0].status != Turn.Status.RUNNING:
            return turns[0]
        assert time.monotonic() < deadline, f"no closed turn for {filters}: {[t.status for t in turns]}"
        time.sleep(0.05)


def stream_url(session) -> str:
    return f"/api/v1/sessions/{session.id}/turns/stream"


def auth(user_client) -> dict[str, str]:
    return {"Authorization": f"Bearer {user_client.raw_key}"}


def read_stream(base_url: str, session, key_headers, body=None, *, comments: list | None = None,
                raw_body: bytes | None = None):
    """POST a streamed turn (`body` as JSON, or exactly `raw_body`); returns
    (response, [(event, data, id)], raw bytes of the answer)."""
    decoder, events, raw = SSEDecoder(), [], b""
    if raw_body is not None:
        request = {"content": raw_body, "headers": {**key_headers, "Content-Type": "application/json"}}
    else:
        request = {"json": body or {"content": "Hi there"}, "headers": key_headers}
    with httpx.Client(base_url=base_url, timeout=30) as http:
        with http.stream("POST", stream_url(session), **request) as response:
            if response.headers["content-type"].startswith("application/json"):
                response.read()
                return response, [], response.content
            for data in response.iter_raw():
                raw += data
                for event in decoder.feed(data):
                    events.append((event.event, json.loads(event.data), int(event.id)))
    if comments is not None:
        comments.extend(line for line in raw.split(b"\n") if line.startswith(b":"))
    return response, events, raw


def read_until(base_url: str, session, key_headers, *, characters: int, then=None) -> str:
    """Stream a turn and, once `characters` of its answer arrived, call `then()` (e.g. kill
    the server) if given, and hang up. Returns the answer received."""
    received = ""
    with httpx.Client(base_url=base_url, timeout=30) as http:
        with http.stream("POST", stream_url(session), json={"content": "long"}, headers=key_headers) as response:
            decoder = SSEDecoder()
            for data in response.iter_raw():
                for event in decoder.feed(data):
                    if event.event == "chunk":
                        received += json.loads(event.data)["delta"]
                if len(received) >= characters:
                    if then is not None:
                        then()
                    return received
    raise AssertionError("the stream ended first")
