"""A provider's answer, however odd, never breaks the gateway's consumer: token counts stay
storable ints, labels fit their columns, bad bytes and bad JSON become a clean error or U+FFFD,
and nothing grows without bound. Against the real loopback fake upstream."""

from __future__ import annotations

import asyncio
import json
import math
import time
from typing import Any

import pytest

from llm_gateway import OpenRouterGateway, UpstreamError, Usage
from llm_gateway import openrouter as openrouter_module
from llm_gateway.base import MAX_TOKEN_COUNT, token_count
from llm_gateway.sse import SSEDecoder, SSEEventTooLarge
from tests.fake_openrouter import FakeOpenRouter, completion, sse_data
from tests.llm_gateway.helpers import collect, recording_executor

MESSAGES = [{"role": "user", "content": "Hi there"}]
INT_MAX = 2**31 - 1  # PositiveIntegerField's upper bound


def content_event(text: str, **extra: Any) -> bytes:
    return sse_data({"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}], **extra})


# -- token counts ----------------------------------------------------------------------------


def test_token_count() -> None:
    assert token_count(12) == 12
    assert token_count(0) == 0
    assert token_count(-5) == 0
    assert token_count(12.0) == 12
    assert token_count(12.2) == 13  # a fractional count errs on the billed side
    assert token_count(10**12) == MAX_TOKEN_COUNT
    assert token_count(math.inf) == MAX_TOKEN_COUNT
    assert token_count(-math.inf) == 0
    assert token_count(" 42 ") == 42
    assert token_count("9" * 5000) == MAX_TOKEN_COUNT  # no int() digit-limit error
    for junk in (math.nan, True, False, None, "", "12a", "-3", [1], {"a": 1}):
        assert token_count(junk) is None, junk


def test_usage_is_bounded_and_sums_stay_bounded() -> None:
    assert 2 * MAX_TOKEN_COUNT <= INT_MAX
    usage = Usage(prompt_tokens=-1, completion_tokens=2**40)
    assert (usage.prompt_tokens, usage.completion_tokens) == (0, MAX_TOKEN_COUNT)
    total = usage + usage + usage
    assert total.completion_tokens == MAX_TOKEN_COUNT and total.total_tokens <= INT_MAX
    assert Usage(3.5, 2).prompt_tokens == 4  # type: ignore[arg-type]
    assert type(Usage(3.0, 2).prompt_tokens) is int  # type: ignore[arg-type]


WEIRD_USAGES = [
    ({"prompt_tokens": -7, "completion_tokens": 3}, Usage(0, 3)),
    ({"prompt_tokens": 12.0, "completion_tokens": 3.5}, Usage(12, 4)),
    ({"prompt_tokens": 2**31 + 5, "completion_tokens": 10**30}, Usage(MAX_TOKEN_COUNT, MAX_TOKEN_COUNT)),
    ({"prompt_tokens": "12", "completion_tokens": 3}, Usage(12, 3)),
    ({"prompt_tokens": "lots", "completion_tokens": 3}, Usage(0, 3)),
    ({"prompt_tokens": [1], "completion_tokens": {"n": 1}}, None),
    ({"prompt_tokens": True, "completion_tokens": None}, None),
    ([12, 3], None),
    ("12/3", None),
]


@pytest.mark.parametrize(("raw", "expected"), WEIRD_USAGES)
async def test_weird_stream_usage(gateway: OpenRouterGateway, fake_openrouter: FakeOpenRouter,
                                  raw: Any, expected: Usage | None) -> None:
    fake_openrouter.enqueue(fake_openrouter.raw_stream([
        content_event("hi"), sse_data({"choices": [], "usage": raw}), b"data: [DONE]\n\n"]))
    ctx = await gateway.stream(model="m", messages=MESSAGES, max_tokens=8)
    assert await collect(ctx) == ["hi"]
    assert ctx.ending.usage == expected
    assert ctx.record.status == "ok"


@pytest.mark.parametrize(("raw", "expected"), WEIRD_USAGES)
async def test_weird_completion_usage(gateway: OpenRouterGateway, fake_openrouter: FakeOpenRouter,
                                      raw: Any, expected: Usage | None) -> None:
    fake_openrouter.enqueue(completion("hi", usage=None, extra={"usage": raw}))
    result = await gateway.generate(model="m", messages=MESSAGES, max_tokens=8)
    if expected is None:
        assert result.usage.estimated  # no usable count: an estimate, said so
    else:
        assert result.usage == expected


@pytest.mark.parametrize("number", [b"NaN", b"Infinity", b"-Infinity", b"1e999", b"123456789012345678901234567890"])
async def test_non_finite_token_counts(gateway: OpenRouterGateway, fake_openrouter: FakeOpenRouter,
                                       number: bytes) -> None:
    # Python's json accepts NaN and Infinity; int() of them raises. orjson refuses them (json
    # parses that chunk instead), and gives an integer past 64 bits as a float.
    usage = b'{"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": ' + number + b"}}"
    fake_openrouter.enqueue(fake_openrouter.raw_stream([content_event("hi"), b"data: " + usage + b"\n\n",
                                                        b"data: [DONE]\n\n"]))
    ctx = await gateway.stream(model="m", messages=MESSAGES, max_tokens=8)
    assert await collect(ctx) == ["hi"]
    got = ctx.ending.usage
    assert got is not None and got.prompt_tokens == 4 and 0 <= got.completion_tokens <= MAX_TOKEN_COUNT
    assert ctx.record.status == "ok"

    body = (b'{"model": "m", "choices": [{"index": 0, "finish_reason": "stop", "message": {"content": "hi"}}],'
            b' "usage": {"prompt_tokens": ' + number + b', "completion_tokens": 2}}')
    fake_openrouter.enqueue(fake_openrouter.raw_json(body))
    result = await gateway.generate(model="m", messages=MESSAGES, max_tokens=8)
    assert result.content == "hi" and result.usage.completion_tokens == 2
    assert 0 <= result.usage.prompt_tokens <= MAX_TOKEN_COUNT


async def test_tool_rounds_usage_sum_stays_bounded(gateway: OpenRouterGateway,
                                                   fake_openrouter: FakeOpenRouter) -> None:
    huge = {"prompt_tokens": 2**31, "completion_tokens": 2**31}
    call = {"id": "c", "type": "function", "function": {"name": "t", "arguments": "{}"}}
    fake_openrouter.enqueue(completion(None, tool_calls=[call], usage=huge), completion("ok", usage=huge))
    executor, _ = recording_executor()

    tools = [{"type": "function", "function": {"name": "t", "parameters": {"type": "object"}}}]
    result = await gateway.generate(model="m", messages=MESSAGES, max_tokens=8, tools=tools,
                                    tool_executor=executor)
    assert result.usage.total_tokens <= INT_MAX
    assert all(r.usage is not None and r.usage.total_tokens <= INT_MAX for r in result.records)


# -- labels: model, provider, finish reason, error code ---------------------------------------


async def test_model_that_is_a_number_or_object(gateway: OpenRouterGateway, fake_openrouter: FakeOpenRouter) -> None:
    fake_openrouter.enqueue(fake_openrouter.sse_stream(["a"], model=12345, provider=["x"]))  # type: ignore[arg-type]
    ctx = await gateway.stream(model="m", messages=MESSAGES, max_tokens=8)
    assert await collect(ctx) == ["a"]
    assert ctx.ending.provider_model == ""
    assert (ctx.record.provider_model, ctx.record.provider) == ("", "")

    fake_openrouter.enqueue(completion("b", model=12345, provider={"a": 1}))  # type: ignore[arg-type]
    result = await gateway.generate(model="m", messages=MESSAGES, max_tokens=8)
    assert result.content == "b" and result.provider_model == ""
    assert (result.records[0].provider_model, result.records[0].provider) == ("", "")


async def test_long_model_and_provider_fit_their_columns(gateway: OpenRouterGateway,
                                                         fake_openrouter: FakeOpenRouter) -> None:
    model, provider = "m" * 5000, "p" * 5000
    fake_openrouter.enqueue(fake_openrouter.sse_stream(["a"], model=model, provider=provider),
                            completion("b", model=model, provider=provider))
    ctx = await gateway.stream(model="m", messages=MESSAGES, max_tokens=8)
    await collect(ctx)
    assert ctx.record.provider_model == "m" * 200 and ctx.record.provider == "p" * 100
    assert ctx.ending.provider_model == "m" * 200
    result = await gateway.generate(model="m", messages=MESSAGES, max_tokens=8)
    assert result.provider_model == "m" * 200 and result.records[0].provider == "p" * 100


async def test_long_tool_call_id_fits_its_column(gateway: OpenRouterGateway, fake_openrouter: FakeOpenRouter) -> None:
    call = {"id": "c" * 1000, "type": "function", "function": {"name": "t", "arguments": "{}"}}
    fake_openrouter.enqueue(completion(None, tool_calls=[call]), completion("ok"))
    executor, _ = recording_executor()

    tools = [{"type": "function", "function": {"name": "t", "parameters": {"type": "object"}}}]
    result = await gateway.generate(model="m", messages=MESSAGES, max_tokens=8, tools=tools,
                                    tool_executor=executor)
    assistant, tool = result.tool_messages
    assert assistant["tool_calls"][0]["id"] == tool["tool_call_id"] == "c" * 200


async def test_weird_finish_reason(gateway: OpenRouterGateway, fake_openrouter: FakeOpenRouter) -> None:
    fake_openrouter.enqueue(fake_openrouter.sse_stream(["a"], finish_reason="x" * 10_000 + "\x00"))
    ctx = await gateway.stream(model="m", messages=MESSAGES, max_tokens=8)
    assert await collect(ctx) == ["a"]
    assert 0 < len(ctx.ending.finish_reason) <= 64

    fake_openrouter.enqueue(completion("b", finish_reason={"odd": True}))  # type: ignore[arg-type]
    result = await gateway.generate(model="m", messages=MESSAGES, max_tokens=8)
    assert result.content == "b" and isinstance(result.finish_reason, str)


async def test_huge_error_message_is_shortened(gateway: OpenRouterGateway, fake_openrouter: FakeOpenRouter) -> None:
    fake_openrouter.enqueue(fake_openrouter.http_error(400, "bad " * 100_000))
    with pytest.raises(UpstreamError) as info:
        await gateway.generate(model="m", messages=MESSAGES, max_tokens=8)
    assert len(info.value.message) <= 500 and info.value.message.startswith("bad bad")

    fake_openrouter.enqueue(fake_openrouter.sse_stream(["a"], error_after=1, error_message="x" * 100_000,
                                                       error_code=10**30))
    ctx = await gateway.stream(model="m", messages=MESSAGES, max_tokens=8)
    with pytest.raises(UpstreamError) as info:
        await collect(ctx)
    assert len(info.value.message) <= 500
    assert info.value.status is None  # not an HTTP status


async def test_huge_error_body_is_not_read_whole(gateway: OpenRouterGateway, fake_openrouter: FakeOpenRouter) -> None:
    # More than the socket buffers hold: the server sees us hang up after the first bytes.
    fake_openrouter.enqueue(fake_openrouter.raw_json(b"E" * (32 * 1024 * 1024), status=500,
                                                     content_type="text/plain"))
    with pytest.raises(UpstreamError) as info:
        await gateway.generate(model="m", messages=MESSAGES, max_tokens=8)
    assert info.value.message == "E" * 500 and info.value.status == 500
    # Waited for in a thread: the socket closes in the event loop's next iteration.
    assert await asyncio.to_thread(fake_openrouter.disconnected.wait, 5)


# -- bytes and JSON ---------------------------------------------------------------------------


async def test_invalid_utf8_in_a_stream(gateway: OpenRouterGateway, fake_openrouter: FakeOpenRouter) -> None:
    # \xff is never UTF-8; \xed\xa0\x80 is a surrogate encoded as UTF-8 (also invalid).
    writes = [b'data: {"choices": [{"delta": {"content": "a\xffb\xed\xa0\x80c"}}], "model": "m\xfe"}\n\n',
              b"data: [DONE]\n\n"]
    fake_openrouter.enqueue(fake_openrouter.raw_stream(writes))
    ctx = await gateway.stream(model="m", messages=MESSAGES, max_tokens=8)
    deltas = await collect(ctx)
    assert deltas == ["a\ufffdb\ufffd\ufffd\ufffdc"]
    assert ctx.ending.provider_model == "m\ufffd"


async def test_invalid_utf8_in_a_completion(gateway: OpenRouterGateway, fake_openrouter: FakeOpenRouter) -> None:
    body = (b'{"model": "m", "choices": [{"index": 0, "finish_reason": "stop",'
            b' "message": {"content": "a\xffb\xed\xa0\x80c"}}], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}')
    fake_openrouter.enqueue(fake_openrouter.raw_json(body), fake_openrouter.raw_json(body))
    result = await gateway.generate(model="m", messages=MESSAGES, max_tokens=8)
    assert result.content == "a\ufffdb\ufffd\ufffd\ufffdc"
    ctx = await gateway.stream(model="m", messages=MESSAGES, max_tokens=8)  # the JSON fallback path
    assert await collect(ctx) == ["a\ufffdb\ufffd\ufffd\ufffdc"]


async def test_utf8_bom_before_a_completion(gateway: OpenRouterGateway, fake_openrouter: FakeOpenRouter) -> None:
    body = b"\xef\xbb\xbf" + json.dumps({"choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}]}).encode()
    fake_openrouter.enqueue(fake_openrouter.raw_json(body))
    result = await gateway.generate(model="m", messages=MESSAGES, max_tokens=8)
    assert result.content == "hi"


async def assert_fails_after_a(gateway: OpenRouterGateway, fake_openrouter: FakeOpenRouter, writes: list[bytes], *,
                               match: str) -> None:
    """A stream of the delta "a" then `writes` gives "a", then an UpstreamError matching
    `match`, and its record says error."""
    fake_openrouter.enqueue(fake_openrouter.raw_stream([content_event("a"), *writes]))
    ctx = await gateway.stream(model="m", messages=MESSAGES, max_tokens=8)
    received = []
    with pytest.raises(UpstreamError, match=match):
        async for delta in ctx.chunks:
            received.append(delta)
    assert received == ["a"] and ctx.record.status == "error"


DEEP = b"[" * 200_000 + b"]" * 200_000  # RecursionError in json.loads, which is not a ValueError


async def test_deeply_nested_stream_chunk(gateway: OpenRouterGateway, fake_openrouter: FakeOpenRouter) -> None:
    await assert_fails_after_a(gateway, fake_openrouter, [b'data: {"x": ' + DEEP + b"}\n\n", b"data: [DONE]\n\n"],
                               match="malformed")


async def test_deeply_nested_completion(gateway: OpenRouterGateway, fake_openrouter: FakeOpenRouter) -> None:
    fake_openrouter.enqueue(fake_openrouter.raw_json(DEEP), fake_openrouter.raw_json(DEEP))
    with pytest.raises(UpstreamError, match="invalid JSON"):
        await gateway.generate(model="m", messages=MESSAGES, max_tokens=8)
    with pytest.raises(UpstreamError, match="invalid JSON"):
        await gateway.stream(model="m", messages=MESSAGES, max_tokens=8)


async def test_deeply_nested_error_body(gateway: OpenRouterGateway, fake_openrouter: FakeOpenRouter) -> None:
    fake_openrouter.enqueue(fake_openrouter.raw_json(DEEP, status=400))
    with pytest.raises(UpstreamError) as info:
        await gateway.stream(model="m", messages=MESSAGES, max_tokens=8)
    assert info.value.status == 400


async def test_huge_retry_field_is_ignored(gateway: OpenRouterGateway, fake_openrouter: FakeOpenRouter) -> None:
    # int() refuses more than 4300 digits.
    fake_openrouter.enqueue(fake_openrouter.raw_stream([b"retry: " + b"9" * 5000 + b"\n" + content_event("a"),
                                                        b"data: [DONE]\n\n"]))
    ctx = await gateway.stream(model="m", messages=MESSAGES, max_tokens=8)
    assert await collect(ctx) == ["a"]
    assert ctx.record.status == "ok"


# -- size ------------------------------------------------------------------------------------


async def test_ten_megabyte_single_line(gateway: OpenRouterGateway, fake_openrouter: FakeOpenRouter) -> None:
    big = "x" * (10 * 1024 * 1024)
    fake_openrouter.enqueue(fake_openrouter.raw_stream([content_event("a"), content_event(big), content_event("b"),
                                                        b"data: [DONE]\n\n"]))
    started = time.monotonic()
    ctx = await gateway.stream(model="m", messages=MESSAGES, max_tokens=8)
    deltas = await collect(ctx)
    assert deltas == ["a", big, "b"]
    assert time.monotonic() - started < 10  # read in linear time
    assert ctx.record.status == "ok"


async def test_oversized_stream_event_fails_cleanly(gateway: OpenRouterGateway, fake_openrouter: FakeOpenRouter,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(openrouter_module, "MAX_EVENT_BYTES", 64 * 1024)
    endless_line = [b"data: " + b"x" * 16 * 1024] * 20  # never ends, never dispatches
    await assert_fails_after_a(gateway, fake_openrouter, endless_line, match="too large")


async def test_many_data_lines_without_dispatch_fail_cleanly(gateway: OpenRouterGateway,
                                                            fake_openrouter: FakeOpenRouter,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(openrouter_module, "MAX_EVENT_BYTES", 64 * 1024)
    lines = [b"data: " + b"y" * 1000 + b"\n"] * 200
    fake_openrouter.enqueue(fake_openrouter.raw_stream(lines))
    ctx = await gateway.stream(model="m", messages=MESSAGES, max_tokens=8)
    with pytest.raises(UpstreamError, match="too large"):
        await collect(ctx)


async def test_oversized_completion_body_fails_cleanly(gateway: OpenRouterGateway, fake_openrouter: FakeOpenRouter,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(openrouter_module, "MAX_BODY_BYTES", 64 * 1024)
    fake_openrouter.enqueue(completion("z" * 200_000), completion("z" * 200_000))
    with pytest.raises(UpstreamError, match="too large"):
        await gateway.generate(model="m", messages=MESSAGES, max_tokens=8)
    with pytest.raises(UpstreamError, match="too large"):
        await gateway.stream(model="m", messages=MESSAGES, max_tokens=8)


def test_decoder_event_size_limit() -> None:
    decoder = SSEDecoder(max_event_bytes=100)
    assert decoder.feed(b"data: " + b"a" * 90 + b"\n\n")[0].data == "a" * 90  # within the limit
    with pytest.raises(SSEEventTooLarge):
        decoder.feed(b"data: " + b"a" * 200)
    decoder = SSEDecoder(max_event_bytes=100)
    with pytest.raises(SSEEventTooLarge):
        for _ in range(20):
            decoder.feed(b"data: aaaaaaaaaa\n")
    unlimited = SSEDecoder()
    assert unlimited.feed(b"data: " + b"a" * 100_000 + b"\n\n")[0].data == "a" * 100_000


@pytest.mark.parametrize("oversized", [b"data: " + b"x" * 200, b"data: xxxxxxxxxx\n" * 20],
                         ids=["one endless line", "data lines without an end"])
def test_the_events_before_an_oversized_one_come_with_the_error(oversized: bytes) -> None:
    """One read can hold complete events and then the oversized one (aiohttp hands out
    what the socket had): those events are the provider's valid output, so they come out."""
    decoder = SSEDecoder(max_event_bytes=100)
    with pytest.raises(SSEEventTooLarge) as info:
        decoder.feed(b"data: one\n\ndata: two\n\n" + oversized)
    assert [event.data for event in info.value.events] == ["one", "two"]


@pytest.mark.parametrize("as_text", [True, False])
async def test_deeply_nested_tool_call_arguments(gateway: OpenRouterGateway, fake_openrouter: FakeOpenRouter,
                                                 as_text: bool) -> None:
    # As text: too deep for json.loads. As an object: parsed with the body, but deeper than
    # Python code may recurse. Either way the model is told, and the turn goes on.
    if as_text:
        arguments: Any = "[" * 50_000 + "]" * 50_000
        body = completion(None, tool_calls=[{"id": "c", "type": "function",
                                             "function": {"name": "t", "arguments": arguments}}])
    else:
        deep = '{"k": ' + "[" * 5000 + "]" * 5000 + "}"
        call = '{"id": "c", "type": "function", "function": {"name": "t", "arguments": ' + deep + "}}"
        body = fake_openrouter.raw_json(('{"choices": [{"finish_reason": "tool_calls", "message": '
                                         '{"content": null, "tool_calls": [' + call + "]}}]}").encode())
    fake_openrouter.enqueue(body, completion("ok"))
    executor, calls = recording_executor()

    tools = [{"type": "function", "function": {"name": "t", "parameters": {"type": "object"}}}]
    result = await gateway.generate(model="m", messages=MESSAGES, max_tokens=8, tools=tools,
                                    tool_executor=executor)
    assert result.content == "ok" and calls == []
    assert "not valid JSON" in result.tool_messages[1]["content"]


async def test_too_many_tool_calls_in_one_answer(gateway: OpenRouterGateway, fake_openrouter: FakeOpenRouter) -> None:
    # Every call is a stored message and an executor run: 10 000 of them must not reach either.
    calls = [{"id": f"c{i}", "type": "function", "function": {"name": "t", "arguments": "{}"}}
             for i in range(10_000)]
    fake_openrouter.enqueue(completion(None, tool_calls=calls), completion("ok"))
    executor, runs = recording_executor()

    tools = [{"type": "function", "function": {"name": "t", "parameters": {"type": "object"}}}]
    result = await gateway.generate(model="m", messages=MESSAGES, max_tokens=8, tools=tools,
                                    tool_executor=executor)
    limit = openrouter_module.MAX_TOOL_CALLS_PER_ROUND
    assert len(runs) == limit
    assistant, *tool_results = result.tool_messages
    assert len(assistant["tool_calls"]) == len(tool_results) == limit
    assert [m["tool_call_id"] for m in tool_results] == [c["id"] for c in assistant["tool_calls"]]
