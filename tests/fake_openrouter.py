"""A real HTTP server on loopback that speaks the OpenRouter chat-completions wire format.

It runs in a daemon thread, so it works whatever event loop (or none) a test uses, and the
gateway talks to it over real sockets: real status codes, real chunked SSE, real disconnects.

Usage (the `fake_openrouter` fixture is available to every test through tests/conftest.py)::

    async def test_something(fake_openrouter):
        fake_openrouter.enqueue(
            fake_openrouter.http_error(429, retry_after=0),
            fake_openrouter.completion("Hi!", usage=(12, 3)),
        )
        gateway = OpenRouterGateway(base_url=fake_openrouter.base_url, api_key="test-key",
                                    timeout_seconds=5, backoff_seconds=0)
        ...
        assert fake_openrouter.requests[-1].body["model"] == "openai/gpt-4o-mini"

Replies are consumed in order, one per request, whichever connection it came on. With an
empty queue, a chooser set with `reply_with(choose)` is asked next: `choose(request)` (a
`RecordedRequest`) returns the reply, or None for the default. Concurrent clients that need
replies by content (e.g. a tool turn's second round, whose last message has role "tool") use
it rather than the FIFO queue. Otherwise every request gets the default echo reply: "Hello
from fake upstream" (usage 10/5, model DEFAULT_MODEL), streamed or not according to the
request's "stream" flag. `GET /api/v1/generation?id=...` answers from the generation
registry (below); any other path gets a 404 error body.

Reply constructors (module functions, also reachable as methods of the fixture object):
`completion()`, `tool_call()`, `http_error()`, `sse_stream()`, `sse_tool_calls()` (a streamed
answer that calls tools: `delta.tool_calls` fragments), `slow_stream()`, `raw_stream()`,
`raw_json()` (exact body bytes: invalid UTF-8, NaN, deep nesting...), and `sse_data()` to build
one `data:` event for `raw_stream()`. Text with a lone surrogate (what a JSON "\\ud800" escape
decodes to) cannot be sent as UTF-8, so it always goes out as JSON escapes; `sse_stream(...,
ensure_ascii=True)` escapes every non-ASCII character (NUL is always escaped as "\\u0000").
`.requests` lists what arrived (`RecordedRequest`: method, path, lower-cased headers, parsed
JSON body; `chat_requests()` only the chat completions ones); with `.api_key` set, a chat
request without that Bearer key gets a 401 (and consumes no scripted reply);
`.disconnected` (a threading.Event) is set when a client hung up while a reply
was still being written (cancellation tests). The `fake_openrouter_settings` fixture also
points the Django settings (so `llm_gateway.get_gateway()`) at the server.

Generations (SPEC section 13, provider cost reconciliation). Every 2xx reply built by
`completion()`, `sse_stream()` or `sse_tool_calls()` (so the default replies too) gets a new
id, `gen-fake-<n>` (n = 1, 2, ... per server): it replaces the placeholder id "gen-fake-1"
of the JSON body and of every SSE chunk as they are written (not with
`completion(body_id=False)`, `sse_stream(chunk_ids=False)` or
`sse_tool_calls(chunk_ids=False)`), comes as the `X-Generation-Id` header, and is the
request's `RecordedRequest.generation_id`. `raw_stream()`, `raw_json()` and `http_error()`
replies (and any non-2xx) start no generation. Once its handler is done writing (or has
seen the client go away), the generation's record goes into `.generations[id]`:
- prompt tokens: the reply's scripted usage (`usage`, else a stream's `error_usage`), else
  DEFAULT_PROMPT_TOKENS (10);
- completion tokens: for a stream, 1 per content piece (or tool-call fragment) actually
  written, so a client that goes away after 3 pieces gives 3 (mind that pieces written before the server saw the
  disconnect count: use a `delay` for exact numbers); for a JSON completion, the scripted
  usage's, else 1 per word of `content` (billed in full even if the client leaves);
- `total_cost`: prompt * p + completion * c credits, a float, with
  `(p, c) = .generation_price` (default DEFAULT_GENERATION_PRICE, 1e-6 and 2e-6);
- `cancelled`: the client went away before the stream ended.
`GET /api/v1/generation?id=X` answers 200 `{"data": <record>}` (keys id, model, streamed,
native_tokens_prompt, native_tokens_completion, tokens_prompt, tokens_completion,
total_cost, cancelled), or 404 with an error body for an id without a record (unknown, or
still being served). Scripting: `.generation_lag = N` makes each id answer 404 to its
first N lookups; `.generations[id]` may be replaced (a record dict, or a `JsonReply` such as
`http_error(500)` or `raw_json(b"...")` served as is, even before the id is served: a
finished reply does not overwrite it) or deleted. `.generation_ids` lists the ids served,
in order; `generation_lookups(id)` counts the lookups of one; `wait_for_generation(id)`
waits until its record is final. Lookups are in `.requests` too (method GET, path with the
query).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import json
import select
import socket
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

DEFAULT_MODEL = "openai/gpt-4o-mini-2024-07-18"
DEFAULT_PROVIDER = "OpenAI"
DEFAULT_CONTENT = "Hello from fake upstream"
DEFAULT_PIECES = ("Hello", " from", " fake", " upstream")
DEFAULT_USAGE = (10, 5)
CHAT_PATH = "/api/v1/chat/completions"
GENERATION_PATH = "/api/v1/generation"
# The id the reply constructors put in bodies and chunks; each reply served replaces it with
# its own generation id (`gen-fake-<n>`), so scripted replies stay reusable.
PLACEHOLDER_ID = "gen-fake-1"
_PLACEHOLDER_ID_BYTES = b'"id": "gen-fake-1"'  # as json.dumps writes it in a chunk
# A generation's prompt tokens when its reply scripted no usage.
DEFAULT_PROMPT_TOKENS = DEFAULT_USAGE[0]
# Credits per prompt token and per completion token of a generation record (`total_cost`).
DEFAULT_GENERATION_PRICE = (0.000001, 0.000002)

UsageArg = tuple[int, int] | dict[str, Any] | None


@dataclasses.dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]  # names lower-cased
    body: Any  # parsed JSON, or None if the body was not JSON
    raw_body: bytes
    generation_id: str = ""  # the id of the generation this request's reply started, if any


@dataclasses.dataclass(frozen=True)
class GenerationScript:
    """What a reply built by `completion()`, `sse_stream()` or `sse_tool_calls()` tells the
    generation registry.
    Replies without one (`raw_*`, `http_error`) start no generation and carry no id."""

    model: str
    prompt_tokens: int | None  # the scripted usage's; None: DEFAULT_PROMPT_TOKENS
    completion_tokens: int = 0  # a JSON completion's; a stream counts its pieces as written
    # The indexes of a stream's writes that carry a piece (text, or a tool-call fragment).
    piece_writes: frozenset[int] = frozenset()


@dataclasses.dataclass
class JsonReply:
    """A complete response with a JSON body (a completion or an HTTP error)."""

    body: Any
    status: int = 200
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    delay: float = 0.0  # seconds before the status line is sent (timeouts)
    raw: bytes | None = None  # sent as is instead of json.dumps(body)
    content_type: str = "application/json"
    generation: GenerationScript | None = None


@dataclasses.dataclass
class StreamReply:
    """A streamed response: each item of `writes` is written and flushed on its own."""

    writes: list[bytes]
    status: int = 200
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    content_type: str = "text/event-stream"
    delay: float = 0.0  # seconds between writes
    open_delay: float = 0.0  # seconds before the status line
    chunked: bool = True  # else: no framing, the body ends when the connection closes
    drop_connection: bool = False  # close without the final 0-chunk (transport-level truncation)
    generation: GenerationScript | None = None


Reply = JsonReply | StreamReply
ReplyChooser = Callable[[RecordedRequest], Reply | None]


@dataclasses.dataclass
class _Generation:
    """A generation being served: what its handler has sent so far."""

    id: str
    script: GenerationScript
    streamed: bool
    completion_tokens: int = 0
    cancelled: bool = False


def _usage_dict(usage: UsageArg) -> dict[str, Any] | None:
    if usage is None:
        return None
    if isinstance(usage, dict):
        return usage
    prompt, completion_ = usage
    return {"prompt_tokens": prompt, "completion_tokens": completion_,
            "total_tokens": prompt + completion_, "cost": 0.0001, "is_byok": False}


def _scripted_count(usage: UsageArg, index: int) -> int | None:
    """The prompt (0) or completion (1) tokens a scripted usage says, if it is a sane int."""
    if isinstance(usage, tuple):
        return usage[index]
    if isinstance(usage, dict):
        value = usage.get(("prompt_tokens", "completion_tokens")[index])
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


def tool_call(name: str, arguments: dict[str, Any] | str = "", id: str | None = None) -> dict[str, Any]:
    """A tool call as a non-streaming answer carries it. `arguments` may be a dict (sent as
    JSON text) or the raw string (e.g. "" or invalid JSON)."""
    args = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return {"id": id or f"call_{name}_{zlib.crc32(args.encode()):08x}", "type": "function",
            "function": {"name": name, "arguments": args}}


def completion(content: str | None = DEFAULT_CONTENT, *, tool_calls: Sequence[dict[str, Any]] | None = None,
               usage: UsageArg = DEFAULT_USAGE, model: str = DEFAULT_MODEL, provider: str = DEFAULT_PROVIDER,
               finish_reason: str | None = None, delay: float = 0.0, status: int = 200,
               extra: dict[str, Any] | None = None, body_id: bool = True) -> JsonReply:
    """A non-streaming chat completion. `finish_reason` defaults to "tool_calls" when there
    are tool calls, else "stop". `usage=None` leaves usage out. Served with 2xx, it starts a
    generation: its id is the body's `id` (unless `body_id=False`, or `extra` sets another)
    and the X-Generation-Id header; its record counts the scripted usage, else 1 completion
    token per word of `content`."""
    message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
    if tool_calls:
        message["tool_calls"] = [dict(call, index=i) for i, call in enumerate(tool_calls)]
    reason = finish_reason or ("tool_calls" if tool_calls else "stop")
    body: dict[str, Any] = {
        "id": PLACEHOLDER_ID, "object": "chat.completion", "created": int(time.time()),
        "model": model, "provider": provider, "system_fingerprint": None,
        "choices": [{"index": 0, "logprobs": None, "finish_reason": reason,
                     "native_finish_reason": reason, "message": message}],
    }
    if usage is not None:
        body["usage"] = _usage_dict(usage)
    if not body_id:
        del body["id"]
    body.update(extra or {})
    scripted = _scripted_count(usage, 1)
    words = len(content.split()) if isinstance(content, str) else 0
    script = GenerationScript(model=model, prompt_tokens=_scripted_count(usage, 0),
                              completion_tokens=words if scripted is None else scripted)
    return JsonReply(body=body, status=status, delay=delay, generation=script)


def http_error(status: int, message: str | None = None, *, retry_after: float | str | None = None,
               delay: float = 0.0, headers: dict[str, str] | None = None) -> JsonReply:
    """An OpenRouter error response: body {"error": {"code": status, "message": ...}}."""
    all_headers = dict(headers or {})
    if retry_after is not None:
        all_headers["Retry-After"] = str(retry_after)
    body = {"error": {"code": status, "message": message or f"fake upstream error {status}"}}
    return JsonReply(body=body, status=status, headers=all_headers, delay=delay)


def raw_json(body: bytes, *, status: int = 200, headers: dict[str, str] | None = None,
             content_type: str = "application/json", delay: float = 0.0) -> JsonReply:
    """A complete response whose body is exactly `body` (not necessarily valid JSON or UTF-8)."""
    return JsonReply(body=None, status=status, headers=dict(headers or {}), delay=delay, raw=body,
                     content_type=content_type)


def json_bytes(obj: Any, *, ensure_ascii: bool = False) -> bytes:
    """`obj` as one line of JSON in UTF-8. A lone surrogate has no UTF-8 form, so text with
    one is sent with JSON escapes (as a provider's serializer would) whatever `ensure_ascii`."""
    try:
        return json.dumps(obj, ensure_ascii=ensure_ascii).encode()
    except UnicodeEncodeError:
        return json.dumps(obj, ensure_ascii=True).encode()


def sse_data(obj: Any, *, ensure_ascii: bool = False) -> bytes:
    """One SSE event `data: <json>\\n\\n` (for `raw_stream()`)."""
    return b"data: " + json_bytes(obj, ensure_ascii=ensure_ascii) + b"\n\n"


def _chunk(model: str, provider: str, choices: list[dict[str, Any]], *, ensure_ascii: bool = False,
           chunk_id: bool = True, **extra: Any) -> bytes:
    obj = {"id": PLACEHOLDER_ID, "provider": provider, "model": model, "object": "chat.completion.chunk",
           "created": 1739458867, "choices": choices, **extra}
    if not chunk_id:
        del obj["id"]
    return sse_data(obj, ensure_ascii=ensure_ascii)


def sse_stream(pieces: Sequence[str] = DEFAULT_PIECES, *, model: str = DEFAULT_MODEL,
               provider: str = DEFAULT_PROVIDER, usage: UsageArg = DEFAULT_USAGE,
               usage_shape: str = "empty_choices", finish_reason: str = "stop",
               error_after: int | None = None, error_code: int | str = "server_error",
               error_message: str = "Provider disconnected unexpectedly", error_usage: UsageArg = None,
               done: bool = True, drop_connection: bool = False, comments: bool = True,
               delay: float = 0.0, open_delay: float = 0.0, ensure_ascii: bool = False,
               chunk_ids: bool = True) -> StreamReply:
    """An OpenRouter-style SSE stream of `pieces`, one event per write.

    usage_shape: "empty_choices" (`"choices": []`, as documented) or "empty_delta"
    (`choices` with an empty delta, as also captured). `usage=None`: no usage chunk.
    error_after=N: after N pieces send an error chunk (carrying `error_usage` if given) and
    end the stream. done=False: end cleanly without `data: [DONE]`. drop_connection: close the
    socket without ending the chunked body. ensure_ascii: every non-ASCII character as a JSON
    escape (pieces with lone surrogates are escaped anyway, see `json_bytes()`).

    Served, it starts a generation: its id is every chunk's `id` (unless `chunk_ids=False`)
    and the X-Generation-Id header; its record counts 1 completion token per piece actually
    written (fewer if the client went away), and the prompt tokens of `usage` (else
    `error_usage`, else DEFAULT_PROMPT_TOKENS).
    """
    writes: list[bytes] = []
    piece_writes: set[int] = set()
    chunk = functools.partial(_chunk, ensure_ascii=ensure_ascii, chunk_id=chunk_ids)
    if comments:
        writes.append(b": OPENROUTER PROCESSING\n\n")
    writes.append(chunk(model, provider, [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                           "finish_reason": None, "native_finish_reason": None,
                                           "logprobs": None}]))
    for index, piece in enumerate(pieces):
        if error_after is not None and index == error_after:
            break
        piece_writes.add(len(writes))
        writes.append(chunk(model, provider, [{"index": 0, "delta": {"content": piece},
                                               "finish_reason": None}]))
        if comments and index == 1:
            writes.append(b": OPENROUTER PROCESSING\n\n")
    prompt_tokens = _scripted_count(usage, 0)
    script = GenerationScript(model=model, piece_writes=frozenset(piece_writes),
                              prompt_tokens=_scripted_count(error_usage, 0) if prompt_tokens is None else prompt_tokens)
    if error_after is not None:
        extra: dict[str, Any] = {"error": {"code": error_code, "message": error_message}}
        if error_usage is not None:
            extra["usage"] = _usage_dict(error_usage)
        writes.append(chunk(model, provider, [{"index": 0, "delta": {"content": ""},
                                               "finish_reason": "error"}], **extra))
        return StreamReply(writes=writes, delay=delay, open_delay=open_delay, drop_connection=drop_connection,
                           generation=script)
    writes.append(chunk(model, provider, [{"index": 0, "delta": {"content": ""},
                                           "finish_reason": finish_reason,
                                           "native_finish_reason": finish_reason}]))
    if usage is not None:
        if usage_shape == "empty_choices":
            choices: list[dict[str, Any]] = []
        elif usage_shape == "empty_delta":
            choices = [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]
        else:
            raise ValueError(f"unknown usage_shape {usage_shape!r}")
        writes.append(chunk(model, provider, choices, usage=_usage_dict(usage)))
    if done:
        writes.append(b"data: [DONE]\n\n")
    return StreamReply(writes=writes, delay=delay, open_delay=open_delay, drop_connection=drop_connection,
                       generation=script)


