"""Provider text the database cannot store (NUL, unpaired surrogates) is cleaned to U+FFFD by
the gateway, before anyone sees it (SPEC 10), against the real loopback fake upstream."""

from __future__ import annotations

import json
from typing import Any

import pytest

from core.text import clean_text, find_unstorable
from llm_gateway import FakeGateway, OpenRouterGateway, UpstreamError
from llm_gateway.sse import encode_event
from tests.fake_openrouter import FakeOpenRouter, completion, tool_call
from tests.llm_gateway.helpers import collect, recording_executor

MESSAGES = [{"role": "user", "content": "Hi there"}]
FFFD = "\ufffd"
FILE_READ_TOOL = {"type": "function", "function": {
    "name": "file_read", "description": "Read a file",
    "parameters": {"type": "object", "properties": {"file_id": {"type": "string"}}}}}


def assert_storable(value: Any) -> None:
    """Every string in `value` (nested) can go to PostgreSQL and through `.encode()`."""
    if isinstance(value, str):
        assert find_unstorable(value) == -1, repr(value)
        value.encode()
    elif isinstance(value, dict):
        for key, item in value.items():
            assert_storable(key)
            assert_storable(item)
    elif isinstance(value, list | tuple):
        for item in value:
            assert_storable(item)


# -- streamed deltas -----------------------------------------------------------------------


@pytest.mark.parametrize("ensure_ascii", [False, True])
async def test_stream_deltas_are_cleaned(gateway: OpenRouterGateway, fake_openrouter: FakeOpenRouter,
                                         ensure_ascii: bool) -> None:
    # (No piece ends in a high surrogate: that one waits for the next delta, see below.)
    pieces = ["Hel\x00lo", "\ud800 ", " w\udfffö", "rld\x00\x00", " 🎉 \udbff!", " ok\udc00"]
    fake_openrouter.enqueue(fake_openrouter.sse_stream(pieces, usage=(5, 6), ensure_ascii=ensure_ascii))
    # The fake really sends JSON escapes, as a provider would.
    raw = b"".join(fake_openrouter._queue[0].writes)
    assert b"\\u0000" in raw and b"\\ud800" in raw and b"\\udfff" in raw

    ctx = await gateway.stream(model="m", messages=MESSAGES, max_tokens=64)
    deltas = await collect(ctx)

    assert deltas == [clean_text(piece) for piece in pieces]
    assert deltas == ["Hel\ufffdlo", "\ufffd ", " w\ufffdö", "rld\ufffd\ufffd", " 🎉 \ufffd!", " ok\ufffd"]
    assert "".join(deltas) == clean_text("".join(pieces))
    assert_storable(deltas)
    for index, delta in enumerate(deltas):
        encode_event("chunk", {"delta": delta}, index)  # our SSE encoder must not raise
    assert ctx.record.status == "ok"


async def test_clean_delta_is_returned_as_is(gateway: OpenRouterGateway, fake_openrouter: FakeOpenRouter) -> None:
    pieces = ["plain", " text ", "wörld 🎉"]
    fake_openrouter.enqueue(fake_openrouter.sse_stream(pieces))
    ctx = await gateway.stream(model="m", messages=MESSAGES, max_tokens=64)
    assert await collect(ctx) == pieces


async def test_surrogate_pair_split_across_deltas_is_joined(gateway: OpenRouterGateway,
                                                            fake_openrouter: FakeOpenRouter) -> None:
    # A server slicing UTF-16 code units may send the two halves of 😀 (U+1F600) in two events.
    high, low = "\ud83d", "\ude00"
    pieces = ["smile " + high, low + " ok", " lone " + high, "x", " end " + high]
    fake_openrouter.enqueue(fake_openrouter.sse_stream(pieces))
    ctx = await gateway.stream(model="m", messages=MESSAGES, max_tokens=64)
    deltas = await collect(ctx)
    assert "".join(deltas) == "smile 😀 ok lone \ufffdx end \ufffd"
    assert_storable(deltas)
    assert ctx.record.status == "ok"


async def test_error_chunk_message_is_cleaned(gateway: OpenRouterGateway, fake_openrouter: FakeOpenRouter) -> None:
    fake_openrouter.enqueue(fake_openrouter.sse_stream(
        ["a\x00", "b"], error_after=1, error_message="Provider\x00 broke \ud800", model="x/y\x00"))
    ctx = await gateway.stream(model="m", messages=MESSAGES, max_tokens=8)
    received = []
    with pytest.raises(UpstreamError) as info:
        async for delta in ctx.chunks:
            received.append(delta)
    assert received == ["a" + FFFD]
    assert info.value.message == "Provider\ufffd broke \ufffd"
    assert ctx.record.error == info.value.message
    assert ctx.ending.provider_model == "x/y" + FFFD


