"""FakeGateway: a deterministic, offline model, so Pantheon runs (and is tested) with no provider.

Reply: built from the last user message,
``"You said: <text>. This answer comes from Pantheon's offline fake model."``, streamed word
by word (each piece keeps its leading space, so the pieces concatenate to the reply) with
`chunk_delay_seconds` between pieces. `max_tokens` is honoured: the reply is cut so that
`estimate_tokens(reply) <= max_tokens` (finish_reason "length"). Usage is computed with
`llm_gateway.tokens` and reported as provider usage (`estimated=False`). `provider_model` is
the requested model if it starts with "fake/", else "fake/echo"; `provider` is "fake".

Tools: if `tools` offers a function named `file_read`, a `tool_executor` is given,
`max_tool_rounds >= 1` and the last message is from the user, the fake looks for the first
UUID in that message, else in the system messages; if it finds one it calls
`file_read({"file_id": <uuid>})` once through the executor, then answers
``"From the file: <first 500 chars of the result>"``. Without a UUID it answers as usual.
One CallRecord per round, like the real gateway.

Pass-through parameters (`params`) are accepted and ignored, except `stop` (a string or a
list of strings): the reply is cut before the first occurrence of any of them (finish_reason
"stop"), before `max_tokens` applies. Keys the gateway owns are dropped as by any gateway
(`llm_gateway.base.OWNED_PARAMS`). Client tools (`client_tools`) are accepted and ignored:
the fake never calls one, it answers text (`Completion.tool_calls` and the stream's
`ending.tool_calls` stay empty, the stream yields only `str`); with a `tool_executor` too
it raises ValueError, as every gateway does. Tests of client tool calls use the loopback
fake OpenRouter (tests/fake_openrouter.py) instead.

Failure models, for tests:
- ``fake/error``: raises `UpstreamError` (status 502) at once, from `generate()` and from
  `stream()` (before the stream opens).
- ``fake/timeout``: raises `UpstreamTimeout` at once, likewise.
- ``fake/error-mid``: the stream yields two pieces, then raises `UpstreamError` carrying the
  usage of what was sent, which is also the stream's `ending.usage`. `generate()` raises
  `UpstreamError`.
- ``fake/no-usage``: answers normally but reports no usage: the stream's `ending.usage` is
  None, and `generate()` returns an estimate (`estimated=True`).
Titles: when a system message starts with "Reply with a title" (sessions_app.titles), the
reply is the first five words of the first user message (after a leading "User:").

A stream closed early (`aclose()`, cancellation) reports no usage either, like a real
provider whose connection was cut, and no finish reason; its `ending.provider_model` is
still the fake's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncGenerator
from typing import Any

from core.text import clean_text

from ._tools import run_tool_call
from .base import (
    CallRecord,
    ChatMessage,
    Completion,
    LlmGateway,
    StreamingContext,
    ToolCall,
    ToolExecutor,
    UpstreamError,
    UpstreamTimeout,
    Usage,
    content_text,
    ms_since,
    offered_client_tools,
    passthrough_params,
)
from .tokens import BYTES_PER_TOKEN, estimate_prompt_tokens, estimate_tokens

__all__ = ["FAIL_AT_ONCE", "FAIL_MID_STREAM", "NO_USAGE", "TIMEOUT", "FakeGateway", "split_pieces"]

FAIL_AT_ONCE = "fake/error"
FAIL_MID_STREAM = "fake/error-mid"
TIMEOUT = "fake/timeout"
NO_USAGE = "fake/no-usage"
PROVIDER = "fake"
# A system message starting so asks for a title (sessions_app.titles): the fake answers the
# first words of the conversation's first question, so the offline product gets titles too.
TITLE_REQUEST = "Reply with a title"
FILE_READ = "file_read"
FILE_EXCERPT_CHARS = 500

_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_PIECE = re.compile(r"\s*\S+|\s+")


def split_pieces(text: str) -> list[str]:
    """Words with their leading whitespace; "".join(split_pieces(t)) == t."""
    return _PIECE.findall(text)


def _text(content: Any) -> str:
    return content_text(content, separator=" ")


def _title_for(messages: list[ChatMessage]) -> str:
    """A deterministic title: the first five words of the conversation's first question."""
    conversation = next((_text(m.get("content")) for m in messages if m.get("role") == "user"), "")
    question = conversation.removeprefix("User:").strip().split("\n\n")[0]
    words = clean_text(question).split()[:5]
    return " ".join(words).rstrip(".,;:!?") or "Untitled chat"


