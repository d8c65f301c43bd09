"""FakeGateway (the offline model), token estimates and get_gateway()."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

import llm_gateway
from llm_gateway import FakeGateway, OpenRouterGateway, StreamEnding, UpstreamError, UpstreamTimeout, Usage
from llm_gateway.fake import split_pieces
from llm_gateway.tokens import estimate_prompt_tokens, estimate_tokens

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a joke"}]
FILE_READ_TOOL = {"type": "function", "function": {"name": "file_read", "parameters": {"type": "object"}}}
FILE_ID = "3f2b8c1e-9a4d-4e6f-8b7a-0c1d2e3f4a5b"


@pytest.fixture
def fake() -> FakeGateway:
    return FakeGateway(chunk_delay_seconds=0)


class Executor:
    def __init__(self, result: str) -> None:
        self.result = result
        self.calls: list[tuple[str, dict[str, Any]]] = []

    async def __call__(self, name: str, arguments: dict[str, Any]) -> str:
        self.calls.append((name, arguments))
        return self.result


async def test_generate(fake: FakeGateway) -> None:
    result = await fake.generate(model="fake/echo", messages=MESSAGES, max_tokens=1000)
    expected = "You said: Tell me a joke. This answer comes from Pantheon's offline fake model."
    assert result.content == expected
    assert result.provider_model == "fake/echo" and result.finish_reason == "stop"
    assert result.usage == Usage(estimate_prompt_tokens(MESSAGES), estimate_tokens(expected), estimated=False)
    [record] = result.records
    assert (record.requested_model, record.provider_model, record.provider) == ("fake/echo", "fake/echo", "fake")
    assert (record.status, record.stream, record.usage) == ("ok", False, result.usage)
    assert result.tool_messages == []


async def test_provider_model_always_starts_with_fake(fake: FakeGateway) -> None:
    result = await fake.generate(model="openai/gpt-4o-mini", messages=MESSAGES, max_tokens=100)
    assert result.provider_model == "fake/echo"
    ctx = await fake.stream(model="fake/other", messages=MESSAGES, max_tokens=100)
    _ = [d async for d in ctx.chunks]
    assert ctx.ending.provider_model == "fake/other"


async def test_stream_concatenates_to_the_generate_text(fake: FakeGateway) -> None:
    messages = [{"role": "user", "content": "  héllo   wörld 🎉\nsecond line "}]
    expected = (await fake.generate(model="fake/echo", messages=messages, max_tokens=1000)).content
    ctx = await fake.stream(model="fake/echo", messages=messages, max_tokens=1000)
    pieces = [d async for d in ctx.chunks]
    assert len(pieces) > 5 and all(pieces)
    assert "".join(pieces) == expected
    assert ctx.ending.usage == Usage(estimate_prompt_tokens(messages), estimate_tokens(expected))
    assert ctx.ending.provider_model == "fake/echo"
    assert ctx.ending.finish_reason == "stop"
    assert (ctx.record.status, ctx.record.stream, ctx.record.provider) == ("ok", True, "fake")
    assert ctx.record.ttft_ms is not None and ctx.records == [ctx.record]


def test_split_pieces_keep_their_spaces() -> None:
    for text in ["a b  c", "  lead", "trail  ", "", "one", "x\ny\tz"]:
        assert "".join(split_pieces(text)) == text
    assert split_pieces("You said: hi.") == ["You", " said:", " hi."]


async def test_chunk_delay() -> None:
    slow = FakeGateway(chunk_delay_seconds=0.02)
    ctx = await slow.stream(model="fake/echo", messages=[{"role": "user", "content": "hi"}], max_tokens=100)
    started = time.monotonic()
    pieces = [d async for d in ctx.chunks]
    assert time.monotonic() - started >= 0.02 * (len(pieces) - 1) * 0.9


@pytest.mark.parametrize("max_tokens", [1, 3, 10, 25])
async def test_max_tokens_is_honoured(fake: FakeGateway, max_tokens: int) -> None:
    messages = [{"role": "user", "content": "word " * 200}]
    result = await fake.generate(model="fake/echo", messages=messages, max_tokens=max_tokens)
    assert 0 < estimate_tokens(result.content) <= max_tokens
    assert result.usage.completion_tokens <= max_tokens
    assert result.finish_reason == "length"
    ctx = await fake.stream(model="fake/echo", messages=messages, max_tokens=max_tokens)
    assert "".join([d async for d in ctx.chunks]) == result.content
    usage = ctx.ending.usage
    assert usage is not None and usage.completion_tokens <= max_tokens
    assert ctx.ending.finish_reason == "length"


async def test_file_read_tool_with_uuid_in_user_message(fake: FakeGateway) -> None:
    executor = Executor("x" * 600)
    messages = [*MESSAGES[:1], {"role": "user", "content": f"Summarise file {FILE_ID.upper()} please"}]
    result = await fake.generate(model="fake/echo", messages=messages, max_tokens=1000,
                                 tools=[FILE_READ_TOOL], tool_executor=executor)
    assert executor.calls == [("file_read", {"file_id": FILE_ID})]
    assert result.content == "From the file: " + "x" * 500
    assistant, tool = result.tool_messages
    assert assistant["role"] == "assistant" and assistant["content"] is None
    assert assistant["tool_calls"][0]["function"]["name"] == "file_read"
    assert tool == {"role": "tool", "tool_call_id": assistant["tool_calls"][0]["id"], "content": "x" * 600}
    assert len(result.records) == 2 and all(r.status == "ok" for r in result.records)
    first, second = (r.usage for r in result.records)
    assert first is not None and second is not None and result.usage == first + second


async def test_file_read_tool_with_uuid_in_system_message(fake: FakeGateway) -> None:
    executor = Executor("The report says 42.")
    messages = [{"role": "system", "content": f"Files: report.pdf (id {FILE_ID})"},
                {"role": "user", "content": "What does the report say?"}]
    result = await fake.generate(model="fake/echo", messages=messages, max_tokens=1000,
                                 tools=[FILE_READ_TOOL], tool_executor=executor)
    assert executor.calls == [("file_read", {"file_id": FILE_ID})]
    assert result.content == "From the file: The report says 42."


async def test_no_tool_call_without_uuid_or_executor_or_rounds(fake: FakeGateway) -> None:
    executor = Executor("unused")
    no_uuid = await fake.generate(model="fake/echo", messages=MESSAGES, max_tokens=1000,
                                  tools=[FILE_READ_TOOL], tool_executor=executor)
    with_uuid = [{"role": "user", "content": f"read {FILE_ID}"}]
    no_executor = await fake.generate(model="fake/echo", messages=with_uuid, max_tokens=1000,
                                      tools=[FILE_READ_TOOL])
    no_rounds = await fake.generate(model="fake/echo", messages=with_uuid, max_tokens=1000,
                                    tools=[FILE_READ_TOOL], tool_executor=executor, max_tool_rounds=0)
    other_tool = await fake.generate(model="fake/echo", messages=with_uuid, max_tokens=1000,
                                     tools=[{"type": "function", "function": {"name": "web"}}],
                                     tool_executor=executor)
    assert executor.calls == []
    for result in (no_uuid, no_executor, no_rounds, other_tool):
        assert result.content.startswith("You said: ") and result.tool_messages == []
        assert len(result.records) == 1


async def test_failure_models(fake: FakeGateway) -> None:
    with pytest.raises(UpstreamError) as info:
        await fake.generate(model="fake/error", messages=MESSAGES, max_tokens=100)
    assert info.value.status == 502 and [r.status for r in info.value.records] == ["error"]
    with pytest.raises(UpstreamError):
        await fake.stream(model="fake/error", messages=MESSAGES, max_tokens=100)
    with pytest.raises(UpstreamTimeout):
        await fake.generate(model="fake/timeout", messages=MESSAGES, max_tokens=100)
    with pytest.raises(UpstreamTimeout):
        await fake.stream(model="fake/timeout", messages=MESSAGES, max_tokens=100)
    with pytest.raises(UpstreamError):
        await fake.generate(model="fake/error-mid", messages=MESSAGES, max_tokens=100)


async def test_error_mid_stream(fake: FakeGateway) -> None:
    ctx = await fake.stream(model="fake/error-mid", messages=MESSAGES, max_tokens=100)
    received = []
    with pytest.raises(UpstreamError) as info:
        async for delta in ctx.chunks:
            received.append(delta)
    assert received == ["You", " said:"]
    assert info.value.records == [ctx.record] and ctx.record.status == "error"
    assert (ctx.ending.status, ctx.ending.records, ctx.ending.finish_reason) == ("error", [ctx.record], "")
    usage = ctx.ending.usage
    assert usage == Usage(estimate_prompt_tokens(MESSAGES), estimate_tokens("You said:"))
    assert info.value.usage == usage


async def test_no_usage_model(fake: FakeGateway) -> None:
    result = await fake.generate(model="fake/no-usage", messages=MESSAGES, max_tokens=100)
    assert result.usage.estimated is True and result.records[0].usage is None
    ctx = await fake.stream(model="fake/no-usage", messages=MESSAGES, max_tokens=100)
    assert "".join([d async for d in ctx.chunks]) == result.content
    assert ctx.ending.usage is None


async def test_aclose_stops_the_stream() -> None:
    fake = FakeGateway(chunk_delay_seconds=0.5)
    ctx = await fake.stream(model="fake/echo", messages=MESSAGES, max_tokens=100)
    received: list[str] = []

    async def reader() -> None:
        async for delta in ctx.chunks:
            received.append(delta)

    task = asyncio.create_task(reader())
    await asyncio.sleep(0.05)
    started = time.monotonic()
    await ctx.aclose()
    await asyncio.wait_for(task, 1)
    assert time.monotonic() - started < 0.3  # did not wait out the chunk delay
    assert received == ["You"]
    assert ctx.record.status == "cancelled"
    assert ctx.ending.usage is None
    assert ctx.ending.provider_model == "fake/echo"
    await ctx.aclose()


async def test_the_ending_exists_once_the_stream_ended_and_only_then() -> None:
    fake = FakeGateway(chunk_delay_seconds=0.5)
    ctx = await fake.stream(model="fake/echo", messages=MESSAGES, max_tokens=100)
    with pytest.raises(RuntimeError):
        ctx.ending  # noqa: B018
    assert await anext(ctx.chunks) == "You"
    with pytest.raises(RuntimeError):
        ctx.ending  # noqa: B018
    await ctx.aclose()
    ending = ctx.ending
    assert ending == StreamEnding(status="cancelled", usage=None, provider_model="fake/echo", finish_reason="",
                                  records=[ctx.record])
    assert ctx.record.error == "closed before the stream ended"
    await ctx.aclose()
    assert [d async for d in ctx.chunks] == []
    assert ctx.ending is ending  # it ends once


async def test_cancelled_reader_ends_the_stream() -> None:
    fake = FakeGateway(chunk_delay_seconds=0.5)
    ctx = await fake.stream(model="fake/echo", messages=MESSAGES, max_tokens=100)
    task = asyncio.create_task(anext(ctx.chunks))  # type: ignore[arg-type]
    assert await task == "You"
    task = asyncio.create_task(anext(ctx.chunks))  # type: ignore[arg-type]
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert ctx.record.status == "cancelled"
    assert ctx.ending.usage is None


# -- tokens --------------------------------------------------------------------------------


def test_estimate_tokens() -> None:
    assert estimate_tokens("") == 0
    assert estimate_tokens("a") == 1
    assert estimate_tokens("abc") == 1 and estimate_tokens("abcd") == 2
    assert estimate_tokens("é") == 1 and estimate_tokens("世界") == 2  # counted in UTF-8 bytes
    # Errs high against real tokenizers (~4 chars per English token).
    assert estimate_tokens("The quick brown fox jumps over the lazy dog.") >= 11


def test_estimate_prompt_tokens() -> None:
    assert estimate_prompt_tokens([]) > 0
    one = estimate_prompt_tokens([{"role": "user", "content": "hello"}])
    two = estimate_prompt_tokens([{"role": "user", "content": "hello"}, {"role": "assistant", "content": None}])
    assert two > one > estimate_tokens("hello")
    with_tool = estimate_prompt_tokens([{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "file_read", "arguments": '{"file_id": "x"}'}}]}])
    assert with_tool > estimate_prompt_tokens([{"role": "assistant", "content": None}])
    parts = estimate_prompt_tokens([{"role": "user", "content": [{"type": "text", "text": "hello"}]}])
    assert parts == one
    assert estimate_prompt_tokens([{"role": "user", "content": "x"}], tools=[FILE_READ_TOOL]) > \
        estimate_prompt_tokens([{"role": "user", "content": "x"}])


# -- get_gateway ---------------------------------------------------------------------------


def test_get_gateway_follows_settings(settings: Any) -> None:
    settings.PANTHEON_LLM_PROVIDER = "fake"
    settings.PANTHEON_FAKE_CHUNK_DELAY_SECONDS = 0.01
    gateway = llm_gateway.get_gateway()
    assert isinstance(gateway, FakeGateway) and gateway.chunk_delay_seconds == 0.01
    assert llm_gateway.get_gateway() is gateway  # cached

    settings.PANTHEON_LLM_PROVIDER = "openrouter"
    settings.OPENROUTER_BASE_URL = "http://127.0.0.1:9/api/v1"
    settings.OPENROUTER_API_KEY = "sk-test"
    settings.PANTHEON_UPSTREAM_TIMEOUT_SECONDS = 7
    settings.PANTHEON_UPSTREAM_MAX_RETRIES = 1
    settings.PANTHEON_APP_URL = "https://example.test"
    settings.PANTHEON_APP_TITLE = "T"
    real = llm_gateway.get_gateway()
    assert isinstance(real, OpenRouterGateway)
    assert (real.base_url, real.api_key, real.timeout_seconds, real.max_retries, real.app_url, real.app_title) \
        == ("http://127.0.0.1:9/api/v1", "sk-test", 7.0, 1, "https://example.test", "T")
    settings.OPENROUTER_API_KEY = "sk-other"
    assert llm_gateway.get_gateway() is not real


async def test_get_gateway_with_fake_openrouter_settings(fake_openrouter_settings: Any) -> None:
    gateway = llm_gateway.get_gateway()
    assert isinstance(gateway, OpenRouterGateway)
    result = await gateway.generate(model="m", messages=MESSAGES, max_tokens=5)
    assert result.content == fake_openrouter_settings.DEFAULT_CONTENT
    assert fake_openrouter_settings.requests[0].headers["authorization"] == "Bearer test-key"
