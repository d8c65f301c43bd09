"""The OpenRouter gateway: the OpenAI-compatible chat completions API over aiohttp.

Works with any OpenAI-compatible base URL (OpenRouter, vLLM, Ollama, the test server).
Wire format: /work/shared/reference/openrouter-protocol.md. The provider is not trusted to
be well-formed: see the guarantees in `llm_gateway.base`, and the size limits below.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import functools
import json
import logging
import math
import secrets
import ssl
import threading
import time
from collections.abc import AsyncGenerator, Mapping
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

import aiohttp
import certifi
import orjson
from aiohttp.helpers import get_env_proxy_for_url
from yarl import URL

from core.money import quantize_money
from core.text import REPLACEMENT, clean_text, find_unstorable

from ._tools import clean_json_strings, run_tool_call
from .base import (
    CallRecord,
    ChatMessage,
    Completion,
    GatewayError,
    Generation,
    GenerationNotFound,
    LlmGateway,
    StreamingContext,
    ToolCall,
    ToolCallDelta,
    ToolExecutor,
    UpstreamError,
    UpstreamTimeout,
    Usage,
    content_text,
    ms_since,
    offered_client_tools,
    passthrough_params,
    token_count,
    tool_calls_finish_reason,
)
from .sse import SSEDecoder, SSEEvent, SSEEventTooLarge
from .tokens import estimate_prompt_tokens, estimate_tokens

__all__ = ["OpenRouterGateway", "aclose_shared_client", "shared_client"]

logger = logging.getLogger("llm_gateway")

RETRY_STATUSES = frozenset({429, 502, 503})
MAX_RETRY_AFTER_SECONDS = 30.0
# Everything the provider sends is bounded, so no answer can exhaust memory or not fit the
# columns it is stored in (an LLM event row: provider_model 200 and provider 100 characters;
# a tool message's tool_call_id 200). Messages may reach users: keep them short.
MAX_EVENT_BYTES = 16 * 1024 * 1024  # one SSE event; a 10 MB delta still passes
MAX_BODY_BYTES = 64 * 1024 * 1024  # a non-streamed answer
MAX_ERROR_BODY_BYTES = 1024 * 1024  # an error body: only its message is wanted (403s echo the input)
MAX_MESSAGE_CHARS = 500
MAX_MODEL_CHARS = 200
MAX_PROVIDER_CHARS = 100
MAX_FINISH_REASON_CHARS = 64
MAX_TOOL_CALL_ID_CHARS = 200
MAX_TOOL_NAME_CHARS = 256  # OpenAI allows 64; a tool call's name is stored in its JSON
MAX_GENERATION_ID_CHARS = 200  # an LLM event's generation_id column
MAX_GENERATION_BODY_BYTES = 1024 * 1024  # a generation record is a few hundred bytes
# A reported cost above this many credits is no real call's (and would not fit a money
# column, 14 integer digits, once summed): it is ignored, like any other nonsense cost.
MAX_PROVIDER_COST = Decimal(10**9)
_MAX_COST_CHARS = 64  # a numeric string longer than this is no cost
# Each call becomes a stored tool message (a turn's message positions are small ints) and an
# executor run: calls past this many in one answer are dropped, from the assistant message too.
MAX_TOOL_CALLS_PER_ROUND = 128
# The arguments of a streamed answer's tool calls are kept (to assemble the calls): at most
# this many characters in all, past which the stream fails as "too large" (a real call's are
# a few kB; a non-streamed answer is bounded by MAX_BODY_BYTES as a whole).
MAX_TOOL_ARGUMENTS_CHARS = 16 * 1024 * 1024
# Open connections: more than a worker's streams. Every idle one is kept (for 30 s at most): a
# pool that keeps fewer reconnects (a TCP and, to a real provider, a TLS handshake per turn,
# milliseconds of CPU) each time the load dips and comes back.
_MAX_CONNECTIONS = 2000
_KEEPALIVE_SECONDS = 30.0


@functools.cache
def _tls() -> ssl.SSLContext:
    """Certificates checked against certifi's CA bundle (as httpx did before): the same
    providers verify on any machine, whatever CA store it has."""
    return ssl.create_default_context(cafile=certifi.where())


def _session(**options: Any) -> aiohttp.ClientSession:
    # Not trust_env: with it aiohttp hands two lookups to threads on every request (~/.netrc,
    # and the proxy variables), two thread hops before each upstream call; the proxy is
    # looked up once per URL instead (_proxy_for), and a provider's key is its auth.
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=_MAX_CONNECTIONS, ssl=_tls(),
                                                                keepalive_timeout=_KEEPALIVE_SECONDS),
                                 trust_env=False, **options)


@functools.lru_cache(maxsize=256)
def _proxy_for(url: str) -> dict[str, Any]:
    """The proxy for `url` from HTTP(S)_PROXY and NO_PROXY, as aiohttp's trust_env
    reads them (its own lookup), as request options: read once per URL, since a process's
    environment is set when it starts (a provider's URL is one of few)."""
    try:
        proxy, auth = get_env_proxy_for_url(URL(url))
    except LookupError:  # none set, or NO_PROXY names the host
        return {}
    return {"proxy": proxy, "proxy_auth": auth}


def _timeout(seconds: float) -> aiohttp.ClientTimeout:
    """`seconds` for connecting (a free pooled connection included) and for each read: no
    limit on the whole, since a stream may last minutes (the turn's own deadline bounds it)."""
    return aiohttp.ClientTimeout(total=None, connect=seconds, sock_read=seconds)


# One session per event loop: its pooled connections belong to the loop that opened them,
# and pytest-asyncio gives every test a new loop while uvicorn has one.
_clients: dict[asyncio.AbstractEventLoop, aiohttp.ClientSession] = {}
_clients_lock = threading.Lock()


def shared_client() -> aiohttp.ClientSession:
    """The process-wide HTTP session of the running event loop (created on first use)."""
    loop = asyncio.get_running_loop()
    client = _clients.get(loop)
    if client is None or client.closed:
        with _clients_lock:
            # Forget sessions of loops that are gone; their sockets died with the loop, and a
            # plain dict (not weak) is needed because a session's connections refer to its loop.
            for stale in [other for other in _clients if other.is_closed()]:
                del _clients[stale]
            client = _clients.get(loop)
            if client is None or client.closed:
                client = _session()  # timeouts are set per request (each gateway has its own)
                _clients[loop] = client
    return client


async def aclose_shared_client() -> None:
    """Close the running loop's session (at shutdown; tests)."""
    loop = asyncio.get_running_loop()
    with _clients_lock:
        client = _clients.pop(loop, None)
    if client is not None:
        await client.close()


def _parse_usage(raw: Any) -> Usage | None:
    """The provider's usage, counts made sane (`token_count`); None if it has no count."""
    if not isinstance(raw, dict):
        return None
    prompt, completion = token_count(raw.get("prompt_tokens")), token_count(raw.get("completion_tokens"))
    if prompt is None and completion is None:
        return None
    return Usage(prompt_tokens=prompt or 0, completion_tokens=completion or 0, estimated=False)


def _cost(value: Any) -> Decimal | None:
    """A provider-reported cost in credits (OpenRouter's `usage.cost`, a generation's
    `total_cost`) as a Decimal with 6 places, or None if it is no sane cost.

    Accepted: a finite JSON number or a numeric string, in [0, MAX_PROVIDER_COST]. Not
    bools, NaN or infinities (JSON parsing yields them), negatives, or absurd values.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        if not 0 <= value <= MAX_PROVIDER_COST:  # before str(): a huge int has thousands of digits
            return None
        amount = Decimal(value)
    elif isinstance(value, float):
        if not math.isfinite(value):
            return None
        amount = Decimal(str(value))  # str(): 0.1 is Decimal("0.1"), not its binary expansion
    elif isinstance(value, str):
        if len(value) > _MAX_COST_CHARS:
            return None
        try:
            amount = Decimal(value.strip())
        except InvalidOperation:
            return None
        if not amount.is_finite():  # "NaN", "sNaN", "Infinity"
            return None
    else:
        return None
    if not 0 <= amount <= MAX_PROVIDER_COST:
        return None
    return quantize_money(amount.copy_abs())  # copy_abs: -0.0 is 0


def _usage_cost(raw: Any) -> Decimal | None:
    """The `cost` of a `usage` object, if it reports a sane one."""
    return _cost(raw.get("cost")) if isinstance(raw, dict) else None


def _label(value: Any, limit: int) -> str | None:
    """A provider-sent name (model slug, provider, finish reason): a non-empty string, cut to
    `limit` characters and cleaned; None for anything else (numbers, objects)."""
    if not isinstance(value, str) or not value:
        return None
    return clean_text(value[:limit])  # cut first: cleaning keeps the length


def _message(text: str) -> str:
    """An error text for users and the database: short and storable."""
    return clean_text(text[:MAX_MESSAGE_CHARS])


def _loads(data: bytes | str) -> Any:
    """Parsed JSON, or None if it is not JSON.

    Bytes are decoded as UTF-8 with U+FFFD for bad sequences, as the SSE decoder does:
    json.loads(bytes) would refuse the whole answer for one bad byte, and would decode an
    encoded surrogate (ED A0 80) into a lone one. Nesting too deep raises RecursionError, not
    ValueError: that is not JSON we can use either.

    orjson parses a stream chunk in a third of json's time (one per token); what it refuses
    and json takes (NaN, a lone surrogate escape such as half of a pair split across chunks)
    is parsed by json as before. An integer beyond 64 bits comes back as a float: every
    reader of a provider's numbers takes either (token_count and _cost clamp them; a tool
    call's index must be an int, so such an index counts as none).
    """
    if isinstance(data, bytes):
        data = data.decode("utf-8", errors="replace").removeprefix("\ufeff")
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return None


def _release(response: aiohttp.ClientResponse) -> None:
    """Done with `response`: its connection goes back to the pool if the body was read to
    its end, else it is closed (the provider sees the abort and stops generating)."""
    if response.content.at_eof():
        response.release()
    else:
        response.close()


async def _read_body(response: aiohttp.ClientResponse, limit: int) -> tuple[bytes, bool]:
    """At most `limit` bytes of the body, and whether there was more (left unread).
    A timeout raises TimeoutError; a broken connection aiohttp.ClientError."""
    body = bytearray()
    async for piece in response.content.iter_any():
        body += piece
        if len(body) > limit:
            return bytes(body[:limit]), True
    return bytes(body), False


def _join_surrogate_pairs(text: str) -> str:
    """Adjacent high+low surrogates as the one code point they encode (lone ones stay)."""
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "surrogatepass")


def _add_usage(a: Usage | None, b: Usage | None) -> Usage | None:
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def _error_text(error: Any) -> tuple[str, int | None]:
    """(message, numeric code) of an OpenAI-style `error` value; the code may be a string."""
    if isinstance(error, dict):
        message = error.get("message")
        code = error.get("code")
        status = code if isinstance(code, int) and not isinstance(code, bool) and 100 <= code <= 599 else None
        if not isinstance(message, str) or not message:
            shown = code if isinstance(code, str | int) and not isinstance(code, bool) else None
            message = f"upstream error {shown}" if shown is not None else "upstream error"
        return _message(message), status
    if isinstance(error, str) and error:
        return _message(error), None
    return "upstream error", None


def _error_message_from_body(body: bytes, status: int) -> str:
    data = _loads(body)
    if isinstance(data, dict) and data.get("error"):
        return _error_text(data["error"])[0]
    text = body.decode("utf-8", errors="replace").strip()
    if text:
        return _message(text)
    return f"upstream returned HTTP {status}"


def _cleaned_content(content: Any) -> str:
    """A message's text, cleaned (it is stored and shown)."""
    return clean_text(content_text(content))


def _new_call_id() -> str:
    """An id for a tool call the provider sent none for: unique, as some providers require of
    the ids in a conversation (a client sends them back with its tool results)."""
    return f"call_{secrets.token_hex(12)}"


def _arguments_text(arguments: Any) -> str:
    """Tool call arguments sent as a JSON value instead of its text (some servers): as text,
    strings cleaned (json.dumps would escape a NUL, not remove it)."""
    try:
        return json.dumps(clean_json_strings(arguments), ensure_ascii=False)
    except RecursionError:  # json.loads takes deeper nesting than Python code does
        return "(arguments nested too deeply)"  # not JSON: the model is told so


def _parse_tool_calls(raw: Any) -> list[ToolCall]:
    calls: list[ToolCall] = []
    if not isinstance(raw, list):
        return calls
    for item in raw:
        if len(calls) >= MAX_TOOL_CALLS_PER_ROUND:
            logger.warning("the model asked for more than %d tool calls at once; the rest are dropped",
                           MAX_TOOL_CALLS_PER_ROUND)
            break
        if not isinstance(item, dict):
            continue
        function = item.get("function") if isinstance(item.get("function"), dict) else {}
        arguments = function.get("arguments")
        if arguments is None or arguments == "":
            arguments = "{}"  # seen from Bedrock for calls without arguments
        elif not isinstance(arguments, str):
            arguments = _arguments_text(arguments)
        # Ids, names and arguments are stored with the turn and sent back upstream: clean them
        # (the id is cut to fit its column; it is the same wherever it is used).
        call_id = _label(item.get("id"), MAX_TOOL_CALL_ID_CHARS) or _new_call_id()
        name = function.get("name")
        name = clean_text(name[:MAX_TOOL_NAME_CHARS]) if isinstance(name, str) else ""
        calls.append(ToolCall(id=call_id, name=name, arguments=clean_text(arguments)))
    return calls


_DROPPED = -1  # a streamed tool call past MAX_TOOL_CALLS_PER_ROUND: its fragments are ignored


class _ToolCallStream:
    """A stream's tool-call fragments (`delta.tool_calls`) -> `ToolCallDelta`s, and the calls
    they add up to.

    A fragment is `{index, id?, type?, function?: {name?, arguments?}}`; the provider is not
    trusted to send them well. Which call a fragment belongs to: its `index` if it is an int
    (any int: it is only a key), unless it carries an id other than that call's (providers
    that give every parallel call index 0): then it begins a new call. Without an int index,
    the call with that id, a new call for an id not seen, else the latest call. A call's
    first id and first name win (some providers repeat them in every fragment); a call with
    no id gets one made up. Calls past MAX_TOOL_CALLS_PER_ROUND are dropped (their fragments
    too); arguments past MAX_TOOL_ARGUMENTS_CHARS in all fail the stream. Argument pieces are
    cleaned one by one, a high surrogate ending one kept back for the next piece of its call
    (as text deltas are), so the pieces still concatenate to the call's arguments.
    """

    def __init__(self) -> None:
        self._positions: dict[int, int] = {}  # the provider's index -> the call's position
        self._by_id: dict[str, int] = {}  # the provider's id -> the call's position
        self._ids: list[str] = []  # per call: the id given out
        self._provider_ids: list[str | None] = []  # per call: the provider's id, None if made up
        self._names: list[str | None] = []
        self._arguments: list[list[str]] = []
        self._held: list[str] = []  # per call: a high surrogate kept back
        self._size = 0  # characters of arguments kept
        self._last: int | None = None  # the position the last fragment went to
        self._warned = False

    def feed(self, fragments: Any, out: list[str | ToolCallDelta]) -> None:
        """Append to `out` the deltas of a chunk's `tool_calls` (anything else is ignored)."""
        if not isinstance(fragments, list):
            return
        for fragment in fragments:
            if isinstance(fragment, dict):
                delta = self._fragment(fragment)
                if delta is not None:
                    out.append(delta)

    def finish(self) -> list[ToolCallDelta]:
        """At the end of the stream: the held-back high surrogates, each standing for U+FFFD."""
        deltas = []
        for position, held in enumerate(self._held):
            if held:
                self._held[position] = ""
                self._arguments[position].append(REPLACEMENT)
                deltas.append(ToolCallDelta(index=position, id=None, name=None, arguments=REPLACEMENT))
        return deltas

    def calls(self) -> list[ToolCall]:
        return [ToolCall(id=call_id, name=name or "", arguments="".join(arguments))
                for call_id, name, arguments in zip(self._ids, self._names, self._arguments, strict=True)]

    def _fragment(self, fragment: dict[str, Any]) -> ToolCallDelta | None:
        index = fragment.get("index")
        call_id = _label(fragment.get("id"), MAX_TOOL_CALL_ID_CHARS)
        position: int | None
        if type(index) is int:  # not a bool, a float or a numeric string
            position = self._positions.get(index)
            if position is not None and call_id is not None and self._provider_ids[position] not in (None, call_id):
                position = None  # another call under the same index
        elif call_id is not None:
            position = self._by_id.get(call_id)
        else:
            position = self._last
        if position == _DROPPED:
            return None
        new = position is None
        if position is None:
            if len(self._ids) >= MAX_TOOL_CALLS_PER_ROUND:
                if not self._warned:
                    self._warned = True
                    logger.warning("the model streamed more than %d tool calls; the rest are dropped",
                                   MAX_TOOL_CALLS_PER_ROUND)
                self._last = _DROPPED
                return None
            position = len(self._ids)
            if type(index) is int:
                self._positions[index] = position
            if call_id is not None:
                self._by_id.setdefault(call_id, position)
            self._ids.append(call_id or _new_call_id())
            self._provider_ids.append(call_id)
            self._names.append(None)
            self._arguments.append([])
            self._held.append("")
        self._last = position
        function = fragment.get("function")
        if not isinstance(function, dict):
            function = {}
        name = None
        if self._names[position] is None:
            raw_name = function.get("name")
            if isinstance(raw_name, str) and raw_name:
                name = self._names[position] = clean_text(raw_name[:MAX_TOOL_NAME_CHARS])
        arguments = self._piece(position, function.get("arguments"))
        if not (new or name or arguments):
            return None
        return ToolCallDelta(index=position, id=self._ids[position] if new else None, name=name,
                             arguments=arguments)

    def _piece(self, position: int, raw: Any) -> str:
        """The next piece of a call's arguments, cleaned and kept."""
        if isinstance(raw, str):
            text = raw
        elif isinstance(raw, dict | list):
            text = _arguments_text(raw)
        else:
            return ""  # None, numbers: no arguments text
        held = self._held[position]
        if held:
            text, self._held[position] = held + text, ""
        if not text:
            return ""
        if find_unstorable(text) >= 0:
            if "\ud800" <= text[-1] <= "\udbff":
                text, self._held[position] = text[:-1], text[-1]
            text = clean_text(_join_surrogate_pairs(text))
        self._size += len(text)
        if self._size > MAX_TOOL_ARGUMENTS_CHARS:
            raise UpstreamError("the model provider sent tool calls that are too large")
        if text:
            self._arguments[position].append(text)
        return text


class _Round:
    """What one non-streaming call returned."""

    def __init__(self, *, content: str, tool_calls: list[ToolCall], finish_reason: str,
                 usage: Usage, provider_model: str) -> None:
        self.content = content
        self.tool_calls = tool_calls
        self.finish_reason = finish_reason
        self.usage = usage
        self.provider_model = provider_model


class OpenRouterGateway(LlmGateway):
    name = "openrouter"

    def __init__(self, base_url: str, api_key: str, timeout_seconds: float, max_retries: int = 2,
                 backoff_seconds: float = 0.5, app_url: str = "", app_title: str = "",
                 upstream_name: str = "openrouter") -> None:
        self.upstream_name = upstream_name  # the operator's name for this provider (messages)
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout_seconds = timeout_seconds
        self.max_retries = max(0, max_retries)
        self.backoff_seconds = backoff_seconds
        self.app_url = app_url
        self.app_title = app_title
        self._timeout = _timeout(timeout_seconds)

    @property
    def url(self) -> str:
        return f"{self.base_url}/chat/completions"

    def _headers(self, *, stream: bool) -> dict[str, str]:
        headers = {"Content-Type": "application/json", **self._auth_headers()}
        if stream:
            headers["Accept"] = "text/event-stream"
            # A compressed event stream would be buffered by the decompressor.
            headers["Accept-Encoding"] = "identity"
        return headers

    def _auth_headers(self) -> dict[str, str]:
        """The key and the attribution headers, sent with every request."""
        headers: dict[str, str] = {}
        if self.api_key:  # local OpenAI-compatible servers may need none
            headers["Authorization"] = f"Bearer {self.api_key}"
        if self.app_url:
            headers["HTTP-Referer"] = self.app_url
        if self.app_title:
            headers["X-OpenRouter-Title"] = self.app_title
        return headers

    def _retry_delay(self, attempt: int, headers: Mapping[str, str] | None) -> float:
        """`headers`: case-insensitive (aiohttp's), as every HTTP client's are."""
        value: float | None = None
        if headers is not None:
            if "retry-after-ms" in headers:
                with contextlib.suppress(ValueError):
                    value = float(headers["retry-after-ms"]) / 1000
            if value is None and "retry-after" in headers:
                raw = headers["retry-after"].strip()
                try:
                    value = float(raw)
                except ValueError:
                    with contextlib.suppress(TypeError, ValueError, IndexError):
                        when = email.utils.parsedate_to_datetime(raw)
                        value = (when - datetime.now(UTC)).total_seconds()
        if value is not None and value == value:  # not NaN
            return min(max(value, 0.0), MAX_RETRY_AFTER_SECONDS)
        return self.backoff_seconds * (2 ** attempt)

    async def _open(self, payload: dict[str, Any], *, stream: bool, records: list[CallRecord],
                    usage: Usage | None) -> tuple[aiohttp.ClientResponse, CallRecord, float]:
        """POST with retries (only before any answer arrived). Returns the 2xx response with
        its body unread, its record (not yet in `records`) and the attempt's start time.
        Every failed attempt is appended to `records`."""
        client = shared_client()
        content = json.dumps(payload, ensure_ascii=False).encode()
        model = str(payload.get("model", ""))
        attempt = 0
        while True:
            record = CallRecord(requested_model=model, stream=stream)
            started = time.monotonic()
            # Exception messages may reach end users: keep them short; details go to the record.
            retry_headers: Mapping[str, str] | None = None
            try:
                response = await client.post(self.url, data=content, headers=self._headers(stream=stream),
                                             timeout=self._timeout, allow_redirects=False, **_proxy_for(self.url))
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
                # Nothing reached the provider: safe to retry.
                timed_out = isinstance(exc, aiohttp.ConnectionTimeoutError)
                error: GatewayError = (
                    UpstreamTimeout("timed out connecting to the model provider") if timed_out
                    else UpstreamError("could not connect to the model provider", unreachable=True))
                self._fail(record, started, f"{error.message}: {exc!r}")
            except TimeoutError as exc:  # no answer in time (aiohttp's read timeout is one)
                self._fail(record, started, f"timeout: {exc!r}")
                records.append(record)
                raise UpstreamTimeout("the model provider timed out", records=list(records),
                                      usage=usage) from exc
            except (aiohttp.ClientError, ValueError) as exc:  # ValueError: a URL aiohttp refuses
                self._fail(record, started, f"request failed: {exc!r}")
                records.append(record)
                raise UpstreamError("the request to the model provider failed", records=list(records),
                                    usage=usage, unreachable=True) from exc
            else:
                status = response.status
                record.http_status = status
                if 200 <= status < 300:
                    # The answer's own id (a chunk's, the body's) replaces it when there is one.
                    record.generation_id = _label(response.headers.get("x-generation-id"),
                                                  MAX_GENERATION_ID_CHARS) or ""
                    return response, record, started
                try:
                    body, _ = await _read_body(response, MAX_ERROR_BODY_BYTES)
                except (aiohttp.ClientError, TimeoutError):
                    body = b""
                finally:
                    _release(response)
                message = _error_message_from_body(body, status)
                self._fail(record, started, f"HTTP {status}: {message}")
                if status in (401, 403):
                    # The provider refused OUR key: say so (callers must never show it as the
                    # user's 401), with the provider's words for the operator.
                    message = _message(f"the model provider {self.upstream_name!r} refused Pantheon's "
                                       f"credentials (HTTP {status}): {message}")
                if status not in RETRY_STATUSES:
                    records.append(record)
                    raise UpstreamError(message, status=status, records=list(records), usage=usage)
                error = UpstreamError(message, status=status)
                retry_headers = response.headers
            records.append(record)
            if attempt >= self.max_retries:
                error.records = list(records)
                error.usage = usage
                raise error
            delay = self._retry_delay(attempt, retry_headers)
            logger.warning("model provider call failed (%s), retry %d/%d in %.2fs",
                           record.error, attempt + 1, self.max_retries, delay)
            await asyncio.sleep(delay)
            attempt += 1

    @staticmethod
    def _fail(record: CallRecord, started: float, message: str) -> None:
        record.status = "error"
        record.error = message
        record.latency_ms = ms_since(started)

    # -- non-streaming -------------------------------------------------------------------

    async def generate(self, *, model: str, messages: list[ChatMessage], max_tokens: int,
                       tools: list[dict[str, Any]] | None = None,
                       tool_executor: ToolExecutor | None = None,
                       max_tool_rounds: int = 4,
                       params: dict[str, Any] | None = None,
                       client_tools: list[dict[str, Any]] | None = None) -> Completion:
        offered = offered_client_tools(client_tools, tool_executor)
        extra = passthrough_params(params)  # the gateway's own keys, set after, win anyway
        records: list[CallRecord] = []
        if offered is not None:
            # The caller's tools: one round, whose tool calls are the caller's to run.
            payload: dict[str, Any] = {**extra, "model": model, "messages": list(messages),
                                       "max_tokens": max_tokens, "tools": offered}
            result = await self._complete_once(payload, records=records, usage=None)
            return Completion(content=result.content, provider_model=result.provider_model,
                              finish_reason=tool_calls_finish_reason(result.finish_reason, result.tool_calls),
                              usage=result.usage, records=records, tool_calls=result.tool_calls)
        # Tools are only offered when we can run them.
        use_tools = bool(tools) and tool_executor is not None
        conversation = list(messages)
        tool_messages: list[ChatMessage] = []
        total: Usage | None = None
        tool_rounds = 0
        while True:
            offer_tools = use_tools and tool_rounds < max_tool_rounds
            payload = {**extra, "model": model, "messages": conversation, "max_tokens": max_tokens}
            if use_tools:
                # Past the round limit the tools stay declared (the history holds tool calls,
                # which some providers reject without them) but may not be called.
                payload["tools"] = tools
                payload["tool_choice"] = "auto" if offer_tools else "none"
            result = await self._complete_once(payload, records=records, usage=total)
            total = result.usage if total is None else total + result.usage
            if offer_tools and result.tool_calls:
                assert tool_executor is not None
                tool_rounds += 1
                assistant: ChatMessage = {
                    "role": "assistant",
                    "content": result.content or None,
                    "tool_calls": [
                        {"id": call.id, "type": "function",
                         "function": {"name": call.name, "arguments": call.arguments}}
                        for call in result.tool_calls
                    ],
                }
                conversation.append(assistant)
                tool_messages.append(assistant)
                for call in result.tool_calls:
                    output = await run_tool_call(call, tool_executor)
                    tool_message: ChatMessage = {"role": "tool", "tool_call_id": call.id, "content": output}
                    conversation.append(tool_message)
                    tool_messages.append(tool_message)
                continue
            return Completion(content=result.content, provider_model=result.provider_model,
                              finish_reason=result.finish_reason, usage=total, records=records,
                              tool_messages=tool_messages)

    async def _complete_once(self, payload: dict[str, Any], *, records: list[CallRecord],
                             usage: Usage | None) -> _Round:
        response, record, started = await self._open(payload, stream=False, records=records, usage=usage)
        records.append(record)
        try:
            body, too_large = await _read_body(response, MAX_BODY_BYTES)
        except TimeoutError as exc:
            self._fail(record, started, "read timeout")
            raise UpstreamTimeout("the model provider timed out", records=list(records), usage=usage) from exc
        except aiohttp.ClientError as exc:
            self._fail(record, started, f"reading the answer failed: {exc!r}")
            raise UpstreamError("the model provider's answer was cut off", records=list(records),
                                usage=usage) from exc
        finally:
            _release(response)
        record.latency_ms = ms_since(started)

        def fail(message: str, status: int | None, reported: Usage | None = None) -> UpstreamError:
            record.status = "error"
            record.error = message
            record.usage = reported
            return UpstreamError(message, status=status, records=list(records),
                                 usage=_add_usage(usage, reported))

        if too_large:
            raise fail("the model provider's answer is too large", None)
        data = _loads(body)  # leading whitespace (OpenRouter keep-alive) is fine
        if not isinstance(data, dict):
            raise fail("the model provider sent invalid JSON", None)
        record.provider_model = _label(data.get("model"), MAX_MODEL_CHARS) or ""
        record.provider = _label(data.get("provider"), MAX_PROVIDER_CHARS) or ""
        record.generation_id = _label(data.get("id"), MAX_GENERATION_ID_CHARS) or record.generation_id
        record.provider_cost = _usage_cost(data.get("usage"))  # kept by the failures below too
        reported = _parse_usage(data.get("usage"))
        if data.get("error"):
            # OpenRouter can answer 200 with an error body once it has sent keep-alives.
            message, code = _error_text(data["error"])
            raise fail(message, code, reported)
        choices = data.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise fail("the model provider's answer has no choices", None, reported)
        choice = choices[0]
        message = choice.get("message") if isinstance(choice.get("message"), dict) else {}
        content = _cleaned_content(message.get("content"))
        tool_calls = _parse_tool_calls(message.get("tool_calls"))
        finish_reason = _label(choice.get("finish_reason"), MAX_FINISH_REASON_CHARS) or ""
        if finish_reason == "error":
            raise fail("the model provider finished with an error", None, reported)
        if reported is None:
            # The caller still has to bill something: estimate, and say so.
            reported = Usage(
                prompt_tokens=estimate_prompt_tokens(payload["messages"], payload.get("tools")),
                completion_tokens=estimate_tokens(content + "".join(c.arguments for c in tool_calls)),
                estimated=True,
            )
        record.usage = reported
        return _Round(content=content, tool_calls=tool_calls, finish_reason=finish_reason,
                      usage=reported, provider_model=record.provider_model)

    # -- streaming -----------------------------------------------------------------------

    async def stream(self, *, model: str, messages: list[ChatMessage], max_tokens: int,
                     params: dict[str, Any] | None = None,
                     client_tools: list[dict[str, Any]] | None = None) -> StreamingContext:
        offered = offered_client_tools(client_tools)
        payload: dict[str, Any] = {
            **passthrough_params(params),  # the gateway's own keys, after, win anyway
            "model": model,
            "messages": list(messages),
            "max_tokens": max_tokens,
            "stream": True,
            # Deprecated on OpenRouter (usage is always sent) but needed by other
            # OpenAI-compatible servers.
            "stream_options": {"include_usage": True},
            "usage": {"include": True},
        }
        if offered is not None:
            payload["tools"] = offered
        records: list[CallRecord] = []
        response, record, started = await self._open(payload, stream=True, records=records, usage=None)
        upstream = _UpstreamStream(response, record, started, prior_records=records,
                                   client_tools=offered is not None)
        if response.headers.get("content-type", "").startswith("application/json"):
            # A server that ignored "stream": read the whole answer now, so an error in it
            # still raises before anything went downstream.
            await upstream.read_json()
        return upstream

    # -- the provider's records ------------------------------------------------------------

    async def generation(self, generation_id: str) -> Generation:
        """OpenRouter's record of a generation: `GET {base_url}/generation?id=<id>`.

        One request, no retries (the caller retries, with its own backoff), bounded by the
        gateway's timeout as a whole. Its own short-lived client: this runs from background
        workers, each call in a new event loop (async_to_sync), where the shared client's
        pooled connections would belong to a dead loop. Counts are the native ones when the
        record has both, else the normalized ones; a record without counts (not final yet)
        comes back with None counts. Raises GenerationNotFound for a 404 (records lag behind
        the call) or an empty id, UpstreamTimeout or UpstreamError otherwise.
        """
        if not generation_id:
            raise GenerationNotFound("no generation id")
        headers = {"Accept": "application/json", **self._auth_headers()}
        try:
            async with (
                asyncio.timeout(self.timeout_seconds),
                _session(timeout=self._timeout) as client,
                client.get(f"{self.base_url}/generation", params={"id": generation_id}, headers=headers,
                           allow_redirects=False, **_proxy_for(f"{self.base_url}/generation")) as response,
            ):
                body, too_large = await _read_body(response, MAX_GENERATION_BODY_BYTES)
        except TimeoutError as exc:
            raise UpstreamTimeout("the model provider timed out (generation lookup)") from exc
        except (aiohttp.ClientError, ValueError) as exc:  # ValueError: a URL aiohttp refuses
            raise UpstreamError(f"the generation lookup failed: {type(exc).__name__}") from exc
        status = response.status
        if status == 404:
            raise GenerationNotFound(_message(f"the model provider has no record of generation {generation_id[:80]}"))
        if not 200 <= status < 300:
            message = _error_message_from_body(body, status) if not too_large else f"HTTP {status}"
            raise UpstreamError(_message(f"generation lookup: {message}"), status=status)
        if too_large:
            raise UpstreamError("the model provider's generation record is too large", status=status)
        data = _loads(body)
        record = data.get("data") if isinstance(data, dict) else None
        if not isinstance(record, dict):
            raise UpstreamError("the model provider sent an invalid generation record", status=status)
        native = token_count(record.get("native_tokens_prompt")), token_count(record.get("native_tokens_completion"))
        normalized = token_count(record.get("tokens_prompt")), token_count(record.get("tokens_completion"))
        # One pair or the other, not a mix (native and normalized counts differ), unless
        # neither pair is whole.
        if None not in native:
            prompt, completion = native
        elif None not in normalized:
            prompt, completion = normalized
        else:
            prompt = native[0] if native[0] is not None else normalized[0]
            completion = native[1] if native[1] is not None else normalized[1]
        return Generation(id=generation_id, prompt_tokens=prompt, completion_tokens=completion,
                          total_cost=_cost(record.get("total_cost")), cancelled=record.get("cancelled") is True)


_DONE = object()


class _UpstreamStream(StreamingContext):
    """One open upstream stream over aiohttp: SSE read as it comes, or a whole JSON answer
    (`read_json()`) handed out as one piece. The lifecycle is `StreamingContext`'s.

    With `client_tools`, the tool-call fragments are read too (`_ToolCallStream`) and handed
    out among the text deltas; a stream without reads them not at all (one check per chunk
    that has a delta)."""

    def __init__(self, response: aiohttp.ClientResponse, record: CallRecord, started: float,
                 prior_records: list[CallRecord], *, client_tools: bool = False) -> None:
        self.response = response
        self._tools = _ToolCallStream() if client_tools else None
        self._answer_items: list[str | ToolCallDelta] = []  # a JSON answer's, with client tools
        # The raw values last seen, so a label repeated in every chunk is cleaned only once.
        self._raw_model: Any = None
        self._raw_provider: Any = None
        # A high surrogate that ended the last delta, kept back in case the next delta starts
        # with its low half (a server slicing UTF-16 code units splits pairs across events).
        self._held = ""
        self._answer: str | None = None  # the text of a JSON answer, once read
        self._response_closed = False
        # Until a chunk names the generation: the record holds the header's id meanwhile.
        self._want_chunk_id = True
        super().__init__(record=record, started=started, prior_records=prior_records)

    async def _disconnect(self) -> None:
        if self._response_closed:
            return
        self._response_closed = True
        with contextlib.suppress(Exception):
            _release(self.response)

    def _failure(self, exc: Exception) -> tuple[GatewayError, str]:
        if isinstance(exc, TimeoutError):  # aiohttp's read timeout is one
            return UpstreamTimeout("the model provider stopped sending (read timeout)"), ""
        # aiohttp's errors (a payload cut off, the connection lost), or whatever else.
        error = UpstreamError("truncated stream (connection lost)", unreachable=True)
        return error, f"{error.message}: {exc!r}"

    def _ending_tool_calls(self) -> list[ToolCall]:
        return [] if self._tools is None else self._tools.calls()

    async def _chunks(self) -> AsyncGenerator[str | ToolCallDelta, None]:
        """One loop for every stream: `_handle()` gives a text delta, or with client tools a
        list of items (text deltas and ToolCallDelta), so a stream without client tools costs
        one class check per delta more than text alone."""
        tools = self._tools
        async with self._running():
            if self._answer is not None:
                items = self._answer_items if tools is not None else [self._answer] if self._answer else []
                for item in items:
                    yield self._sent(item)
                return
            decoder = SSEDecoder(max_event_bytes=MAX_EVENT_BYTES)
            async for raw in self.response.content.iter_any():
                too_large = None
                try:
                    events = decoder.feed(raw)
                except SSEEventTooLarge as exc:  # the events before it still go out (one read
                    events, too_large = exc.events, exc  # can hold them and the oversized one)
                for event in events:
                    delta = self._handle(event)
                    if delta is _DONE:
                        if self._held:  # a high surrogate nothing paired: it stands for U+FFFD
                            self._held = ""
                            yield self._sent(REPLACEMENT)
                        if tools is not None:
                            for item in tools.finish():
                                yield self._sent(item)
                        return
                    if delta:
                        if delta.__class__ is str:
                            yield self._sent(delta)
                        else:
                            for item in delta:
                                yield self._sent(item)
                if too_large is not None:
                    raise UpstreamError("the model provider sent a stream event that is too large") from None
            # The body ended without [DONE]. (After aclose() the reader stops quietly instead.)
            decoder.finish()
            raise UpstreamError("truncated stream")

    def _clean_delta(self, text: str) -> str:
        """`text` fit to send and store; the common clean delta costs one regex search."""
        if self._held:
            text, self._held = self._held + text, ""
        if find_unstorable(text) < 0:
            return text
        if "\ud800" <= text[-1] <= "\udbff":
            text, self._held = text[:-1], text[-1]
        return clean_text(_join_surrogate_pairs(text))

    def _handle(self, event: SSEEvent) -> Any:
        """One SSE event -> a text delta, None, or _DONE; with client tools, a list of text
        deltas and ToolCallDeltas instead of a text delta. Raises UpstreamError for error
        chunks."""
        if event.event not in ("message", "error"):
            return None  # unknown event types are not ours to interpret
        data = event.data.strip()
        if not data:
            return None
        if data.startswith("[DONE]"):
            return _DONE
        chunk = _loads(data)
        if not isinstance(chunk, dict):
            raise UpstreamError("the model provider sent a malformed stream chunk")
        model, provider = chunk.get("model"), chunk.get("provider")
        if model != self._raw_model:
            self._raw_model = model
            self._provider_model = _label(model, MAX_MODEL_CHARS) or self._provider_model
        if provider != self._raw_provider:
            self._raw_provider = provider
            self._provider = _label(provider, MAX_PROVIDER_CHARS) or self._provider
        if self._want_chunk_id:  # every chunk repeats the id: take the first one only
            generation_id = _label(chunk.get("id"), MAX_GENERATION_ID_CHARS)
            if generation_id:
                self._generation_id = generation_id
                self._want_chunk_id = False
        raw_usage = chunk.get("usage")
        if raw_usage is not None:  # only the usage chunk (or an error chunk) has one
            usage = _parse_usage(raw_usage)
            if usage is not None:
                self._usage = usage
            cost = _usage_cost(raw_usage)
            if cost is not None:
                self._provider_cost = cost
        # Errors raised here carry the usage reported so far (StreamingContext._fail).
        if chunk.get("error") or event.event == "error":
            message, code = _error_text(chunk.get("error"))
            raise UpstreamError(message, status=code)
        choices = chunk.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            return None  # e.g. the usage chunk
        choice = choices[0]
        finish_reason = _label(choice.get("finish_reason"), MAX_FINISH_REASON_CHARS)
        if finish_reason:
            self._finish_reason = finish_reason
            if finish_reason == "error":
                raise UpstreamError("the model provider ended the stream with an error")
        delta = choice.get("delta")
        if isinstance(delta, dict):
            content = delta.get("content")
            if self._tools is not None:
                return self._tool_items(content, delta.get("tool_calls"))
            if isinstance(content, str) and content:
                return self._clean_delta(content)
        return None

    def _tool_items(self, content: Any, fragments: Any) -> list[str | ToolCallDelta] | None:
        """A delta's text, then its tool-call fragments (the order of a chunk that has both)."""
        items: list[str | ToolCallDelta] = []
        if isinstance(content, str) and content:
            text = self._clean_delta(content)
            if text:
                items.append(text)
        if fragments and self._tools is not None:
            self._tools.feed(fragments, items)
        return items or None

    async def read_json(self) -> None:
        """Read a non-streamed JSON answer now (errors end the stream and raise here);
        `chunks` then hands out its text as one piece."""
        try:
            body, too_large = await _read_body(self.response, MAX_BODY_BYTES)
        except TimeoutError as exc:
            raise self._fail(UpstreamTimeout("the model provider timed out")) from exc
        except aiohttp.ClientError as exc:
            raise self._fail(UpstreamError("the model provider's answer was cut off")) from exc
        finally:
            await self._disconnect()
        if too_large:
            raise self._fail(UpstreamError("the model provider's answer is too large"))
        data = _loads(body)
        if not isinstance(data, dict):
            raise self._fail(UpstreamError("the model provider sent invalid JSON"))
        self._provider_model = _label(data.get("model"), MAX_MODEL_CHARS)
        self._provider = _label(data.get("provider"), MAX_PROVIDER_CHARS)
        self._generation_id = _label(data.get("id"), MAX_GENERATION_ID_CHARS)
        self._usage = _parse_usage(data.get("usage"))
        self._provider_cost = _usage_cost(data.get("usage"))
        choices = data.get("choices")
        if data.get("error") or not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            message, code = _error_text(data.get("error")) if data.get("error") else ("no choices", None)
            raise self._fail(UpstreamError(message, status=code))
        message = choices[0].get("message") if isinstance(choices[0].get("message"), dict) else {}
        self._finish_reason = _label(choices[0].get("finish_reason"), MAX_FINISH_REASON_CHARS)
        self._answer = _cleaned_content(message.get("content"))  # cleaned
        if self._tools is not None:
            items: list[str | ToolCallDelta] = [self._answer] if self._answer else []
            fragments = [{"index": index, "id": call.id, "function": {"name": call.name, "arguments": call.arguments}}
                         for index, call in enumerate(_parse_tool_calls(message.get("tool_calls")))]
            try:
                self._tools.feed(fragments, items)
            except UpstreamError as exc:
                raise self._fail(exc) from None
            self._answer_items = items