async def test_stream_model_and_provider_are_cleaned(gateway: OpenRouterGateway,
                                                     fake_openrouter: FakeOpenRouter) -> None:
    fake_openrouter.enqueue(fake_openrouter.sse_stream(["hi"], model="openai/gpt\x00-4o\ud800",
                                                       provider="Open\x00AI"))
    ctx = await gateway.stream(model="m", messages=MESSAGES, max_tokens=8)
    assert await collect(ctx) == ["hi"]
    assert ctx.ending.provider_model == "openai/gpt\ufffd-4o\ufffd"
    assert ctx.record.provider_model == "openai/gpt\ufffd-4o\ufffd"
    assert ctx.record.provider == "Open\ufffdAI"


async def test_json_answer_to_a_stream_request_is_cleaned(gateway: OpenRouterGateway,
                                                          fake_openrouter: FakeOpenRouter) -> None:
    fake_openrouter.enqueue(completion("All\x00 at \ud800once", model="m\x00", provider="p\udc00"))
    ctx = await gateway.stream(model="m", messages=MESSAGES, max_tokens=8)
    assert await collect(ctx) == ["All\ufffd at \ufffdonce"]
    assert ctx.ending.provider_model == "m" + FFFD
    assert ctx.record.provider == "p" + FFFD


# -- non-streamed completions ----------------------------------------------------------------


async def test_generate_content_model_and_provider_are_cleaned(gateway: OpenRouterGateway,
                                                               fake_openrouter: FakeOpenRouter) -> None:
    fake_openrouter.enqueue(completion("Hel\x00lo \ud800 wörld \udfff🎉", model="openai/x\x00",
                                       provider="Azure\ud800"))
    result = await gateway.generate(model="m", messages=MESSAGES, max_tokens=64)
    assert result.content == "Hel\ufffdlo \ufffd wörld \ufffd🎉"
    assert result.provider_model == "openai/x" + FFFD
    [record] = result.records
    assert (record.provider_model, record.provider) == ("openai/x" + FFFD, "Azure" + FFFD)


async def test_generate_content_parts_are_cleaned(gateway: OpenRouterGateway,
                                                  fake_openrouter: FakeOpenRouter) -> None:
    fake_openrouter.enqueue(completion(None, extra={"choices": [{"index": 0, "finish_reason": "stop", "message": {
        "role": "assistant", "content": [{"type": "text", "text": "a\x00"}, {"type": "text", "text": "\ud800b"}]}}]}))
    result = await gateway.generate(model="m", messages=MESSAGES, max_tokens=64)
    assert result.content == "a\ufffd\ufffdb"


async def test_tool_call_ids_names_and_arguments_are_cleaned(gateway: OpenRouterGateway,
                                                             fake_openrouter: FakeOpenRouter) -> None:
    calls_seen: list[tuple[str, dict[str, Any]]] = []

    async def executor(name: str, arguments: dict[str, Any]) -> str:
        calls_seen.append((name, arguments))
        return "result with NUL \x00 and \ud800"  # the tool's text is stored too

    fake_openrouter.enqueue(
        completion(None, tool_calls=[
            tool_call("file_read", '{"file_id": "ab\x00c\ud800"}', id="call\x00_1\udbff"),
            tool_call("file_\x00read", {"file_id": "x"}, id="call_2"),
        ]),
        completion("done"),
    )
    result = await gateway.generate(model="m", messages=MESSAGES, max_tokens=64, tools=[FILE_READ_TOOL],
                                    tool_executor=executor)
    assert result.content == "done"
    assistant, tool_1, tool_2 = result.tool_messages
    assert [c["id"] for c in assistant["tool_calls"]] == ["call\ufffd_1\ufffd", "call_2"]
    assert [c["function"]["name"] for c in assistant["tool_calls"]] == ["file_read", "file_\ufffdread"]
    assert assistant["tool_calls"][0]["function"]["arguments"] == '{"file_id": "ab\ufffdc\ufffd"}'
    assert calls_seen[0] == ("file_read", {"file_id": "ab\ufffdc\ufffd"})
    assert tool_1["tool_call_id"] == "call\ufffd_1\ufffd"
    assert tool_1["content"] == "result with NUL \ufffd and \ufffd"
    assert_storable(result.tool_messages)
    # What went back to the provider is what is stored.
    sent = fake_openrouter.requests[1].body["messages"]
    assert sent[-3:] == result.tool_messages