def _truncate(text: str, max_tokens: int) -> tuple[str, bool]:
    """The longest prefix (whole pieces if possible) with estimate_tokens() <= max_tokens."""
    if estimate_tokens(text) <= max_tokens:
        return text, False
    out = ""
    for piece in split_pieces(text):
        if estimate_tokens(out + piece) > max_tokens:
            break
        out += piece
    if not out:
        # Even the first word is too long: cut it by bytes, on a character boundary.
        budget = max(0, max_tokens) * BYTES_PER_TOKEN
        out = text.encode()[:budget].decode("utf-8", errors="ignore")
    return out, True


def _apply_stop(text: str, params: dict[str, Any] | None) -> str:
    """`text` cut before the first stop sequence of `params` (`stop`), if it has one."""
    stop = passthrough_params(params).get("stop")
    sequences = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []
    cut = min((found for sequence in sequences if isinstance(sequence, str) and sequence
               if (found := text.find(sequence)) >= 0), default=-1)
    return text[:cut] if cut >= 0 else text


def _offers(tools: list[dict[str, Any]] | None, name: str) -> bool:
    for tool in tools or []:
        function = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(function, dict) and function.get("name") == name:
            return True
    return False


def _find_file_id(messages: list[ChatMessage]) -> str | None:
    match = _UUID.search(_text(messages[-1].get("content")))
    if match:
        return match.group(0).lower()
    for message in messages:
        if message.get("role") == "system":
            match = _UUID.search(_text(message.get("content")))
            if match:
                return match.group(0).lower()
    return None


class FakeGateway(LlmGateway):
    name = "fake"
    upstream_name = "fake"

    def __init__(self, chunk_delay_seconds: float = 0.05) -> None:
        self.chunk_delay_seconds = chunk_delay_seconds

    @staticmethod
    def provider_model_for(model: str) -> str:
        return model if model.startswith("fake/") else "fake/echo"

    @staticmethod
    def reply_for(messages: list[ChatMessage]) -> str:
        if any(m.get("role") == "system" and _text(m.get("content")).startswith(TITLE_REQUEST) for m in messages):
            return _title_for(messages)
        text = ""
        for message in reversed(messages):
            if message.get("role") == "user":
                text = _text(message.get("content")).strip()
                break
        # The echo is model output: like a real provider's, it must be storable (callers
        # refuse such user text, but the fake must not depend on that).
        return f"You said: {clean_text(text)}. This answer comes from Pantheon's offline fake model."

    def _record(self, model: str, *, stream: bool, started: float, usage: Usage | None = None,
                status: str = "ok", error: str = "", http_status: int | None = 200) -> CallRecord:
        return CallRecord(requested_model=model, provider_model=self.provider_model_for(model),
                          provider=PROVIDER, status=status, http_status=http_status,
                          latency_ms=ms_since(started), usage=usage, error=error, stream=stream)

    def _fail_at_once(self, model: str, *, stream: bool, records: list[CallRecord],
                      usage: Usage | None = None) -> None:
        started = time.monotonic()
        if model == FAIL_AT_ONCE:
            message = "the fake provider failed (model fake/error)"
            records.append(self._record(model, stream=stream, started=started, status="error",
                                        error=f"HTTP 502: {message}", http_status=502))
            raise UpstreamError(message, status=502, records=list(records), usage=usage)
        if model == TIMEOUT:
            message = "the fake provider timed out (model fake/timeout)"
            records.append(self._record(model, stream=stream, started=started, status="error",
                                        error=message, http_status=None))
            raise UpstreamTimeout(message, records=list(records), usage=usage)

    def _usage(self, model: str, prompt_tokens: int, text: str) -> Usage:
        return Usage(prompt_tokens=prompt_tokens, completion_tokens=estimate_tokens(text),
                     estimated=model == NO_USAGE)

    async def generate(self, *, model: str, messages: list[ChatMessage], max_tokens: int,
                       tools: list[dict[str, Any]] | None = None,
                       tool_executor: ToolExecutor | None = None,
                       max_tool_rounds: int = 4,
                       params: dict[str, Any] | None = None,
                       client_tools: list[dict[str, Any]] | None = None) -> Completion:
        offered_client_tools(client_tools, tool_executor)  # checked, then ignored (see above)
        records: list[CallRecord] = []
        tool_messages: list[ChatMessage] = []
        total: Usage | None = None
        conversation = list(messages)
        use_tools = _offers(tools, FILE_READ) and tool_executor is not None
        offered = tools if use_tools else None
        reply = self.reply_for(messages)

        self._fail_at_once(model, stream=False, records=records)
        if (use_tools and max_tool_rounds >= 1 and conversation
                and conversation[-1].get("role") == "user"):
            file_id = _find_file_id(conversation)
            if file_id is not None:
                assert tool_executor is not None
                started = time.monotonic()
                call = ToolCall(id=f"call_fake_{FILE_READ}_1", name=FILE_READ,
                                arguments=json.dumps({"file_id": file_id}))
                round_usage = self._usage(model, estimate_prompt_tokens(conversation, offered),
                                          call.arguments)
                records.append(self._record(model, stream=False, started=started,
                                            usage=None if model == NO_USAGE else round_usage))
                total = round_usage
                assistant: ChatMessage = {"role": "assistant", "content": None, "tool_calls": [
                    {"id": call.id, "type": "function",
                     "function": {"name": call.name, "arguments": call.arguments}}]}
                result = await run_tool_call(call, tool_executor)
                tool_message: ChatMessage = {"role": "tool", "tool_call_id": call.id, "content": result}
                conversation += [assistant, tool_message]
                tool_messages += [assistant, tool_message]
                reply = f"From the file: {result[:FILE_EXCERPT_CHARS]}"

        started = time.monotonic()
        if model == FAIL_MID_STREAM:
            message = "the fake provider failed mid-answer (model fake/error-mid)"
            records.append(self._record(model, stream=False, started=started, status="error",
                                        error=message))
            raise UpstreamError(message, status=502, records=records, usage=total)
        reply = _apply_stop(reply, params)
        text, truncated = _truncate(reply, max_tokens)
        usage = self._usage(model, estimate_prompt_tokens(conversation, offered), text)
        records.append(self._record(model, stream=False, started=started,
                                    usage=None if model == NO_USAGE else usage))
        total = usage if total is None else total + usage
        return Completion(content=text, provider_model=self.provider_model_for(model),
                          finish_reason="length" if truncated else "stop", usage=total,
                          records=records, tool_messages=tool_messages)

    async def stream(self, *, model: str, messages: list[ChatMessage], max_tokens: int,
                     params: dict[str, Any] | None = None,
                     client_tools: list[dict[str, Any]] | None = None) -> StreamingContext:
        offered_client_tools(client_tools)  # ignored (see above)
        self._fail_at_once(model, stream=True, records=[])
        started = time.monotonic()
        text, truncated = _truncate(_apply_stop(self.reply_for(messages), params), max_tokens)
        return _FakeStream(
            pieces=split_pieces(text),
            model=model,
            provider_model=self.provider_model_for(model),
            prompt_tokens=estimate_prompt_tokens(messages),
            delay=self.chunk_delay_seconds,
            started=started,
            finish_reason="length" if truncated else "stop",
        )