ToolCallArg = tuple[str, dict[str, Any] | str] | tuple[str, dict[str, Any] | str, str]


def _split_text(text: str, parts: int) -> list[str]:
    """`text` in `parts` pieces as equal as can be (fewer if it is shorter; none for "")."""
    if not text:
        return []
    parts = max(1, min(parts, len(text)))
    size, extra = divmod(len(text), parts)
    pieces, start = [], 0
    for index in range(parts):
        end = start + size + (1 if index < extra else 0)
        pieces.append(text[start:end])
        start = end
    return pieces


def sse_tool_calls(calls: Sequence[ToolCallArg] = (("get_weather", '{"city": "Paris"}'),), *,
                   split: int = 3, pieces: Sequence[str] = (), interleave: bool = False,
                   model: str = DEFAULT_MODEL, provider: str = DEFAULT_PROVIDER, usage: UsageArg = DEFAULT_USAGE,
                   finish_reason: str = "tool_calls", done: bool = True, comments: bool = True,
                   delay: float = 0.0, open_delay: float = 0.0, ensure_ascii: bool = False,
                   chunk_ids: bool = True) -> StreamReply:
    """An OpenRouter-style SSE stream of an answer that calls tools, one event per write.

    `calls`: (name, arguments) or (name, arguments, id); arguments a dict (sent as JSON text)
    or the raw string; the id defaults to `tool_call()`'s. `pieces` of text come first (models
    often say something before they call). Each call i is sent as fragments of
    `delta.tool_calls` with `index` i, the way OpenAI and OpenRouter send them: the first
    carries `id`, `type` and `function.name` with empty arguments, then the arguments in
    `split` pieces (as equal as can be), `function.arguments` only. With `interleave`, the
    calls' fragments alternate (parallel calls), else each call's come together. Then a chunk
    with an empty delta and `finish_reason`, the usage chunk (`"choices": []`, unless
    `usage=None`) and `data: [DONE]` (unless `done=False`).

    Served, it starts a generation, as `sse_stream()` does: its id is every chunk's `id`
    (unless `chunk_ids=False`) and the X-Generation-Id header; its record counts 1 completion
    token per text piece or tool-call fragment actually written, and the prompt tokens of
    `usage` (else DEFAULT_PROMPT_TOKENS).
    """
    writes: list[bytes] = []
    piece_writes: set[int] = set()
    chunk = functools.partial(_chunk, ensure_ascii=ensure_ascii, chunk_id=chunk_ids)
    if comments:
        writes.append(b": OPENROUTER PROCESSING\n\n")
    writes.append(chunk(model, provider, [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                           "finish_reason": None, "native_finish_reason": None,
                                           "logprobs": None}]))
    for piece in pieces:
        piece_writes.add(len(writes))
        writes.append(chunk(model, provider, [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]))
    per_call: list[list[dict[str, Any]]] = []
    for index, spec in enumerate(calls):
        name, arguments = spec[0], spec[1]
        text = arguments if isinstance(arguments, str) else json.dumps(arguments)
        call_id = spec[2] if len(spec) > 2 else tool_call(name, text)["id"]
        fragments = [{"index": index, "id": call_id, "type": "function",
                      "function": {"name": name, "arguments": ""}}]
        fragments += [{"index": index, "function": {"arguments": part}} for part in _split_text(text, split)]
        per_call.append(fragments)
    if interleave:
        ordered = [fragments[step] for step in range(max(map(len, per_call), default=0))
                   for fragments in per_call if step < len(fragments)]
    else:
        ordered = [fragment for fragments in per_call for fragment in fragments]
    for fragment in ordered:
        piece_writes.add(len(writes))
        writes.append(chunk(model, provider, [{"index": 0, "delta": {"tool_calls": [fragment]},
                                               "finish_reason": None}]))
        if comments and len(piece_writes) == 2:
            writes.append(b": OPENROUTER PROCESSING\n\n")
    writes.append(chunk(model, provider, [{"index": 0, "delta": {}, "finish_reason": finish_reason,
                                           "native_finish_reason": finish_reason}]))
    if usage is not None:
        writes.append(chunk(model, provider, [], usage=_usage_dict(usage)))
    if done:
        writes.append(b"data: [DONE]\n\n")
    script = GenerationScript(model=model, piece_writes=frozenset(piece_writes),
                              prompt_tokens=_scripted_count(usage, 0))
    return StreamReply(writes=writes, delay=delay, open_delay=open_delay, generation=script)


