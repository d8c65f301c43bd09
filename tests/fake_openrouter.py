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
request's "stream" flag. Any path other than /api/v1/chat/completions gets a 404 error body.

Reply constructors (module functions, also reachable as methods of the fixture object):
`completion()`, `tool_call()`, `http_error()`, `sse_stream()`, `slow_stream()`, `raw_stream()`,
`raw_json()` (exact body bytes: invalid UTF-8, NaN, deep nesting...), and `sse_data()` to build
one `data:` event for `raw_stream()`. Text with a lone surrogate (what a JSON "\\ud800" escape
decodes to) cannot be sent as UTF-8, so it always goes out as JSON escapes; `sse_stream(...,
ensure_ascii=True)` escapes every non-ASCII character (NUL is always escaped as "\\u0000").
`.requests` lists what arrived (`RecordedRequest`: method, path, lower-cased headers, parsed
JSON body); `.disconnected` (a threading.Event) is set when a client hung up while a reply
was still being written (cancellation tests). The `fake_openrouter_settings` fixture also
points the Django settings (so `llm_gateway.get_gateway()`) at the server.
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
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import pytest

DEFAULT_MODEL = "openai/gpt-4o-mini-2024-07-18"
DEFAULT_PROVIDER = "OpenAI"
DEFAULT_CONTENT = "Hello from fake upstream"
DEFAULT_PIECES = ("Hello", " from", " fake", " upstream")
DEFAULT_USAGE = (10, 5)
CHAT_PATH = "/api/v1/chat/completions"

UsageArg = tuple[int, int] | dict[str, Any] | None


@dataclasses.dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]  # names lower-cased
    body: Any  # parsed JSON, or None if the body was not JSON
    raw_body: bytes


@dataclasses.dataclass
class JsonReply:
    """A complete response with a JSON body (a completion or an HTTP error)."""

    body: Any
    status: int = 200
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    delay: float = 0.0  # seconds before the status line is sent (timeouts)
    raw: bytes | None = None  # sent as is instead of json.dumps(body)
    content_type: str = "application/json"


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


Reply = JsonReply | StreamReply
ReplyChooser = Callable[[RecordedRequest], Reply | None]


def _usage_dict(usage: UsageArg) -> dict[str, Any] | None:
    if usage is None:
        return None
    if isinstance(usage, dict):
        return usage
    prompt, completion_ = usage
    return {"prompt_tokens": prompt, "completion_tokens": completion_,
            "total_tokens": prompt + completion_, "cost": 0.0001, "is_byok": False}


def tool_call(name: str, arguments: dict[str, Any] | str = "", id: str | None = None) -> dict[str, Any]:
    """A tool call as a non-streaming answer carries it. `arguments` may be a dict (sent as
    JSON text) or the raw string (e.g. "" or invalid JSON)."""
    args = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return {"id": id or f"call_{name}_{zlib.crc32(args.encode()):08x}", "type": "function",
            "function": {"name": name, "arguments": args}}


def completion(content: str | None = DEFAULT_CONTENT, *, tool_calls: Sequence[dict[str, Any]] | None = None,
               usage: UsageArg = DEFAULT_USAGE, model: str = DEFAULT_MODEL, provider: str = DEFAULT_PROVIDER,
               finish_reason: str | None = None, delay: float = 0.0, status: int = 200,
               extra: dict[str, Any] | None = None) -> JsonReply:
    """A non-streaming chat completion. `finish_reason` defaults to "tool_calls" when there
    are tool calls, else "stop". `usage=None` leaves usage out."""
    message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
    if tool_calls:
        message["tool_calls"] = [dict(call, index=i) for i, call in enumerate(tool_calls)]
    reason = finish_reason or ("tool_calls" if tool_calls else "stop")
    body: dict[str, Any] = {
        "id": "gen-fake-1", "object": "chat.completion", "created": int(time.time()),
        "model": model, "provider": provider, "system_fingerprint": None,
        "choices": [{"index": 0, "logprobs": None, "finish_reason": reason,
                     "native_finish_reason": reason, "message": message}],
    }
    if usage is not None:
        body["usage"] = _usage_dict(usage)
    body.update(extra or {})
    return JsonReply(body=body, status=status, delay=delay)


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
           **extra: Any) -> bytes:
    obj = {"id": "gen-fake-1", "provider": provider, "model": model, "object": "chat.completion.chunk",
           "created": 1739458867, "choices": choices, **extra}
    return sse_data(obj, ensure_ascii=ensure_ascii)