class _FakeStream(StreamingContext):
    """The reply's pieces with a delay between them (cut short at once by aclose()), and the
    failure models. The lifecycle is `StreamingContext`'s."""

    def __init__(self, *, pieces: list[str], model: str, provider_model: str, prompt_tokens: int,
                 delay: float, started: float, finish_reason: str) -> None:
        self.pieces = pieces
        self.model = model
        self.prompt_tokens = prompt_tokens
        self.delay = delay
        self._reason = finish_reason  # reported with the last piece, like a provider's
        self._closed = asyncio.Event()
        record = CallRecord(requested_model=model, provider=PROVIDER, http_status=200, stream=True)
        super().__init__(record=record, started=started)
        self._provider_model = provider_model
        self._provider = PROVIDER

    async def _disconnect(self) -> None:
        self._closed.set()

    async def _pause(self) -> bool:
        """Wait one chunk delay; True if aclose() came meanwhile."""
        if self._closed.is_set():
            return True
        if self.delay > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closed.wait(), self.delay)
        return self._closed.is_set()

    async def _chunks(self) -> AsyncGenerator[str, None]:
        async with self._running():
            sent = ""
            for index, piece in enumerate(self.pieces):
                if index and await self._pause():
                    return
                if self.model == FAIL_MID_STREAM and index == 2:
                    break
                sent += piece
                yield self._sent(piece)
            usage = Usage(self.prompt_tokens, estimate_tokens(sent))
            if self.model == FAIL_MID_STREAM:
                raise UpstreamError("the fake provider failed mid-stream (model fake/error-mid)",
                                    status=502, usage=usage)
            # Cut short (aclose(), cancellation), the stream reports none of these.
            self._usage = None if self.model == NO_USAGE else usage
            self._finish_reason = self._reason
