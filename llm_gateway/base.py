"""The gateway contract: what the rest of Pantheon may rely on.

The gateway talks to a model and reports what happened. It knows nothing of
sessions, turns or wallets: callers persist the `CallRecord`s it returns.

Whatever the provider sends, what the gateway hands out can be stored and sent as is: every
provider text (deltas, content, tool call ids, names and arguments, model and provider
names, error messages) has NUL and unpaired surrogates replaced by U+FFFD
(`core.text.clean_text`), names are cut to fit their columns, error messages are short, and
token counts are ints in [0, MAX_TOKEN_COUNT]. Stream deltas are cleaned one by one, so
their concatenation is the cleaned answer.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

# An OpenAI-format chat message: {"role": ..., "content": ..., "tool_calls"?: ..., "tool_call_id"?: ...}
ChatMessage = dict[str, Any]

# Runs one tool call for the tool loop: (tool name, parsed arguments) -> result text.
# It must not raise for bad input; it returns an error text for the model instead.
ToolExecutor = Callable[[str, dict[str, Any]], Awaitable[str]]


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


@dataclasses.dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text as the model sent it ("" is treated as "{}")


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


class GatewayError(Exception):
    """Base of every error the gateway raises. `records` holds the calls made so far."""

    code = "upstream_error"

    def __init__(self, message: str, *, records: list[CallRecord] | None = None,
                 usage: Usage | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.records = records or []
        self.usage = usage  # usage the provider reported before failing, if any


class UpstreamError(GatewayError):
    """The provider answered with an error (HTTP status or an error chunk)."""

    code = "upstream_error"

    def __init__(self, message: str, *, status: int | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.status = status


class UpstreamTimeout(GatewayError):
    code = "upstream_timeout"


class StreamingContext:
    """A stream opened upstream. `chunks` yields text deltas.

    `usage_future` and `provider_model_future` resolve when the upstream finishes
    (usage may resolve to None if the provider never reported it). Iterating `chunks`
    raises a `GatewayError` for an error chunk or a truncated stream. `aclose()` closes
    the upstream connection at once (client went away); it is safe to call twice.
    `record` is filled in as the stream goes and is final after the stream ends or closes.
    `prior_records` are the failed attempts retried before the stream opened (usually
    empty); `records` is all of them plus `record`, in order: store each as an LLM event.
    """

    def __init__(self, *, chunks: AsyncIterator[str], record: CallRecord,
                 aclose: Callable[[], Awaitable[None]],
                 prior_records: list[CallRecord] | None = None) -> None:
        loop = asyncio.get_running_loop()
        self.chunks = chunks
        self.record = record
        self.prior_records: list[CallRecord] = list(prior_records or [])
        self.finish_reason: str | None = None  # as the provider reported it, once known
        self.usage_future: asyncio.Future[Usage | None] = loop.create_future()
        self.provider_model_future: asyncio.Future[str | None] = loop.create_future()
        self._aclose = aclose

    @property
    def records(self) -> list[CallRecord]:
        return [*self.prior_records, self.record]

    async def aclose(self) -> None:
        await self._aclose()


class LlmGateway(abc.ABC):
    name: str = "base"

    @abc.abstractmethod
    async def generate(self, *, model: str, messages: list[ChatMessage], max_tokens: int,
                       tools: list[dict[str, Any]] | None = None,
                       tool_executor: ToolExecutor | None = None,
                       max_tool_rounds: int = 4) -> Completion:
        """One full completion; with `tools`, runs the tool loop (at most `max_tool_rounds`
        rounds that call tools, then one final round without tools)."""

    @abc.abstractmethod
    async def stream(self, *, model: str, messages: list[ChatMessage],
                     max_tokens: int) -> StreamingContext:
        """Open the upstream stream; returns once the provider accepted the request
        (HTTP 200), so a provider that fails at once raises here, before any byte is
        sent downstream."""
