"""The gateway contract: what the rest of Pantheon may rely on.

The gateway talks to a model and reports what happened. It knows nothing of
sessions, turns or wallets: callers persist the `CallRecord`s it returns.

Whatever the provider sends, what the gateway hands out can be stored and sent as is: every
provider text (deltas, content, tool call ids, names and arguments, model and provider
names, error messages) has NUL and unpaired surrogates replaced by U+FFFD
(`core.text.clean_text`), names are cut to fit their columns, error messages are short, and
token counts are ints in [0, MAX_TOKEN_COUNT]. Stream deltas are cleaned one by one, so
their concatenation is the cleaned answer (a streamed tool call's argument pieces too).

Pass-through parameters (`params` of `generate()` and `stream()`): the OpenAI request fields
a caller wants sent as they are (`temperature`, `top_p`, `stop`, `seed`, `presence_penalty`,
`frequency_penalty`, `response_format`, `tool_choice`, `parallel_tool_calls`, `user`, and
OpenRouter's `models`, ...). The gateway does not check them: the caller (the OpenAI facade)
decides which client fields may pass. They never replace what the gateway owns: the keys in
`OWNED_PARAMS` are dropped from `params` whatever their value (`model`, `messages` and
`max_tokens` are the arguments; `max_completion_tokens` and `n` would defeat the token cap a
hold is computed from, or bill answers nobody reads; `stream`, `stream_options` and `usage`
are how the gateway reads the answer and its usage; `tools` comes from `client_tools` or the
tool loop). `tool_choice` passes, except in the tool loop (`tool_executor`), which sets it
round by round.

Client tools (`client_tools`): tools the CALLER runs, not Pantheon. They are sent as the
request's `tools` (with `params`' `tool_choice`, if any), and the model's tool calls come
back: `Completion.tool_calls` (one round, no loop), or for a stream `ToolCallDelta`s among
the text deltas and `StreamEnding.tool_calls`. Without `client_tools` (None or empty) no
caller ever sees a tool call it did not ask for: a stream yields only `str`, whatever the
provider sends. Messages go upstream as given, so a conversation holding assistant
`tool_calls` and `tool` messages (the client's earlier round) is sent intact.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import dataclasses
import math
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from decimal import Decimal
from types import TracebackType
from typing import Any, TypeVar

# An OpenAI-format chat message: {"role": ..., "content": ..., "tool_calls"?: ..., "tool_call_id"?: ...}
ChatMessage = dict[str, Any]

# Runs one tool call for the tool loop: (tool name, parsed arguments) -> result text.
# It must not raise for bad input; it returns an error text for the model instead.
ToolExecutor = Callable[[str, dict[str, Any]], Awaitable[str]]

# Request fields the gateway sets itself: a key of `params` in this set is dropped (see the
# module docstring).
OWNED_PARAMS = frozenset({"model", "messages", "max_tokens", "max_completion_tokens", "n", "stream",
                          "stream_options", "usage", "tools"})


def passthrough_params(params: dict[str, Any] | None) -> dict[str, Any]:
    """`params` without the keys the gateway owns (a new dict; {} for None)."""
    if not params:
        return {}
    return {key: value for key, value in params.items() if key not in OWNED_PARAMS}


def offered_client_tools(client_tools: list[dict[str, Any]] | None,
                         tool_executor: ToolExecutor | None = None) -> list[dict[str, Any]] | None:
    """The client tools to send: None for None or an empty list (OpenAI refuses `"tools": []`).
    Raises ValueError with a `tool_executor` too: tools are either Pantheon's or the caller's."""
    if not client_tools:
        return None
    if tool_executor is not None:
        raise ValueError("client_tools and tool_executor cannot be combined")
    return list(client_tools)


# Token counts end up in PositiveIntegerField columns (at most 2**31 - 1), the total too, so
# each count is capped at half of that: any Usage's total still fits. No real call comes close.
MAX_TOKEN_COUNT = (2**31 - 1) // 2
_MAX_COUNT_DIGITS = len(str(MAX_TOKEN_COUNT))


def token_count(value: Any) -> int | None:
    """A provider's token count as an int in [0, MAX_TOKEN_COUNT], or None if it is no number.

    Providers have sent floats, numeric strings, negatives and absurd values; JSON parsing
    also yields NaN and infinities, which int() refuses. A fraction rounds up (a billed count
    errs high, like the estimates); bools are not counts.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return min(max(value, 0), MAX_TOKEN_COUNT)
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if value <= 0:
            return 0
        return MAX_TOKEN_COUNT if value >= MAX_TOKEN_COUNT else math.ceil(value)
    if isinstance(value, str):
        digits = value.strip()
        if not (digits.isascii() and digits.isdigit()):
            return None
        # Don't int() thousands of digits (slow, and refused past 4300).
        return MAX_TOKEN_COUNT if len(digits) > _MAX_COUNT_DIGITS else min(int(digits), MAX_TOKEN_COUNT)
    return None