def sse_stream(pieces: Sequence[str] = DEFAULT_PIECES, *, model: str = DEFAULT_MODEL,
               provider: str = DEFAULT_PROVIDER, usage: UsageArg = DEFAULT_USAGE,
               usage_shape: str = "empty_choices", finish_reason: str = "stop",
               error_after: int | None = None, error_code: int | str = "server_error",
               error_message: str = "Provider disconnected unexpectedly", error_usage: UsageArg = None,
               done: bool = True, drop_connection: bool = False, comments: bool = True,
               delay: float = 0.0, open_delay: float = 0.0, ensure_ascii: bool = False) -> StreamReply:
    """An OpenRouter-style SSE stream of `pieces`, one event per write.

    usage_shape: "empty_choices" (`"choices": []`, as documented) or "empty_delta"
    (`choices` with an empty delta, as also captured). `usage=None`: no usage chunk.
    error_after=N: after N pieces send an error chunk (carrying `error_usage` if given) and
    end the stream. done=False: end cleanly without `data: [DONE]`. drop_connection: close the
    socket without ending the chunked body. ensure_ascii: every non-ASCII character as a JSON
    escape (pieces with lone surrogates are escaped anyway, see `json_bytes()`).
    """
    writes: list[bytes] = []
    chunk = functools.partial(_chunk, ensure_ascii=ensure_ascii)
    if comments:
        writes.append(b": OPENROUTER PROCESSING\n\n")
    writes.append(chunk(model, provider, [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                           "finish_reason": None, "native_finish_reason": None,
                                           "logprobs": None}]))
    for index, piece in enumerate(pieces):
        if error_after is not None and index == error_after:
            break
        writes.append(chunk(model, provider, [{"index": 0, "delta": {"content": piece},
                                               "finish_reason": None}]))
        if comments and index == 1:
            writes.append(b": OPENROUTER PROCESSING\n\n")
    if error_after is not None:
        extra: dict[str, Any] = {"error": {"code": error_code, "message": error_message}}
        if error_usage is not None:
            extra["usage"] = _usage_dict(error_usage)
        writes.append(chunk(model, provider, [{"index": 0, "delta": {"content": ""},
                                               "finish_reason": "error"}], **extra))
        return StreamReply(writes=writes, delay=delay, open_delay=open_delay, drop_connection=drop_connection)
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
    return StreamReply(writes=writes, delay=delay, open_delay=open_delay, drop_connection=drop_connection)


def slow_stream(pieces: int = 200, *, delay: float = 0.05, **kwargs: Any) -> StreamReply:
    """A long stream written slowly (cancellation tests): "w0 w1 w2 ..."."""
    return sse_stream([f"w{i} " for i in range(pieces)], delay=delay, **kwargs)


def raw_stream(writes: Sequence[bytes], *, delay: float = 0.0, status: int = 200,
               content_type: str = "text/event-stream", chunked: bool = True,
               drop_connection: bool = False, open_delay: float = 0.0) -> StreamReply:
    """Exactly these bytes, each written and flushed separately, `delay` seconds apart."""
    return StreamReply(writes=list(writes), delay=delay, status=status, content_type=content_type,
                       chunked=chunked, drop_connection=drop_connection, open_delay=open_delay)


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
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        request = RecordedRequest(method=self.command, path=self.path,
                                  headers={k.lower(): v for k, v in self.headers.items()},
                                  body=body, raw_body=raw)
        if urlsplit(self.path).path.rstrip("/") != CHAT_PATH:
            fake._record(request)
            reply: Reply = http_error(404, f"no route {self.path}")
        else:
            reply = fake._take_reply(request)
        self.close_connection = True
        try:
            if isinstance(reply, JsonReply):
                self._send_json(reply)
            else:
                self._send_stream(reply)
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            fake.disconnected.set()

    def _send_json(self, reply: JsonReply) -> None:
        if reply.delay and self._wait(reply.delay):
            return
        data = reply.raw if reply.raw is not None else json.dumps(reply.body).encode()
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _send_stream(self, reply: StreamReply) -> None:
        if reply.open_delay and self._wait(reply.open_delay):
            return
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        if reply.chunked:
            self.send_header("Transfer-Encoding", "chunked")
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.end_headers()
        for index, data in enumerate(reply.writes):
            if index and reply.delay and self._wait(reply.delay):
                return
            if not data:
                continue  # an empty chunk would end a chunked body
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if reply.chunked else data)
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
    slow_stream = staticmethod(slow_stream)
    raw_stream = staticmethod(raw_stream)
    raw_json = staticmethod(raw_json)
    sse_data = staticmethod(sse_data)

    def __init__(self) -> None:
        self.requests: list[RecordedRequest] = []
        # Set when a client closed a connection while we were still answering it.
        self.disconnected = threading.Event()
        self._queue: collections.deque[Reply] = collections.deque()
        self._chooser: ReplyChooser | None = None
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._request_seen = threading.Condition(self._lock)
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

    def wait_for_requests(self, count: int, timeout: float = 5.0) -> bool:
        with self._request_seen:
            return self._request_seen.wait_for(lambda: len(self.requests) >= count, timeout)

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