def slow_stream(pieces: int = 200, *, delay: float = 0.05, **kwargs: Any) -> StreamReply:
    """A long stream written slowly (cancellation tests): "w0 w1 w2 ..."."""
    return sse_stream([f"w{i} " for i in range(pieces)], delay=delay, **kwargs)


def raw_stream(writes: Sequence[bytes], *, delay: float = 0.0, status: int = 200,
               content_type: str = "text/event-stream", chunked: bool = True,
               drop_connection: bool = False, open_delay: float = 0.0,
               headers: dict[str, str] | None = None) -> StreamReply:
    """Exactly these bytes, each written and flushed separately, `delay` seconds apart (no
    generation, no id but what `writes` and `headers` carry)."""
    return StreamReply(writes=list(writes), delay=delay, status=status, content_type=content_type,
                       chunked=chunked, drop_connection=drop_connection, open_delay=open_delay,
                       headers=dict(headers or {}))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        super().setup()
        # Each write must leave at once so the client sees the framing we scripted.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep test output clean

    def do_POST(self) -> None:
        self._serve()

    def do_GET(self) -> None:
        self._serve()

    def _serve(self) -> None:
        fake = self.server.fake
        generation: _Generation | None = None
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        request = RecordedRequest(method=self.command, path=self.path,
                                  headers={k.lower(): v for k, v in self.headers.items()},
                                  body=body, raw_body=raw)
        url = urlsplit(self.path)
        route = url.path.rstrip("/")
        if route == CHAT_PATH and fake.api_key is not None and \
                request.headers.get("authorization") != f"Bearer {fake.api_key}":
            fake._record(request)  # a wrong key consumes no scripted reply
            reply = http_error(401, "No auth credentials found")
        elif route == CHAT_PATH:
            reply: Reply = fake._take_reply(request)
            generation = fake._start_generation(request, reply)
        elif route == GENERATION_PATH and self.command == "GET":
            fake._record(request)
            reply = fake._lookup(parse_qs(url.query).get("id", [""])[0])
        else:
            fake._record(request)
            reply = http_error(404, f"no route {self.path}")
        self.close_connection = True
        try:
            if isinstance(reply, JsonReply):
                self._send_json(reply, generation)
            else:
                self._send_stream(reply, generation)
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            fake.disconnected.set()
            if generation is not None and generation.streamed:  # a JSON answer is billed in full
                generation.cancelled = True
        finally:
            if generation is not None:
                fake._finish_generation(generation)

    def _send_json(self, reply: JsonReply, generation: _Generation | None) -> None:
        if generation is not None:
            # Billed in full, even if the client leaves before the answer (as OpenRouter does).
            generation.completion_tokens = generation.script.completion_tokens
        if reply.delay and self._wait(reply.delay):
            return
        body = reply.body
        if generation is not None and isinstance(body, dict) and body.get("id") == PLACEHOLDER_ID:
            body = {**body, "id": generation.id}
        data = reply.raw if reply.raw is not None else json.dumps(body).encode()
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        if generation is not None:
            self.send_header("X-Generation-Id", generation.id)
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _send_stream(self, reply: StreamReply, generation: _Generation | None) -> None:
        if reply.open_delay and self._wait(reply.open_delay):
            if generation is not None:
                generation.cancelled = True
            return
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        if reply.chunked:
            self.send_header("Transfer-Encoding", "chunked")
        if generation is not None:
            self.send_header("X-Generation-Id", generation.id)
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.end_headers()
        id_bytes = b'"id": ' + json.dumps(generation.id).encode() if generation is not None else b""
        for index, data in enumerate(reply.writes):
            if index and reply.delay and self._wait(reply.delay):
                if generation is not None:
                    generation.cancelled = True  # the client went away mid-stream
                return
            if not data:
                continue  # an empty chunk would end a chunked body
            if generation is not None:
                data = data.replace(_PLACEHOLDER_ID_BYTES, id_bytes)
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if reply.chunked else data)
            if generation is not None and index in generation.script.piece_writes:
                generation.completion_tokens += 1
        if reply.drop_connection:
            # Cut the connection without the terminating chunk.
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        if reply.chunked:
            self.wfile.write(b"0\r\n\r\n")

    def _wait(self, seconds: float) -> bool:
        """Sleep, watching the socket: True if the client went away or the server stops."""
        fake = self.server.fake
        deadline = time.monotonic() + seconds
        while True:
            remaining = deadline - time.monotonic()
            if fake._stopping.is_set():
                return True
            if remaining <= 0:
                return False
            readable, _, _ = select.select([self.connection], [], [], min(remaining, 0.05))
            if readable:
                try:
                    peek = self.connection.recv(1, socket.MSG_PEEK)
                except OSError:
                    peek = b""
                if not peek:  # EOF: the client closed the connection
                    fake.disconnected.set()
                    return True
                time.sleep(min(remaining, 0.01))  # unexpected bytes: don't spin on them


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    fake: FakeOpenRouter

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError | OSError):
            return  # clients hanging up is part of the tests
        super().handle_error(request, client_address)