def content_text(content: Any, *, separator: str = "") -> str:
    """The text of an OpenAI message `content`: the string itself, or the `text` of its
    content parts joined by `separator`; "" for anything else."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return separator.join(part["text"] for part in content
                              if isinstance(part, dict) and isinstance(part.get("text"), str))
    return ""


@dataclasses.dataclass(frozen=True)
class Usage:
    """Token counts; always ints in [0, MAX_TOKEN_COUNT] (clamped on construction, sums too)."""

    prompt_tokens: int
    completion_tokens: int
    estimated: bool = False

    def __post_init__(self) -> None:
        for name in ("prompt_tokens", "completion_tokens"):
            value = getattr(self, name)
            if type(value) is not int or not 0 <= value <= MAX_TOKEN_COUNT:
                object.__setattr__(self, name, token_count(value) or 0)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            completion_tokens=self.completion_tokens + other.completion_tokens,
            estimated=self.estimated or other.estimated,
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "estimated": self.estimated,
        }


@dataclasses.dataclass
class CallRecord:
    """One upstream call, as the LLM event row will store it."""

    requested_model: str
    provider_model: str = ""
    provider: str = ""
    status: str = "ok"  # "ok" | "error" | "cancelled"
    http_status: int | None = None
    latency_ms: int = 0
    ttft_ms: int | None = None  # time to first token (streams only)
    usage: Usage | None = None
    error: str = ""
    stream: bool = False
    # The provider's id of this generation (a chunk's or the answer's `id`, or the
    # `X-Generation-Id` header): how its record is looked up later (`LlmGateway.generation`).
    generation_id: str = ""
    # What the provider says the call cost (OpenRouter's `usage.cost`), when it says so.
    provider_cost: Decimal | None = None
    # Set by `llm_gateway.routing`: the caller's name of the model this call tried (one of the
    # candidates) and of the provider it went to. Empty for a call made without routing.
    model: str = ""
    upstream: str = ""


@dataclasses.dataclass(frozen=True)
class Generation:
    """The provider's own record of one generation, looked up after the call ended: what it
    really counted and charged, also for a call whose client went away."""

    id: str
    prompt_tokens: int | None  # native counts when the provider gives them; None if unknown
    completion_tokens: int | None
    total_cost: Decimal | None
    cancelled: bool = False

    @property
    def has_counts(self) -> bool:
        return self.prompt_tokens is not None and self.completion_tokens is not None


@dataclasses.dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text as the model sent it ("" is treated as "{}")


@dataclasses.dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A piece of a tool call the model is streaming; yielded by `chunks` (among the text
    deltas, in the order the provider sent them) only by a stream opened with `client_tools`.

    `index` is the call's position in `StreamEnding.tool_calls`: 0, 1, ... in the order the
    calls began, whatever indexes the provider used (they only tell its fragments apart). The
    first delta of a call has its `id` (the provider's, or one made up if it sent none), later
    ones None; `name` is set on the one delta that names the call (usually the first), else
    None. `arguments` is the next piece of the arguments' JSON text, maybe "": the pieces of
    one index concatenate to its `ToolCall.arguments`. Everything is cleaned and bounded like
    any provider text (`llm_gateway.base`)."""

    index: int
    id: str | None
    name: str | None
    arguments: str