async def test_tool_call_arguments_object_is_cleaned(gateway: OpenRouterGateway,
                                                     fake_openrouter: FakeOpenRouter) -> None:
    # Some servers send `arguments` as a JSON object instead of a string.
    call = {"id": "c1", "type": "function", "function": {"name": "file_read", "arguments": {"file_id": "a\x00"}}}
    fake_openrouter.enqueue(completion(None, tool_calls=[call]), completion("ok"))
    executor, seen = recording_executor()

    result = await gateway.generate(model="m", messages=MESSAGES, max_tokens=64, tools=[FILE_READ_TOOL],
                                    tool_executor=executor)
    assert json.loads(result.tool_messages[0]["tool_calls"][0]["function"]["arguments"]) == {"file_id": "a\ufffd"}
    assert seen == [{"file_id": "a\ufffd"}]


async def test_escapes_inside_tool_call_arguments_are_cleaned(gateway: OpenRouterGateway,
                                                              fake_openrouter: FakeOpenRouter) -> None:
    # The arguments text holds JSON escapes: storable as text, but they decode to NUL and a
    # lone surrogate, which the tool would put in a query.
    arguments = '{"file_id": "a\\u0000b\\ud800", "k\\u0000": ["\\udfff"]}'
    call = {"id": "c1", "type": "function", "function": {"name": "file_read", "arguments": arguments}}
    fake_openrouter.enqueue(completion(None, tool_calls=[call]), completion("ok"))
    executor, seen = recording_executor()

    result = await gateway.generate(model="m", messages=MESSAGES, max_tokens=64, tools=[FILE_READ_TOOL],
                                    tool_executor=executor)
    assert seen == [{"file_id": "a\ufffdb\ufffd", "k\ufffd": ["\ufffd"]}]
    assert result.tool_messages[0]["tool_calls"][0]["function"]["arguments"] == arguments
    assert_storable(result.tool_messages)


# -- provider error messages -----------------------------------------------------------------


async def test_http_error_message_is_cleaned(gateway: OpenRouterGateway, fake_openrouter: FakeOpenRouter) -> None:
    fake_openrouter.enqueue(fake_openrouter.http_error(400, "bad\x00 request \ud800"))
    with pytest.raises(UpstreamError) as info:
        await gateway.generate(model="m", messages=MESSAGES, max_tokens=8)
    assert info.value.message == "bad\ufffd request \ufffd"
    assert info.value.records[0].error == "HTTP 400: bad\ufffd request \ufffd"


async def test_non_json_error_body_is_cleaned(gateway: OpenRouterGateway, fake_openrouter: FakeOpenRouter) -> None:
    fake_openrouter.enqueue(fake_openrouter.raw_json(b"Bad\x00 gateway \xed\xa0\x80 \xff", status=500,
                                                     content_type="text/plain"))
    with pytest.raises(UpstreamError) as info:
        await gateway.stream(model="m", messages=MESSAGES, max_tokens=8)
    assert_storable(info.value.message)
    assert info.value.message.startswith("Bad\ufffd gateway ")


async def test_error_body_with_status_200_is_cleaned(gateway: OpenRouterGateway,
                                                     fake_openrouter: FakeOpenRouter) -> None:
    fake_openrouter.enqueue(fake_openrouter.raw_json(json.dumps(
        {"error": {"code": "server_error\x00", "message": None}, "model": "m\ud800"}).encode()))
    with pytest.raises(UpstreamError) as info:
        await gateway.generate(model="m", messages=MESSAGES, max_tokens=8)
    assert info.value.message == "upstream error server_error" + FFFD
    assert info.value.records[0].provider_model == "m" + FFFD


# -- the offline fake ------------------------------------------------------------------------


async def test_fake_gateway_echo_is_cleaned() -> None:
    gateway = FakeGateway(chunk_delay_seconds=0)
    messages = [{"role": "user", "content": "hi\x00 there \ud800"}]
    result = await gateway.generate(model="fake/echo", messages=messages, max_tokens=256)
    assert "hi\ufffd there \ufffd" in result.content
    assert_storable(result.content)

    ctx = await gateway.stream(model="fake/echo", messages=messages, max_tokens=256)
    deltas = await collect(ctx)
    assert "".join(deltas) == result.content
    assert_storable(deltas)