class FakeOpenRouter:
    """The scripted upstream. See the module docstring."""

    DEFAULT_MODEL = DEFAULT_MODEL
    DEFAULT_CONTENT = DEFAULT_CONTENT
    completion = staticmethod(completion)
    tool_call = staticmethod(tool_call)
    http_error = staticmethod(http_error)
    sse_stream = staticmethod(sse_stream)
    sse_tool_calls = staticmethod(sse_tool_calls)
    slow_stream = staticmethod(slow_stream)
    raw_stream = staticmethod(raw_stream)
    raw_json = staticmethod(raw_json)
    sse_data = staticmethod(sse_data)

    def __init__(self) -> None:
        self.requests: list[RecordedRequest] = []
        # Set when a client closed a connection while we were still answering it.
        self.disconnected = threading.Event()
        # The generation registry (see the module docstring): id -> the record served as
        # {"data": ...}, or a JsonReply served as is instead.
        self.generations: dict[str, dict[str, Any] | JsonReply] = {}
        self.generation_lag = 0  # each id answers 404 to its first `generation_lag` lookups
        self.generation_price: tuple[float, float] = DEFAULT_GENERATION_PRICE
        # When set, a chat request without `Authorization: Bearer <api_key>` gets 401.
        self.api_key: str | None = None
        self._generation_ids: list[str] = []
        self._generations_done: set[str] = set()
        self._lookups: collections.Counter[str] = collections.Counter()
        self._queue: collections.deque[Reply] = collections.deque()
        self._chooser: ReplyChooser | None = None
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._request_seen = threading.Condition(self._lock)
        self._generation_done = threading.Condition(self._lock)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle --

    def start(self) -> FakeOpenRouter:
        server = _Server(("127.0.0.1", 0), _Handler)
        server.fake = self
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01},
                                        name="fake-openrouter", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # wakes handlers sleeping in delays
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FakeOpenRouter:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "server not started"
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v1"

    # -- scripting --

    def enqueue(self, *replies: Reply) -> None:
        """Script the next responses, in order (one per request)."""
        with self._lock:
            self._queue.extend(replies)

    def reply_with(self, choose: ReplyChooser | None) -> None:
        """Once the queue is empty, answer each request with `choose(request)` (None: the
        default reply). Called on the server's handler threads, so it must be thread-safe.
        `reply_with(None)` removes it."""
        with self._lock:
            self._chooser = choose

    @property
    def pending(self) -> int:
        """Scripted replies not yet used."""
        with self._lock:
            return len(self._queue)

    @property
    def last_request(self) -> RecordedRequest:
        with self._lock:
            return self.requests[-1]

    def chat_requests(self) -> list[RecordedRequest]:
        """The chat completion requests that arrived, in order."""
        with self._lock:
            return [r for r in self.requests if urlsplit(r.path).path.rstrip("/") == CHAT_PATH]

    def wait_for_requests(self, count: int, timeout: float = 5.0) -> bool:
        with self._request_seen:
            return self._request_seen.wait_for(lambda: len(self.requests) >= count, timeout)

    @property
    def generation_ids(self) -> list[str]:
        """The ids of the generations served so far, in the order their replies started."""
        with self._lock:
            return list(self._generation_ids)

    def generation_lookups(self, generation_id: str) -> int:
        """How many times `GET /generation?id=<generation_id>` was asked."""
        with self._lock:
            return self._lookups[generation_id]

    def wait_for_generation(self, generation_id: str, timeout: float = 5.0) -> bool:
        """Wait until the handler serving `generation_id` finished (its record is final)."""
        with self._generation_done:
            return self._generation_done.wait_for(lambda: generation_id in self._generations_done, timeout)

    def _start_generation(self, request: RecordedRequest, reply: Reply) -> _Generation | None:
        """A new generation for `reply`, if it is a 2xx built by `completion()`/`sse_stream()`."""
        if reply.generation is None or not 200 <= reply.status < 300:
            return None
        with self._lock:
            generation_id = f"gen-fake-{len(self._generation_ids) + 1}"
            self._generation_ids.append(generation_id)
            request.generation_id = generation_id
        return _Generation(id=generation_id, script=reply.generation, streamed=isinstance(reply, StreamReply))

    def _finish_generation(self, generation: _Generation) -> None:
        """Register the record of a generation whose handler is done (unless a test already
        put one there)."""
        script = generation.script
        prompt = DEFAULT_PROMPT_TOKENS if script.prompt_tokens is None else script.prompt_tokens
        completion_ = generation.completion_tokens
        prompt_price, completion_price = self.generation_price
        cost = prompt * Decimal(str(prompt_price)) + completion_ * Decimal(str(completion_price))
        record = {"id": generation.id, "model": script.model, "streamed": generation.streamed,
                  "native_tokens_prompt": prompt, "native_tokens_completion": completion_,
                  "tokens_prompt": prompt, "tokens_completion": completion_,
                  "total_cost": float(cost), "cancelled": generation.cancelled}
        with self._generation_done:
            self.generations.setdefault(generation.id, record)
            self._generations_done.add(generation.id)
            self._generation_done.notify_all()

    def _lookup(self, generation_id: str) -> JsonReply:
        """The answer to `GET /generation?id=<generation_id>`."""
        with self._lock:
            self._lookups[generation_id] += 1
            lagging = self._lookups[generation_id] <= self.generation_lag
            entry = None if lagging else self.generations.get(generation_id)
        if isinstance(entry, JsonReply):
            return entry
        if entry is None:
            return http_error(404, f"Generation {generation_id} not found")
        return JsonReply(body={"data": entry})

    def _record(self, request: RecordedRequest) -> None:
        with self._request_seen:
            self.requests.append(request)
            self._request_seen.notify_all()

    def _take_reply(self, request: RecordedRequest) -> Reply:
        with self._request_seen:
            self.requests.append(request)
            self._request_seen.notify_all()
            if self._queue:
                return self._queue.popleft()
            choose = self._chooser
        if choose is not None:
            reply = choose(request)
            if reply is not None:
                return reply
        if isinstance(request.body, dict) and request.body.get("stream"):
            return sse_stream()
        return completion()


@pytest.fixture
def fake_openrouter() -> Iterator[FakeOpenRouter]:
    """A fresh scripted OpenRouter on 127.0.0.1 for one test."""
    with FakeOpenRouter() as server:
        yield server


@pytest.fixture
def fake_openrouter_settings(fake_openrouter: FakeOpenRouter, settings: Any) -> FakeOpenRouter:
    """Point the Django settings (and so `llm_gateway.get_gateway()`) at `fake_openrouter`."""
    settings.PANTHEON_LLM_PROVIDER = "openrouter"
    settings.OPENROUTER_BASE_URL = fake_openrouter.base_url
    settings.OPENROUTER_API_KEY = "test-key"
    return fake_openrouter