@dataclasses.dataclass
class Completion:
    """Result of `generate()`, after every tool round."""

    content: str
    provider_model: str
    finish_reason: str
    usage: Usage  # summed over all rounds
    records: list[CallRecord]  # one per round, in order
    # Messages produced by the tool loop, in order, in OpenAI format: each assistant
    # message that asked for tools, then one {"role": "tool", ...} per call. Empty
    # without tools. The final assistant answer is `content`, not in this list.
    tool_messages: list[ChatMessage] = dataclasses.field(default_factory=list)
    # With `client_tools` only: the tool calls the model asked the caller to run (then
    # `finish_reason` is "tool_calls"). Empty otherwise.
    tool_calls: list[ToolCall] = dataclasses.field(default_factory=list)


class GatewayError(Exception):
    """Base of every error the gateway raises. `records` holds the calls made so far."""

    code = "upstream_error"

    def __init__(self, message: str, *, records: list[CallRecord] | None = None,
                 usage: Usage | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.records = records or []
        self.usage = usage  # usage the provider reported before failing, if any
        # Set by `llm_gateway.routing`: the candidate that failed last (the turn's served model).
        self.model = ""


class UpstreamError(GatewayError):
    """The provider answered with an error (HTTP status or an error chunk)."""

    code = "upstream_error"

    def __init__(self, message: str, *, status: int | None = None, unreachable: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.status = status
        # No answer at all: the connection was refused, reset or lost before one came.
        self.unreachable = unreachable


class UpstreamTimeout(GatewayError):
    code = "upstream_timeout"


class GenerationNotFound(GatewayError):
    """The provider has no record of that generation (yet: its records can lag)."""

    code = "generation_not_found"


@dataclasses.dataclass(frozen=True)
class StreamEnding:
    """How a stream ended: what the caller stores and bills, read once it has ended."""

    status: str  # the record's: "ok" | "error" | "cancelled"
    # As the provider reported it; None if it never did (or the stream was cut first).
    usage: Usage | None
    provider_model: str  # "" if the provider never named one
    # As the provider reported it; "" if it never did. A stream that ended "ok" with tool
    # calls says "tool_calls" where the provider said "stop" or nothing (some do).
    finish_reason: str
    records: list[CallRecord]  # `prior_records`, then the stream's own record
    # A stream opened with `client_tools`: the calls the model made, assembled from their
    # `ToolCallDelta`s (by index, arguments concatenated), in index order. If the stream did
    # not end "ok", the calls begun so far, their arguments maybe incomplete. Else empty.
    tool_calls: list[ToolCall] = dataclasses.field(default_factory=list)


_Delta = TypeVar("_Delta", str, ToolCallDelta)


def tool_calls_finish_reason(finish_reason: str, tool_calls: list[ToolCall]) -> str:
    """The finish reason of an answer with client tool calls: "tool_calls" where the
    provider said "stop" or nothing (some do, with tool calls); else as reported."""
    return "tool_calls" if tool_calls and finish_reason in ("", "stop") else finish_reason


def ms_since(start: float) -> int:
    """Milliseconds since the `time.monotonic()` value `start`."""
    return int((time.monotonic() - start) * 1000)


class StreamingContext(abc.ABC):
    """A stream opened upstream, and its lifecycle, which is written here once for every
    gateway.

    `chunks` yields text deltas (`str`) and, only if the stream was opened with
    `client_tools`, `ToolCallDelta`s too, in the order the provider sent them; iterating it
    raises a `GatewayError` for an error chunk or a truncated stream. `aclose()` closes the
    upstream at once (client went away); it is safe to call twice, and while another task
    iterates `chunks` (that task then stops quietly, as it does for whatever the source raises
    after `aclose()`).

    The stream ends exactly once, with the first of: the chunks exhausted (status "ok"), an
    error raised ("error"), `aclose()`, the reader cancelled or `chunks` closed
    ("cancelled"). From then on `ending` says how, and `record` is final (it is filled in as
    the stream goes). `prior_records` are the failed attempts retried before the stream
    opened (usually empty); `records` is all of them plus `record`, in order: store each as
    an LLM event.

    A gateway subclasses this and writes `_chunks()`: an async generator (or a method
    returning one) whose whole body runs in `async with self._running():`, which yields each
    delta through `self._sent()`, sets `_usage`, `_provider_model`, `_provider`,
    `_finish_reason`, `_generation_id` and `_provider_cost` as the provider reports them, and
    returns once the provider finished; and `_disconnect()`, which drops the source. It may
    override `_failure()` (what an exception of the source means), and `_ending_tool_calls()`
    (the calls of a stream with client tools). The record's `generation_id` may be set before
    the stream opens (a response header): a `_generation_id` the stream reports replaces it.
    """

    def __init__(self, *, record: CallRecord, started: float,
                 prior_records: list[CallRecord] | None = None) -> None:
        self.record = record
        self.prior_records: list[CallRecord] = list(prior_records or [])
        self._started = started  # time.monotonic() when the call was sent
        # What the provider reported so far; the ending takes them as they are when it comes.
        self._usage: Usage | None = None
        self._provider_model: str | None = None
        self._provider: str | None = None
        self._finish_reason: str | None = None
        self._generation_id: str | None = None
        self._provider_cost: Decimal | None = None
        self._ending: StreamEnding | None = None
        self._closing = False  # aclose() was called
        self.chunks: AsyncGenerator[str | ToolCallDelta, None] = self._chunks()
        # What `prefetch()` read from `chunks` (the first delta, or nothing if the stream
        # ended at once): a consumer hands these out before iterating `chunks`.
        self.prefetched: list[str | ToolCallDelta] = []

    @property
    def records(self) -> list[CallRecord]:
        return [*self.prior_records, self.record]

    @property
    def generation_id(self) -> str:
        """The provider's id of this generation as known so far ("" while unknown): callers
        save it while the stream runs, so a call whose process dies can still be looked up."""
        return self._generation_id or self.record.generation_id

    @property
    def ending(self) -> StreamEnding:
        """How the stream ended. Raises RuntimeError before it has (while `chunks` can still
        yield and `aclose()` was not called)."""
        if self._ending is None:
            raise RuntimeError("the stream has not ended yet")
        return self._ending

    def add_prior_records(self, records: list[CallRecord]) -> None:
        """Put `records` (earlier attempts: other candidates, `llm_gateway.routing`) before
        this stream's own, also in an ending already reached."""
        self.prior_records = [*records, *self.prior_records]
        if self._ending is not None:
            self._ending = dataclasses.replace(self._ending, records=self.records)

    async def prefetch(self) -> None:
        """Read the first delta now, before anything goes downstream: a provider that
        accepted the request and then fails (an error chunk, a stall past the timeout, a
        lost connection) raises its GatewayError here, while another model can still answer
        (`llm_gateway.routing`). A stream that ends at once ends here."""
        async for delta in self.chunks:
            self.prefetched.append(delta)
            return

    async def aclose(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._end("cancelled", "closed before the stream ended")
        await self._disconnect()
        # Runs the generator's cleanup now; if another task is inside it, that task wakes up
        # on the disconnected source and stops by itself.
        with contextlib.suppress(RuntimeError):
            await self.chunks.aclose()

    # -- for the gateways ------------------------------------------------------------------

    @abc.abstractmethod
    def _chunks(self) -> AsyncGenerator[str | ToolCallDelta, None]:
        """The deltas (see the class docstring); created once, as `chunks`."""

    @abc.abstractmethod
    async def _disconnect(self) -> None:
        """Drop the source at once. Called by `aclose()` and when the chunks end: it must be
        idempotent and must not raise."""

    def _failure(self, exc: Exception) -> tuple[GatewayError, str] | None:
        """What `exc` (raised by the source, not a GatewayError) means: the error to raise
        instead and the text for the record ("" for its message); None lets `exc` through,
        and the stream ends as cancelled."""
        return None

    def _ending_tool_calls(self) -> list[ToolCall]:
        """The tool calls for the ending (see `StreamEnding.tool_calls`); none by default."""
        return []

    def _running(self) -> _Running:
        """Wraps the body of `_chunks()`: ends the stream however the body stops."""
        return _Running(self)

    def _sent(self, delta: _Delta) -> _Delta:
        """`delta`, about to be yielded: the first one sets the time to first token."""
        if self.record.ttft_ms is None:
            self.record.ttft_ms = ms_since(self._started)
        return delta

    def _end(self, status: str, error: str = "") -> None:
        """Finalize the record and the ending; only the first call counts."""
        if self._ending is not None:
            return
        record = self.record
        record.status = status
        record.error = error
        record.latency_ms = ms_since(self._started)
        record.usage = self._usage
        record.provider_model = self._provider_model or ""
        record.provider = self._provider or ""
        # Kept whatever the status: a failed or cancelled call is what gets reconciled.
        record.generation_id = self._generation_id or record.generation_id
        record.provider_cost = self._provider_cost
        tool_calls = self._ending_tool_calls()
        finish_reason = self._finish_reason or ""
        if status == "ok":
            finish_reason = tool_calls_finish_reason(finish_reason, tool_calls)
        self._ending = StreamEnding(status=status, usage=self._usage, provider_model=record.provider_model,
                                    finish_reason=finish_reason, records=self.records, tool_calls=tool_calls)

    def _fail(self, exc: GatewayError, detail: str = "") -> GatewayError:
        """End the stream with `exc` (the record's error is `detail`, or else its message), and
        give `exc` the records and the usage reported so far, unless it carries its own."""
        if exc.usage is None:
            exc.usage = self._usage
        else:
            self._usage = exc.usage
        self._end("error", detail or exc.message)
        exc.records = self.records
        return exc

    def _stopped(self, exc: BaseException | None) -> bool:
        """End the stream as the body of `_chunks()` stopped; True swallows `exc`."""
        if exc is None:
            self._end("ok")
        elif isinstance(exc, asyncio.CancelledError):
            self._end("cancelled", "cancelled")
        elif isinstance(exc, GeneratorExit):
            self._end("cancelled", "closed by the consumer")
        elif isinstance(exc, Exception):
            if self._closing:
                # aclose() pulled the source from under this read: stop quietly (the
                # stream already ended as cancelled).
                return True
            if isinstance(exc, GatewayError):
                self._fail(exc)
                return False
            failure = self._failure(exc)
            if failure is not None:
                error, detail = failure
                raise self._fail(error, detail) from exc
        return False


class _Running:
    """`async with` around a stream's body: one context per stream, nothing per chunk."""

    __slots__ = ("stream",)

    def __init__(self, stream: StreamingContext) -> None:
        self.stream = stream

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> bool:
        stream = self.stream
        try:
            return stream._stopped(exc)
        finally:
            await stream._disconnect()
            # Whatever else stopped it (KeyboardInterrupt, an exception let through).
            stream._end("cancelled", "closed before the stream ended")


class LlmGateway(abc.ABC):
    name: str = "base"
    upstream_name: str = "base"  # the operator's name for the provider it talks to

    @abc.abstractmethod
    async def generate(self, *, model: str, messages: list[ChatMessage], max_tokens: int,
                       tools: list[dict[str, Any]] | None = None,
                       tool_executor: ToolExecutor | None = None,
                       max_tool_rounds: int = 4,
                       params: dict[str, Any] | None = None,
                       client_tools: list[dict[str, Any]] | None = None) -> Completion:
        """One full completion; with `tools` and a `tool_executor`, runs the tool loop (at
        most `max_tool_rounds` rounds that call tools, then one final round without tools).
        With `client_tools` instead (not both: ValueError), one round whose tool calls are
        returned in `Completion.tool_calls`. `params`: see the module docstring."""

    @abc.abstractmethod
    async def stream(self, *, model: str, messages: list[ChatMessage], max_tokens: int,
                     params: dict[str, Any] | None = None,
                     client_tools: list[dict[str, Any]] | None = None) -> StreamingContext:
        """Open the upstream stream; returns once the provider accepted the request
        (HTTP 200), so a provider that fails at once raises here, before any byte is
        sent downstream. With `client_tools`, `chunks` also yields `ToolCallDelta`s and the
        ending has the `tool_calls`. `params`: see the module docstring."""

    async def generation(self, generation_id: str) -> Generation:
        """The provider's record of a generation (`CallRecord.generation_id`). Raises
        GenerationNotFound when it has none (yet), another GatewayError when it cannot be
        asked. A gateway whose provider keeps no records has none."""
        raise GenerationNotFound(f"{self.name} keeps no generation records")
