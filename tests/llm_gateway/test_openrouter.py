"""OpenRouterGateway end to end against the loopback fake upstream (tests/fake_openrouter.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import pytest
from multidict import CIMultiDict

from llm_gateway import (
    CallRecord,
    OpenRouterGateway,
    StreamEnding,
    UpstreamError,
    UpstreamTimeout,
    Usage,
)
from llm_gateway.openrouter import _proxy_for, aclose_shared_client, shared_client
from tests.fake_openrouter import DEFAULT_MODEL, FakeOpenRouter, completion, tool_call
from tests.llm_gateway.helpers import collect

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
FILE_READ_TOOL = {"type": "function", "function": {
    "name": "file_read", "description": "Read a file",
    "parameters": {"type": "object", "properties": {"file_id": {"type": "string"}}, "required": ["file_id"]}}}


class Executor:
    """A stub tool executor that records its calls."""

    def __init__(self, result: str = '{"text": "file contents"}') -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.result = result

    async def __call__(self, name: str, arguments: dict[str, Any]) -> str:
        self.calls.append((name, arguments))
        return self.result


# -- generate ------------------------------------------------------------------------------


async def test_generate_fields_and_request(gateway: OpenRouterGateway, fake_openrouter: FakeOpenRouter) -> None:
    fake_openrouter.enqueue(completion("Hello!", usage=(12, 3), model="openai/gpt-4o-mini-2024-07-18",
                                       provider="Azure"))
    result = await gateway.generate(model="openai/gpt-4o-mini", messages=MESSAGES, max_tokens=256)

    assert result.content == "Hello!"
    assert result.provider_model == "openai/gpt-4o-mini-2024-07-18"
    assert result.finish_reason == "stop"
    assert result.usage == Usage(prompt_tokens=12, completion_tokens=3, estimated=False)
    assert result.tool_messages == []
    [record] = result.records
    assert record.requested_model == "openai/gpt-4o-mini"
    assert record.provider_model == "openai/gpt-4o-mini-2024-07-18"
    assert record.provider == "Azure"
    assert (record.status, record.http_status, record.stream, record.error) == ("ok", 200, False, "")
    assert record.usage == result.usage and record.latency_ms >= 0 and record.ttft_ms is None

    [request] = fake_openrouter.requests
    assert (request.method, request.path) == ("POST", "/api/v1/chat/completions")
    assert request.headers["authorization"] == "Bearer test-key"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["http-referer"] == "https://pantheon.test"
    assert request.headers["x-openrouter-title"] == "Pantheon Test"
    assert request.body["model"] == "openai/gpt-4o-mini"
    assert request.body["max_tokens"] == 256
    assert request.body["messages"] == MESSAGES
    assert "tools" not in request.body and not request.body.get("stream")


async def test_no_attribution_headers_when_unset(fake_openrouter: FakeOpenRouter) -> None:
    gateway = OpenRouterGateway(base_url=fake_openrouter.base_url + "/", api_key="k", timeout_seconds=5)
    await gateway.generate(model="m", messages=MESSAGES, max_tokens=5)
    headers = fake_openrouter.requests[0].headers
    assert "http-referer" not in headers and "x-openrouter-title" not in headers
    assert fake_openrouter.requests[0].path == "/api/v1/chat/completions"
    await aclose_shared_client()


async def test_generate_without_reported_usage_estimates_it(gateway: OpenRouterGateway,
                                                            fake_openrouter: FakeOpenRouter) -> None:
    fake_openrouter.enqueue(completion("Some answer", usage=None))
    result = await gateway.generate(model="m", messages=MESSAGES, max_tokens=16)
    assert result.usage.estimated is True
    assert result.usage.prompt_tokens > 0 and result.usage.completion_tokens > 0


async def test_error_body_with_status_200_raises(gateway: OpenRouterGateway,
                                                 fake_openrouter: FakeOpenRouter) -> None:
    fake_openrouter.enqueue(completion(extra={"error": {"code": 502, "message": "Provider returned error"},
                                              "choices": []}))
    with pytest.raises(UpstreamError) as info:
        await gateway.generate(model="m", messages=MESSAGES, max_tokens=16)
    assert info.value.message == "Provider returned error"
    assert info.value.status == 502
    assert [r.status for r in info.value.records] == ["error"]


# -- tool loop -----------------------------------------------------------------------------


async def test_tool_loop(gateway: OpenRouterGateway, fake_openrouter: FakeOpenRouter) -> None:
    call = tool_call("file_read", {"file_id": "f-1", "limit": 100}, id="call_1")
    fake_openrouter.enqueue(
        completion(None, tool_calls=[call], usage=(20, 7), model="anthropic/claude-x"),
        completion("The file says hi.", usage=(40, 9), model="anthropic/claude-x"),
    )
    executor = Executor('{"text": "hi"}')
    result = await gateway.generate(model="anthropic/claude", messages=MESSAGES, max_tokens=100,
                                    tools=[FILE_READ_TOOL], tool_executor=executor)

    assert executor.calls == [("file_read", {"file_id": "f-1", "limit": 100})]
    assert result.content == "The file says hi."
    assert result.usage == Usage(60, 16)
    assert [r.usage for r in result.records] == [Usage(20, 7), Usage(40, 9)]
    assert [r.status for r in result.records] == ["ok", "ok"]
    assistant = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "file_read", "arguments": json.dumps({"file_id": "f-1", "limit": 100})}}]}
    tool_result = {"role": "tool", "tool_call_id": "call_1", "content": '{"text": "hi"}'}
    assert result.tool_messages == [assistant, tool_result]

    first, second = (r.body for r in fake_openrouter.requests)
    assert first["tools"] == [FILE_READ_TOOL] and first["tool_choice"] == "auto"
    assert first["messages"] == MESSAGES
    assert second["messages"] == [*MESSAGES, assistant, tool_result]
    assert second["max_tokens"] == 100


async def test_parallel_calls_empty_and_invalid_arguments(gateway: OpenRouterGateway,
                                                          fake_openrouter: FakeOpenRouter) -> None:
    calls = [tool_call("list_files", "", id="a"), tool_call("file_read", '{"file_id": ', id="b"),
             tool_call("file_read", {"file_id": "x"}, id="c")]
    fake_openrouter.enqueue(completion("Let me look.", tool_calls=calls), completion("Done."))
    executor = Executor("ok")
    result = await gateway.generate(model="m", messages=MESSAGES, max_tokens=50,
                                    tools=[FILE_READ_TOOL], tool_executor=executor)

    # "" means no arguments; invalid JSON never reaches the executor.
    assert executor.calls == [("list_files", {}), ("file_read", {"file_id": "x"})]
    assistant, *tool_results = result.tool_messages
    assert assistant["content"] == "Let me look."
    assert assistant["tool_calls"][0]["function"]["arguments"] == "{}"
    assert [m["tool_call_id"] for m in tool_results] == ["a", "b", "c"]
    assert tool_results[0]["content"] == "ok" and tool_results[2]["content"] == "ok"
    assert tool_results[1]["content"].startswith("Error:") and "JSON" in tool_results[1]["content"]
    assert result.content == "Done."


async def test_tool_round_limit(gateway: OpenRouterGateway, fake_openrouter: FakeOpenRouter) -> None:
    for i in range(3):
        fake_openrouter.enqueue(completion(None, tool_calls=[tool_call("file_read", {"file_id": str(i)})],
                                           usage=(10, 1)))
    fake_openrouter.enqueue(completion("Final answer", usage=(10, 2)))
    executor = Executor()
    result = await gateway.generate(model="m", messages=MESSAGES, max_tokens=50, tools=[FILE_READ_TOOL],
                                    tool_executor=executor, max_tool_rounds=2)

    assert len(executor.calls) == 2
    # The third answer still asks for a tool: the round limit means it is not run, and its
    # (empty) content is the answer. The fourth reply is never requested.
    assert len(fake_openrouter.requests) == 3
    assert [r.body["tool_choice"] for r in fake_openrouter.requests] == ["auto", "auto", "none"]
    assert result.content == "" and result.finish_reason == "tool_calls"
    assert len(result.records) == 3 and result.usage == Usage(30, 3)
    assert len(result.tool_messages) == 4


async def test_tool_round_limit_final_round_answers(gateway: OpenRouterGateway,
                                                    fake_openrouter: FakeOpenRouter) -> None:
    fake_openrouter.enqueue(completion(None, tool_calls=[tool_call("file_read", {"file_id": "1"})]),
                            completion("Answer without tools"))
    result = await gateway.generate(model="m", messages=MESSAGES, max_tokens=50, tools=[FILE_READ_TOOL],
                                    tool_executor=Executor(), max_tool_rounds=1)
    assert result.content == "Answer without tools"
    assert [r.body["tool_choice"] for r in fake_openrouter.requests] == ["auto", "none"]


async def test_tools_without_executor_are_not_offered(gateway: OpenRouterGateway,
                                                      fake_openrouter: FakeOpenRouter) -> None:
    await gateway.generate(model="m", messages=MESSAGES, max_tokens=5, tools=[FILE_READ_TOOL])
    assert "tools" not in fake_openrouter.requests[0].body


async def test_failure_in_a_later_round_keeps_records_and_usage(gateway: OpenRouterGateway,
                                                                fake_openrouter: FakeOpenRouter) -> None:
    fake_openrouter.enqueue(completion(None, tool_calls=[tool_call("file_read", {"file_id": "1"})],
                                       usage=(20, 7)),
                            fake_openrouter.http_error(400, "Bad request: context too long"))
    with pytest.raises(UpstreamError) as info:
        await gateway.generate(model="m", messages=MESSAGES, max_tokens=50, tools=[FILE_READ_TOOL],
                               tool_executor=Executor())
    error = info.value
    assert error.status == 400 and error.message == "Bad request: context too long"
    assert [(r.status, r.http_status) for r in error.records] == [("ok", 200), ("error", 400)]
    assert error.usage == Usage(20, 7)


# -- retries -------------------------------------------------------------------------------


async def test_429_with_retry_after_is_retried(gateway: OpenRouterGateway,
                                               fake_openrouter: FakeOpenRouter) -> None:
    fake_openrouter.enqueue(fake_openrouter.http_error(429, "Rate limited", retry_after="0.3"),
                            completion("After the wait"))
    started = time.monotonic()
    result = await gateway.generate(model="m", messages=MESSAGES, max_tokens=5)
    assert time.monotonic() - started >= 0.3  # Retry-After honoured (backoff_seconds is 0)
    assert result.content == "After the wait"
    assert [(r.status, r.http_status) for r in result.records] == [("error", 429), ("ok", 200)]
    assert "Rate limited" in result.records[0].error
    assert len(fake_openrouter.requests) == 2


async def test_500_is_not_retried(gateway: OpenRouterGateway, fake_openrouter: FakeOpenRouter) -> None:
    fake_openrouter.enqueue(fake_openrouter.http_error(500, "Internal"), completion("never"))
    with pytest.raises(UpstreamError) as info:
        await gateway.generate(model="m", messages=MESSAGES, max_tokens=5)
    assert info.value.status == 500 and info.value.message == "Internal"
    assert len(info.value.records) == 1 and len(fake_openrouter.requests) == 1


async def test_502_exhausts_the_retries(gateway: OpenRouterGateway, fake_openrouter: FakeOpenRouter) -> None:
    fake_openrouter.enqueue(*[fake_openrouter.http_error(502, "Model down")] * 3, completion("never"))
    with pytest.raises(UpstreamError) as info:
        await gateway.generate(model="m", messages=MESSAGES, max_tokens=5)
    assert info.value.status == 502 and info.value.message == "Model down"
    assert [(r.status, r.http_status) for r in info.value.records] == [("error", 502)] * 3
    assert len(fake_openrouter.requests) == 3  # max_retries=2: three attempts


async def test_non_json_error_body(gateway: OpenRouterGateway, fake_openrouter: FakeOpenRouter) -> None:
    reply = fake_openrouter.raw_stream([b"<html>Bad Gateway</html>"], status=401, content_type="text/html")
    fake_openrouter.enqueue(reply)
    with pytest.raises(UpstreamError) as info:
        await gateway.generate(model="m", messages=MESSAGES, max_tokens=5)
    assert info.value.status == 401 and "Bad Gateway" in info.value.message


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_connect_error_is_retried_then_raises() -> None:
    gateway = OpenRouterGateway(base_url=f"http://127.0.0.1:{_closed_port()}/api/v1", api_key="k",
                                timeout_seconds=2, max_retries=1, backoff_seconds=0)
    with pytest.raises(UpstreamError) as info:
        await gateway.generate(model="m", messages=MESSAGES, max_tokens=5)
    assert info.value.status is None
    assert [(r.status, r.http_status) for r in info.value.records] == [("error", None)] * 2
    with pytest.raises(UpstreamError) as info:
        await gateway.stream(model="m", messages=MESSAGES, max_tokens=5)
    assert len(info.value.records) == 2
    await aclose_shared_client()


async def test_read_timeout_raises_upstream_timeout(fake_openrouter: FakeOpenRouter) -> None:
    gateway = OpenRouterGateway(base_url=fake_openrouter.base_url, api_key="k", timeout_seconds=0.5,
                                backoff_seconds=0)
    fake_openrouter.enqueue(completion("too late", delay=1.5))
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout) as info:
        await gateway.generate(model="m", messages=MESSAGES, max_tokens=5)
    assert 0.4 < time.monotonic() - started < 1.4
    assert info.value.code == "upstream_timeout"
    assert [r.status for r in info.value.records] == ["error"]
    assert len(fake_openrouter.requests) == 1  # not retried
    await aclose_shared_client()


def test_retry_delay() -> None:
    gateway = OpenRouterGateway(base_url="http://x", api_key="k", timeout_seconds=1, backoff_seconds=0.5)
    assert gateway._retry_delay(0, None) == 0.5
    assert gateway._retry_delay(2, CIMultiDict({})) == 2.0
    assert gateway._retry_delay(0, CIMultiDict({"Retry-After": "2"})) == 2.0
    assert gateway._retry_delay(0, CIMultiDict({"Retry-After": "3600"})) == 30.0  # capped
    assert gateway._retry_delay(0, CIMultiDict({"Retry-After": "-5"})) == 0.0
    assert gateway._retry_delay(0, CIMultiDict({"retry-after-ms": "250"})) == 0.25
    http_date = format_datetime(datetime.now(UTC) + timedelta(seconds=10), usegmt=True)
    assert 8 <= gateway._retry_delay(0, CIMultiDict({"Retry-After": http_date})) <= 10
    assert gateway._retry_delay(1, CIMultiDict({"Retry-After": "soon"})) == 1.0


async def test_one_shared_client_per_event_loop() -> None:
    client = shared_client()
    assert shared_client() is client
    other: list = []

    def in_another_loop() -> None:
        async def grab() -> None:
            other.append(shared_client())
            await aclose_shared_client()
        asyncio.run(grab())

    await asyncio.to_thread(in_another_loop)
    assert other[0] is not client
    await aclose_shared_client()
    assert client.closed and shared_client() is not client
    await aclose_shared_client()


# -- streaming -----------------------------------------------------------------------------


@pytest.mark.parametrize("usage_shape", ["empty_choices", "empty_delta"])
async def test_stream(gateway: OpenRouterGateway, fake_openrouter: FakeOpenRouter, usage_shape: str) -> None:
    pieces = ["Hel", "lo", ", wörld", " 🎉", "\u2028!"]
    fake_openrouter.enqueue(fake_openrouter.sse_stream(pieces, usage=(12, 6), usage_shape=usage_shape,
                                                       model="openai/gpt-4o-mini-2024-07-18"))
    ctx = await gateway.stream(model="openai/gpt-4o-mini", messages=MESSAGES, max_tokens=64)
    assert await collect(ctx) == pieces
    assert ctx.ending.usage == Usage(12, 6, estimated=False)
    assert ctx.ending.provider_model == "openai/gpt-4o-mini-2024-07-18"
    assert ctx.ending.finish_reason == "stop"
    record = ctx.record
    assert (record.status, record.http_status, record.stream, record.error) == ("ok", 200, True, "")
    assert record.provider == "OpenAI" and record.usage == Usage(12, 6)
    assert record.ttft_ms is not None and 0 <= record.ttft_ms <= record.latency_ms
    assert ctx.records == [record]
    assert ctx.ending == StreamEnding(status="ok", usage=Usage(12, 6), provider_model="openai/gpt-4o-mini-2024-07-18",
                                      finish_reason="stop", records=[record])

    body = fake_openrouter.requests[0].body
    assert body["stream"] is True and body["max_tokens"] == 64
    assert body["stream_options"] == {"include_usage": True} and body["usage"] == {"include": True}
    assert fake_openrouter.requests[0].headers["authorization"] == "Bearer test-key"
    await ctx.aclose()  # after the end: harmless
    assert ctx.record.status == "ok"


async def test_stream_without_usage(gateway: OpenRouterGateway, fake_openrouter: FakeOpenRouter) -> None:
    fake_openrouter.enqueue(fake_openrouter.sse_stream(["a", "b"], usage=None))
    ctx = await gateway.stream(model="m", messages=MESSAGES, max_tokens=8)
    assert "".join(await collect(ctx)) == "ab"
    assert ctx.ending.usage is None
    assert ctx.ending.provider_model == DEFAULT_MODEL


@pytest.mark.parametrize(("code", "status"), [("server_error", None), (502, 502)])
async def test_error_chunk_mid_stream(gateway: OpenRouterGateway, fake_openrouter: FakeOpenRouter,
                                      code: int | str, status: int | None) -> None:
    fake_openrouter.enqueue(fake_openrouter.sse_stream(["one ", "two ", "three"], error_after=2,
                                                       error_code=code, error_usage=(9, 2)))
    ctx = await gateway.stream(model="m", messages=MESSAGES, max_tokens=8)
    received = []
    with pytest.raises(UpstreamError) as info:
        async for delta in ctx.chunks:
            received.append(delta)
    assert received == ["one ", "two "]
    assert info.value.message == "Provider disconnected unexpectedly"
    assert info.value.status == status
    assert info.value.usage == Usage(9, 2)
    assert info.value.records == [ctx.record]
    assert ctx.ending.usage == Usage(9, 2)
    assert ctx.ending.provider_model == DEFAULT_MODEL
    assert (ctx.record.status, ctx.record.error) == ("error", "Provider disconnected unexpectedly")


async def test_error_chunk_before_any_content(gateway: OpenRouterGateway,
                                              fake_openrouter: FakeOpenRouter) -> None:
    fake_openrouter.enqueue(fake_openrouter.sse_stream(["x"], error_after=0))
    ctx = await gateway.stream(model="m", messages=MESSAGES, max_tokens=8)
    with pytest.raises(UpstreamError):
        await collect(ctx)
    assert ctx.record.ttft_ms is None and ctx.ending.usage is None


@pytest.mark.parametrize("how", ["no_done", "dropped_connection", "unframed_eof"])
async def test_truncated_stream_raises(gateway: OpenRouterGateway, fake_openrouter: FakeOpenRouter,
                                       how: str) -> None:
    if how == "no_done":
        reply = fake_openrouter.sse_stream(["a", "b"], done=False)
    elif how == "dropped_connection":
        reply = fake_openrouter.sse_stream(["a", "b"], done=False, drop_connection=True)
    else:  # body delimited by connection close, last event unterminated
        reply = fake_openrouter.raw_stream([b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n',
                                            b'data: {"choices":[{"delta":{"content":"b"}}]}\n\n',
                                            b"data: [DONE]"], chunked=False)
    fake_openrouter.enqueue(reply)
    ctx = await gateway.stream(model="m", messages=MESSAGES, max_tokens=8)
    received = []
    with pytest.raises(UpstreamError) as info:
        async for delta in ctx.chunks:
            received.append(delta)
    assert received == ["a", "b"]
    assert "truncated stream" in info.value.message
    assert ctx.record.status == "error"
    assert ctx.ending.provider_model in (DEFAULT_MODEL, "")
    if how == "no_done":
        assert ctx.ending.usage == Usage(10, 5)  # usage came, only [DONE] is missing


async def test_non_200_at_stream_open_raises_before_returning(gateway: OpenRouterGateway,
                                                              fake_openrouter: FakeOpenRouter) -> None:
    fake_openrouter.enqueue(fake_openrouter.http_error(402, "Insufficient credits"))
    with pytest.raises(UpstreamError) as info:
        await gateway.stream(model="m", messages=MESSAGES, max_tokens=8)
    assert (info.value.status, info.value.message) == (402, "Insufficient credits")
    assert [(r.status, r.http_status, r.stream) for r in info.value.records] == [("error", 402, True)]


async def test_stream_open_is_retried(gateway: OpenRouterGateway, fake_openrouter: FakeOpenRouter) -> None:
    fake_openrouter.enqueue(fake_openrouter.http_error(503, "No provider", retry_after=0),
                            fake_openrouter.sse_stream(["ok"]))
    ctx = await gateway.stream(model="m", messages=MESSAGES, max_tokens=8)
    assert await collect(ctx) == ["ok"]
    assert [(r.status, r.http_status) for r in ctx.records] == [("error", 503), ("ok", 200)]
    assert ctx.prior_records == ctx.records[:1]
    assert ctx.ending.records == ctx.records and ctx.ending.status == "ok"


async def test_a_retried_stream_that_fails_reports_every_attempt(gateway: OpenRouterGateway,
                                                                 fake_openrouter: FakeOpenRouter) -> None:
    fake_openrouter.enqueue(fake_openrouter.http_error(503, "No provider", retry_after=0),
                            fake_openrouter.sse_stream(["one ", "two"], error_after=1, error_usage=(9, 2)))
    ctx = await gateway.stream(model="m", messages=MESSAGES, max_tokens=8)
    with pytest.raises(UpstreamError) as info:
        await collect(ctx)
    assert [(r.status, r.http_status) for r in info.value.records] == [("error", 503), ("error", 200)]
    assert ctx.ending.records == info.value.records and ctx.ending.usage == info.value.usage == Usage(9, 2)
    assert ctx.ending.status == "error"

    # A JSON answer is read when the stream opens: its error raises there, every attempt with it.
    fake_openrouter.enqueue(fake_openrouter.http_error(503, "No provider", retry_after=0),
                            fake_openrouter.raw_json(b'{"error": {"message": "bad", "code": 400}}'))
    with pytest.raises(UpstreamError) as info:
        await gateway.stream(model="m", messages=MESSAGES, max_tokens=8)
    assert [(r.status, r.http_status) for r in info.value.records] == [("error", 503), ("error", 200)]
    assert info.value.message == "bad"


async def test_hostile_framing_through_the_real_server(gateway: OpenRouterGateway,
                                                       fake_openrouter: FakeOpenRouter) -> None:
    def event(content: str, **extra: Any) -> bytes:
        return json.dumps({"model": "x/y", "choices": [{"index": 0, "delta": {"content": content}}], **extra},
                          ensure_ascii=False).encode()

    usage = json.dumps({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 4}}).encode()
    e1, e2 = event("h\u00e9llo"), event(" w\u2028rld", unknown_field={"a": 1})
    cut = e1.index("é".encode()) + 1  # inside the two bytes of "é"
    writes = [
        b": OPENROUTER PROCESSING\r\n\r\n",
        b"data: " + e1[:cut], e1[cut:] + b"\r",  # mid-UTF-8 split, then CRLF split across writes
        b"\n\r\n: comment between events\n",
        b"id: 1\nevent: message\nretry: 100\ndata:" + e2 + b"\r\r",  # lone CR, `data:` without space
        b'data: {"choices": [{"delta":\ndata: {"content": "!"}}]}\n\n',  # multi-line data
        b"data: " + usage + b"\n\nda", b"ta: [DONE]\n\n",
    ]
    fake_openrouter.enqueue(fake_openrouter.raw_stream(writes, delay=0.02))
    ctx = await gateway.stream(model="m", messages=MESSAGES, max_tokens=8)
    assert await collect(ctx) == ["h\u00e9llo", " w\u2028rld", "!"]
    assert ctx.ending.usage == Usage(7, 4)
    assert ctx.ending.provider_model == "x/y"
    assert ctx.record.status == "ok"


async def test_malformed_chunk_raises(gateway: OpenRouterGateway, fake_openrouter: FakeOpenRouter) -> None:
    fake_openrouter.enqueue(fake_openrouter.raw_stream([b"data: {not json\n\n", b"data: [DONE]\n\n"]))
    ctx = await gateway.stream(model="m", messages=MESSAGES, max_tokens=8)
    with pytest.raises(UpstreamError, match="malformed"):
        await collect(ctx)


async def test_stream_read_timeout(fake_openrouter: FakeOpenRouter) -> None:
    gateway = OpenRouterGateway(base_url=fake_openrouter.base_url, api_key="k", timeout_seconds=0.5)
    fake_openrouter.enqueue(fake_openrouter.raw_stream(
        [b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n', b"data: [DONE]\n\n"], delay=2.0))
    ctx = await gateway.stream(model="m", messages=MESSAGES, max_tokens=8)
    received = []
    with pytest.raises(UpstreamTimeout):
        async for delta in ctx.chunks:
            received.append(delta)
    assert received == ["a"]
    assert ctx.record.status == "error" and ctx.ending.usage is None
    await aclose_shared_client()


async def test_json_answer_to_a_stream_request(gateway: OpenRouterGateway,
                                               fake_openrouter: FakeOpenRouter) -> None:
    # A server that ignores "stream": true still works.
    fake_openrouter.enqueue(completion("All at once", usage=(3, 2)))
    ctx = await gateway.stream(model="m", messages=MESSAGES, max_tokens=8)
    assert await collect(ctx) == ["All at once"]
    assert ctx.ending.usage == Usage(3, 2)
    assert ctx.record.status == "ok"


# -- cancellation --------------------------------------------------------------------------


async def test_aclose_mid_stream_disconnects_upstream(gateway: OpenRouterGateway,
                                                      fake_openrouter: FakeOpenRouter) -> None:
    fake_openrouter.enqueue(fake_openrouter.slow_stream(200, delay=0.05))
    ctx = await gateway.stream(model="m", messages=MESSAGES, max_tokens=8)
    received = []
    async for delta in ctx.chunks:
        received.append(delta)
        if len(received) == 3:
            break
    await ctx.aclose()
    closed_at = time.monotonic()
    assert await asyncio.to_thread(fake_openrouter.disconnected.wait, 1.0)
    assert time.monotonic() - closed_at < 1.0
    assert received == ["w0 ", "w1 ", "w2 "]
    assert ctx.record.status == "cancelled" and ctx.record.ttft_ms is not None
    assert ctx.ending.usage is None
    assert ctx.ending.provider_model == DEFAULT_MODEL
    await ctx.aclose()  # idempotent
    assert ctx.record.status == "cancelled"


async def test_aclose_while_another_task_reads(gateway: OpenRouterGateway,
                                               fake_openrouter: FakeOpenRouter) -> None:
    fake_openrouter.enqueue(fake_openrouter.slow_stream(200, delay=0.05))
    ctx = await gateway.stream(model="m", messages=MESSAGES, max_tokens=8)
    received: list[str] = []
    two_received = asyncio.Event()

    async def reader() -> None:
        async for delta in ctx.chunks:
            received.append(delta)
            if len(received) == 2:
                two_received.set()

    task = asyncio.create_task(reader())
    await asyncio.wait_for(two_received.wait(), 2)
    await ctx.aclose()
    await asyncio.wait_for(task, 1)  # the reader stops by itself, quietly
    assert await asyncio.to_thread(fake_openrouter.disconnected.wait, 1.0)
    assert ctx.record.status == "cancelled"
    assert ctx.ending.usage is None


async def test_cancelling_the_reader_closes_upstream(gateway: OpenRouterGateway,
                                                     fake_openrouter: FakeOpenRouter) -> None:
    fake_openrouter.enqueue(fake_openrouter.slow_stream(200, delay=0.05))
    ctx = await gateway.stream(model="m", messages=MESSAGES, max_tokens=8)
    task = asyncio.create_task(collect(ctx))
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await asyncio.to_thread(fake_openrouter.disconnected.wait, 1.0)
    assert ctx.record.status == "cancelled"
    assert ctx.ending.usage is None


async def test_aclose_before_reading(gateway: OpenRouterGateway, fake_openrouter: FakeOpenRouter) -> None:
    fake_openrouter.enqueue(fake_openrouter.slow_stream(50, delay=0.05))
    ctx = await gateway.stream(model="m", messages=MESSAGES, max_tokens=8)
    await ctx.aclose()
    assert await asyncio.to_thread(fake_openrouter.disconnected.wait, 1.0)
    assert await collect(ctx) == []
    assert ctx.record.status == "cancelled"
    assert ctx.ending.usage is None
    assert ctx.ending.provider_model == ""


async def test_closing_the_chunk_iterator_marks_cancelled(gateway: OpenRouterGateway,
                                                          fake_openrouter: FakeOpenRouter) -> None:
    fake_openrouter.enqueue(fake_openrouter.slow_stream(50, delay=0.05))
    ctx = await gateway.stream(model="m", messages=MESSAGES, max_tokens=8)
    async with contextlib.aclosing(ctx.chunks) as chunks:  # type: ignore[type-var]
        async for _ in chunks:
            break
    assert ctx.record.status == "cancelled"
    assert await asyncio.to_thread(fake_openrouter.disconnected.wait, 1.0)
    assert ctx.ending.usage is None


def test_records_are_plain_call_records() -> None:
    # The contract other modules persist from.
    assert CallRecord(requested_model="m").status == "ok"


# -- the proxy from the environment ---------------------------------------------------------


@pytest.fixture
def proxy_env(monkeypatch):
    """HTTP(S)_PROXY and NO_PROXY set for one test (the proxy lookup is cached per URL)."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy", "ALL_PROXY",
                 "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    _proxy_for.cache_clear()
    yield monkeypatch
    _proxy_for.cache_clear()


async def test_the_environment_s_proxy_applies_and_no_proxy_bypasses_it(fake_openrouter: FakeOpenRouter,
                                                                        proxy_env) -> None:
    proxy_env.setenv("HTTP_PROXY", f"http://127.0.0.1:{_closed_port()}")  # a proxy that is down
    gateway = OpenRouterGateway(base_url=fake_openrouter.base_url, api_key="k", timeout_seconds=2, max_retries=0,
                                backoff_seconds=0)
    fake_openrouter.enqueue(completion("through"))
    with pytest.raises(UpstreamError):  # it went to the proxy, not to the provider
        await gateway.generate(model="m", messages=MESSAGES, max_tokens=5)
    assert fake_openrouter.requests == []

    proxy_env.setenv("NO_PROXY", "127.0.0.1")
    _proxy_for.cache_clear()
    result = await gateway.generate(model="m", messages=MESSAGES, max_tokens=5)
    assert result.content == "through" and len(fake_openrouter.requests) == 1
    await aclose_shared_client()


async def test_an_upstream_call_hands_nothing_to_a_thread(gateway: OpenRouterGateway, fake_openrouter: FakeOpenRouter,
                                                         proxy_env) -> None:
    """aiohttp's trust_env looks up ~/.netrc and the proxy variables in a thread on every
    request: two thread hops before each call's first byte. The lookup is ours, once per URL."""
    loop = asyncio.get_running_loop()
    handed: list = []
    original = loop.run_in_executor

    def counted(executor, fn, *args):
        handed.append(getattr(fn, "__qualname__", repr(fn)))
        return original(executor, fn, *args)

    async def one_call(pieces: list[str]) -> None:
        fake_openrouter.enqueue(fake_openrouter.sse_stream(pieces, usage=(3, len(pieces))))
        ctx = await gateway.stream(model="m", messages=MESSAGES, max_tokens=8)
        assert await collect(ctx) == pieces

    await one_call(["a", "b"])  # opens the pooled connection (its address lookup may use a thread)
    loop.run_in_executor = counted  # type: ignore[method-assign]
    try:
        await one_call(["c"])
        await one_call(["d", "e"])
    finally:
        loop.run_in_executor = original  # type: ignore[method-assign]
    assert handed == []
    await aclose_shared_client()
