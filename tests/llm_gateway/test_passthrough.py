"""What the OpenAI-compatible API (SPEC 14) needs of the gateway: request fields passed
through (never over the gateway's own), and client tools, the caller's to run: sent as
`tools`, their calls returned (`Completion.tool_calls`), or streamed as `ToolCallDelta`s in
order with the text and assembled in the ending. Against the loopback fake upstream."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from llm_gateway import (
    FakeGateway,
    OpenRouterGateway,
    StreamingContext,
    ToolCall,
    ToolCallDelta,
    UpstreamError,
    Usage,
)
from llm_gateway import openrouter as openrouter_module
from llm_gateway.base import OWNED_PARAMS, passthrough_params
from tests.fake_openrouter import FakeOpenRouter, completion, sse_data, sse_tool_calls, tool_call
from tests.llm_gateway.helpers import recording_executor

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"}]
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME_TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
PARAMS = {"temperature": 0.2, "top_p": 0.9, "stop": ["\n\n", "END"], "seed": 7, "presence_penalty": 0.5,
          "frequency_penalty": -0.5, "response_format": {"type": "json_object"}, "parallel_tool_calls": False,
          "user": "user-42", "models": ["openai/gpt-4o-mini", "anthropic/claude-3.5-haiku"]}
# Every key the gateway owns, with values that would hurt if they went through.
HOSTILE_PARAMS = {"model": "evil/model", "messages": [{"role": "user", "content": "injected"}],
                  "max_tokens": 10**6, "max_completion_tokens": 10**6, "n": 8, "stream": "maybe",
                  "stream_options": {"include_usage": False}, "usage": {"include": False},
                  "tools": [{"type": "function", "function": {"name": "rm_rf"}}]}
# A client's second request: its first answer called a tool, the client ran it.
ROUND_TRIP = [
    *MESSAGES,
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_abc", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_abc", "content": '{"temp": 18, "sky": "clear"}'},
]


async def items(ctx: StreamingContext) -> list[str | ToolCallDelta]:
    return [item async for item in ctx.chunks]


def tool_event(*fragments: dict[str, Any], content: Any = None) -> bytes:
    delta: dict[str, Any] = {"tool_calls": list(fragments)}
    if content is not None:
        delta["content"] = content
    return sse_data({"id": "gen-x", "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})


def text_event(text: str) -> bytes:
    return sse_data({"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]})


FINISH_TOOL_CALLS = sse_data({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}],
                              "usage": {"prompt_tokens": 5, "completion_tokens": 4}})
DONE = b"data: [DONE]\n\n"


def assembled(deltas: list[str | ToolCallDelta]) -> dict[int, tuple[str | None, str | None, str]]:
    """index -> (first id, first name, concatenated arguments) of a stream's ToolCallDeltas."""
    calls: dict[int, tuple[str | None, str | None, str]] = {}
    for delta in deltas:
        if isinstance(delta, ToolCallDelta):
            call_id, name, arguments = calls.get(delta.index, (None, None, ""))
            calls[delta.index] = (call_id or delta.id, name or delta.name, arguments + delta.arguments)
    return calls


# -- pass-through parameters -------------------------------------------------------------------


def test_passthrough_params_drops_the_owned_keys() -> None:
    assert passthrough_params(None) == {} and passthrough_params({}) == {}
    merged = passthrough_params({**PARAMS, **HOSTILE_PARAMS})
    assert merged == PARAMS
    assert OWNED_PARAMS == set(HOSTILE_PARAMS)
    assert "tool_choice" not in OWNED_PARAMS  # the client's, outside the tool loop


async def test_params_reach_the_body(gateway: OpenRouterGateway, fake_openrouter: FakeOpenRouter) -> None:
    params = {**PARAMS, "tool_choice": "none"}
    await gateway.generate(model="openai/gpt-4o-mini", messages=MESSAGES, max_tokens=64, params=params)
    ctx = await gateway.stream(model="openai/gpt-4o-mini", messages=MESSAGES, max_tokens=64, params=params)
    await items(ctx)

    generated, streamed = (request.body for request in fake_openrouter.requests)
    for body in (generated, streamed):
        assert {key: body[key] for key in params} == params
        assert body["model"] == "openai/gpt-4o-mini" and body["messages"] == MESSAGES and body["max_tokens"] == 64
        assert "tools" not in body
    assert "stream" not in generated
    assert params == {**PARAMS, "tool_choice": "none"}  # the caller's dict is left alone


async def test_params_cannot_override_owned_keys(gateway: OpenRouterGateway, fake_openrouter: FakeOpenRouter) -> None:
    params = {**PARAMS, **HOSTILE_PARAMS}
    result = await gateway.generate(model="openai/gpt-4o-mini", messages=MESSAGES, max_tokens=64, params=params)
    ctx = await gateway.stream(model="openai/gpt-4o-mini", messages=MESSAGES, max_tokens=64, params=params)
    assert "".join(await items(ctx)) == "Hello from fake upstream"

    assert result.content == "Hello from fake upstream"
    generated, streamed = (request.body for request in fake_openrouter.requests)
    for body in (generated, streamed):
        assert body["model"] == "openai/gpt-4o-mini"
        assert body["messages"] == MESSAGES
        assert body["max_tokens"] == 64
        assert "max_completion_tokens" not in body and "n" not in body and "tools" not in body
        assert body["temperature"] == 0.2 and body["models"] == PARAMS["models"]
    assert "stream" not in generated and "stream_options" not in generated and "usage" not in generated
    assert streamed["stream"] is True
    assert streamed["stream_options"] == {"include_usage": True} and streamed["usage"] == {"include": True}
    assert ctx.ending.usage == Usage(10, 5)  # still read: usage was asked for


async def test_the_tool_loop_owns_tool_choice(gateway: OpenRouterGateway, fake_openrouter: FakeOpenRouter) -> None:
    fake_openrouter.enqueue(completion(None, tool_calls=[tool_call("get_weather", {"city": "Paris"})]),
                            completion("Sunny."))
    executor, seen = recording_executor("18C")
    result = await gateway.generate(model="m", messages=MESSAGES, max_tokens=64, tools=[WEATHER_TOOL],
                                    tool_executor=executor, max_tool_rounds=1,
                                    params={"tool_choice": "required", "temperature": 0, "tools": [TIME_TOOL]})
    assert seen == [{"city": "Paris"}] and result.content == "Sunny."
    assert result.tool_calls == []  # Pantheon ran them: they are in tool_messages
    first, second = (request.body for request in fake_openrouter.requests)
    assert (first["tool_choice"], second["tool_choice"]) == ("auto", "none")
    assert first["tools"] == second["tools"] == [WEATHER_TOOL]
    assert first["temperature"] == second["temperature"] == 0


# -- client tools, not streamed ----------------------------------------------------------------


async def test_client_tools_return_the_tool_calls(gateway: OpenRouterGateway,
                                                  fake_openrouter: FakeOpenRouter) -> None:
    calls = [tool_call("get_weather", {"city": "Paris"}, id="call_1"), tool_call("get_time", "", id="call_2")]
    fake_openrouter.enqueue(completion("Let me check.", tool_calls=calls, usage=(30, 12)))
    result = await gateway.generate(model="m", messages=MESSAGES, max_tokens=64,
                                    client_tools=[WEATHER_TOOL, TIME_TOOL],
                                    params={"tool_choice": "auto", "parallel_tool_calls": True})

    assert result.tool_calls == [ToolCall("call_1", "get_weather", '{"city": "Paris"}'),
                                 ToolCall("call_2", "get_time", "{}")]
    assert result.content == "Let me check." and result.finish_reason == "tool_calls"
    assert result.tool_messages == [] and result.usage == Usage(30, 12)
    [record] = result.records  # one round: the caller runs the tools
    assert record.status == "ok"
    [request] = fake_openrouter.requests
    assert request.body["tools"] == [WEATHER_TOOL, TIME_TOOL]
    assert request.body["tool_choice"] == "auto" and request.body["parallel_tool_calls"] is True


async def test_client_tools_answer_without_calls(gateway: OpenRouterGateway,
                                                 fake_openrouter: FakeOpenRouter) -> None:
    fake_openrouter.enqueue(completion("No tool needed."))
    result = await gateway.generate(model="m", messages=MESSAGES, max_tokens=64, client_tools=[WEATHER_TOOL])
    assert (result.content, result.tool_calls, result.finish_reason) == ("No tool needed.", [], "stop")
    assert "tool_choice" not in fake_openrouter.requests[0].body  # the provider's default


async def test_tool_calls_with_finish_reason_stop_say_tool_calls(gateway: OpenRouterGateway,
                                                                 fake_openrouter: FakeOpenRouter) -> None:
    # Some providers say "stop" with tool calls; clients look for "tool_calls".
    fake_openrouter.enqueue(completion(None, tool_calls=[tool_call("get_time", "{}")], finish_reason="stop"),
                            completion(None, tool_calls=[tool_call("get_time", "{}")], finish_reason="length"))
    first = await gateway.generate(model="m", messages=MESSAGES, max_tokens=64, client_tools=[TIME_TOOL])
    second = await gateway.generate(model="m", messages=MESSAGES, max_tokens=64, client_tools=[TIME_TOOL])
    assert (first.finish_reason, second.finish_reason) == ("tool_calls", "length")


async def test_hostile_non_streamed_tool_calls(gateway: OpenRouterGateway, fake_openrouter: FakeOpenRouter) -> None:
    calls = [{"id": "i\x00d", "type": "function", "function": {"name": "n\x00" + "x" * 5000,
                                                                 "arguments": '{"a": "\x00"}'}},
             {"type": "function", "function": {"name": "no_id", "arguments": {"b": "\ud800"}}},
             "junk", {"id": "no-function"}]
    fake_openrouter.enqueue(completion(None, extra={"choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
        "role": "assistant", "content": None, "tool_calls": calls}}]}))
    result = await gateway.generate(model="m", messages=MESSAGES, max_tokens=64, client_tools=[TIME_TOOL])
    first, second, third = result.tool_calls
    assert first.id == "i\ufffdd" and first.name == ("n\ufffd" + "x" * 5000)[:openrouter_module.MAX_TOOL_NAME_CHARS]
    assert first.arguments == '{"a": "\ufffd"}'
    assert second.id.startswith("call_") and len(second.id) > 10 and second.arguments == '{"b": "\ufffd"}'
    assert (third.id, third.name, third.arguments) == ("no-function", "", "{}")


async def test_client_tools_and_an_executor_are_exclusive(gateway: OpenRouterGateway,
                                                          fake_openrouter: FakeOpenRouter) -> None:
    executor, _ = recording_executor()
    with pytest.raises(ValueError, match="client_tools"):
        await gateway.generate(model="m", messages=MESSAGES, max_tokens=64, tools=[WEATHER_TOOL],
                               tool_executor=executor, client_tools=[TIME_TOOL])
    assert fake_openrouter.requests == []


async def test_empty_client_tools_send_no_tools(gateway: OpenRouterGateway, fake_openrouter: FakeOpenRouter) -> None:
    await gateway.generate(model="m", messages=MESSAGES, max_tokens=64, client_tools=[])
    ctx = await gateway.stream(model="m", messages=MESSAGES, max_tokens=64, client_tools=[])
    await items(ctx)
    assert all("tools" not in request.body for request in fake_openrouter.requests)  # OpenAI refuses []


async def test_a_tool_round_trip_is_sent_intact(gateway: OpenRouterGateway, fake_openrouter: FakeOpenRouter) -> None:
    sent = json.loads(json.dumps(ROUND_TRIP))
    fake_openrouter.enqueue(completion("It is 18C and clear in Paris."))
    result = await gateway.generate(model="m", messages=ROUND_TRIP, max_tokens=64, client_tools=[WEATHER_TOOL])
    ctx = await gateway.stream(model="m", messages=ROUND_TRIP, max_tokens=64, client_tools=[WEATHER_TOOL])
    await items(ctx)

    assert result.content == "It is 18C and clear in Paris." and result.tool_calls == []
    for request in fake_openrouter.requests:
        assert request.body["messages"] == sent
        assert request.body["tools"] == [WEATHER_TOOL]
    assert ROUND_TRIP == sent  # not changed in place either


# -- client tools, streamed --------------------------------------------------------------------


async def test_streamed_tool_calls_arrive_in_order_with_the_text(gateway: OpenRouterGateway,
                                                                 fake_openrouter: FakeOpenRouter) -> None:
    fake_openrouter.enqueue(sse_tool_calls([("get_weather", {"city": "Paris"}, "call_w"),
                                            ("get_time", '{"tz": "Europe/Paris"}', "call_t")],
                                           pieces=["Let me ", "check."], split=3, interleave=True,
                                           usage=(20, 9)))
    ctx = await gateway.stream(model="m", messages=MESSAGES, max_tokens=64, client_tools=[WEATHER_TOOL, TIME_TOOL],
                               params={"tool_choice": "auto"})
    received = await items(ctx)

    assert received[:2] == ["Let me ", "check."]
    deltas = received[2:]
    assert all(isinstance(delta, ToolCallDelta) for delta in deltas)
    # Interleaved as sent: the first fragment of each call, then their argument pieces in turn.
    assert [d.index for d in deltas] == [0, 1, 0, 1, 0, 1, 0, 1]  # type: ignore[union-attr]
    assert deltas[0] == ToolCallDelta(index=0, id="call_w", name="get_weather", arguments="")
    assert deltas[1] == ToolCallDelta(index=1, id="call_t", name="get_time", arguments="")
    assert all(d.id is None and d.name is None and d.arguments for d in deltas[2:])  # type: ignore[union-attr]
    assert assembled(received) == {0: ("call_w", "get_weather", '{"city": "Paris"}'),
                                   1: ("call_t", "get_time", '{"tz": "Europe/Paris"}')}

    ending = ctx.ending
    assert ending.status == "ok" and ending.finish_reason == "tool_calls" and ending.usage == Usage(20, 9)
    assert ending.tool_calls == [ToolCall("call_w", "get_weather", '{"city": "Paris"}'),
                                 ToolCall("call_t", "get_time", '{"tz": "Europe/Paris"}')]
    assert ctx.record.ttft_ms is not None
    [request] = fake_openrouter.requests
    assert request.body["tools"] == [WEATHER_TOOL, TIME_TOOL] and request.body["tool_choice"] == "auto"
    assert request.body["stream"] is True
    # The fake's generation counts a token per piece and per fragment written.
    assert fake_openrouter.wait_for_generation(ctx.generation_id)
    assert fake_openrouter.generations[ctx.generation_id]["tokens_completion"] == 2 + 8
    assert ctx.generation_id == request.generation_id


async def test_text_and_tool_fragments_keep_their_order(gateway: OpenRouterGateway,
                                                        fake_openrouter: FakeOpenRouter) -> None:
    fake_openrouter.enqueue(fake_openrouter.raw_stream([
        text_event("A"),
        tool_event({"index": 0, "id": "c1", "type": "function", "function": {"name": "get_time", "arguments": "{"}}),
        text_event("B"),
        tool_event({"index": 0, "function": {"arguments": "}"}}, content="C"),  # text first, then the fragment
        tool_event({"index": 0, "function": {"arguments": ""}}),  # adds nothing: no delta
        FINISH_TOOL_CALLS, DONE]))
    ctx = await gateway.stream(model="m", messages=MESSAGES, max_tokens=64, client_tools=[TIME_TOOL])
    assert await items(ctx) == ["A", ToolCallDelta(0, "c1", "get_time", "{"), "B", "C",
                                ToolCallDelta(0, None, None, "}")]
    assert ctx.ending.tool_calls == [ToolCall("c1", "get_time", "{}")]


async def test_parallel_calls_in_one_chunk(gateway: OpenRouterGateway, fake_openrouter: FakeOpenRouter) -> None:
    fake_openrouter.enqueue(fake_openrouter.raw_stream([
        tool_event({"index": 0, "id": "a", "function": {"name": "get_time", "arguments": "{}"}},
                   {"index": 1, "id": "b", "function": {"name": "get_weather", "arguments": '{"city"'}}),
        tool_event({"index": 1, "function": {"arguments": ': "Oslo"}'}}),
        FINISH_TOOL_CALLS, DONE]))
    ctx = await gateway.stream(model="m", messages=MESSAGES, max_tokens=64, client_tools=[TIME_TOOL, WEATHER_TOOL])
    assert await items(ctx) == [ToolCallDelta(0, "a", "get_time", "{}"),
                                ToolCallDelta(1, "b", "get_weather", '{"city"'),
                                ToolCallDelta(1, None, None, ': "Oslo"}')]
    assert ctx.ending.tool_calls == [ToolCall("a", "get_time", "{}"), ToolCall("b", "get_weather", '{"city": "Oslo"}')]


async def test_a_stream_without_client_tools_never_yields_tool_calls(gateway: OpenRouterGateway,
                                                                     fake_openrouter: FakeOpenRouter) -> None:
    fake_openrouter.enqueue(sse_tool_calls(pieces=["Hi"]),
                            fake_openrouter.raw_stream([tool_event({"index": 0, "id": "c", "function": {
                                "name": "t", "arguments": "{}"}}, content="x"), FINISH_TOOL_CALLS, DONE]))
    for _ in range(2):
        ctx = await gateway.stream(model="m", messages=MESSAGES, max_tokens=64)
        received = await items(ctx)
        assert all(type(item) is str for item in received)
        assert ctx.ending.tool_calls == [] and ctx.ending.status == "ok"
    assert received == ["x"]
    assert all("tools" not in request.body for request in fake_openrouter.requests)


async def test_a_json_answer_to_a_stream_with_client_tools(gateway: OpenRouterGateway,
                                                           fake_openrouter: FakeOpenRouter) -> None:
    # A server that ignores "stream": its whole answer comes as one text piece, then the calls.
    fake_openrouter.enqueue(completion("Checking.", tool_calls=[tool_call("get_time", "", id="t1")], usage=(3, 4)))
    ctx = await gateway.stream(model="m", messages=MESSAGES, max_tokens=64, client_tools=[TIME_TOOL])
    assert await items(ctx) == ["Checking.", ToolCallDelta(0, "t1", "get_time", "{}")]
    assert ctx.ending.tool_calls == [ToolCall("t1", "get_time", "{}")]
    assert ctx.ending.finish_reason == "tool_calls" and ctx.ending.usage == Usage(3, 4)


async def test_finish_reason_stop_with_streamed_calls_says_tool_calls(gateway: OpenRouterGateway,
                                                                      fake_openrouter: FakeOpenRouter) -> None:
    fake_openrouter.enqueue(sse_tool_calls(finish_reason="stop"), sse_tool_calls(finish_reason="length"))
    for expected in ("tool_calls", "length"):
        ctx = await gateway.stream(model="m", messages=MESSAGES, max_tokens=64, client_tools=[WEATHER_TOOL])
        await items(ctx)
        assert ctx.ending.finish_reason == expected


async def test_a_stream_closed_mid_call_keeps_what_came(gateway: OpenRouterGateway,
                                                        fake_openrouter: FakeOpenRouter) -> None:
    fake_openrouter.enqueue(sse_tool_calls([("get_weather", '{"city": "Paris"}', "c")], split=6, delay=0.05))
    ctx = await gateway.stream(model="m", messages=MESSAGES, max_tokens=64, client_tools=[WEATHER_TOOL])
    received = []
    async for item in ctx.chunks:
        received.append(item)
        if len(received) == 3:
            break
    await ctx.aclose()
    ending = ctx.ending
    assert ending.status == "cancelled" and ending.finish_reason == ""
    [call] = ending.tool_calls
    assert call.id == "c" and call.name == "get_weather"
    assert call.arguments == assembled(received)[0][2] and '{"city": "Paris"}'.startswith(call.arguments)


# -- hostile fragments -------------------------------------------------------------------------


async def stream_tool_events(gateway: OpenRouterGateway, fake_openrouter: FakeOpenRouter,
                             *events: bytes) -> tuple[list[str | ToolCallDelta], StreamingContext]:
    fake_openrouter.enqueue(fake_openrouter.raw_stream([*events, FINISH_TOOL_CALLS, DONE]))
    ctx = await gateway.stream(model="m", messages=MESSAGES, max_tokens=64, client_tools=[TIME_TOOL])
    return await items(ctx), ctx


async def test_bad_indexes(gateway: OpenRouterGateway, fake_openrouter: FakeOpenRouter) -> None:
    received, ctx = await stream_tool_events(
        gateway, fake_openrouter,
        tool_event({"index": -3, "id": "neg", "function": {"name": "a", "arguments": "1"}}),
        tool_event({"index": 10**30, "id": "huge", "function": {"name": "b", "arguments": "2"}}),
        tool_event({"index": -3, "function": {"arguments": "3"}}),  # back to the first call
        tool_event({"index": "0", "id": "str", "function": {"name": "c", "arguments": "4"}}),  # no int index: by id
        tool_event({"index": True, "function": {"arguments": "5"}}),  # no index, no id: the latest call
        tool_event({"index": 1.0, "id": "str", "function": {"arguments": "6"}}),  # by id
        tool_event({"index": None, "id": "new", "function": {"name": "d", "arguments": "7"}}),
        tool_event({"function": {"arguments": "8"}}),
        tool_event({"index": [0], "id": "neg", "function": {"arguments": "9"}}),  # by id: the first call
    )
    assert [d.index for d in received if isinstance(d, ToolCallDelta)] == [0, 1, 0, 2, 2, 2, 3, 3, 0]
    assert ctx.ending.tool_calls == [ToolCall("neg", "a", "139"), ToolCall("huge", "b", "2"),
                                     ToolCall("str", "c", "456"), ToolCall("new", "d", "78")]
    assert ctx.ending.status == "ok"


async def test_junk_fragments_are_ignored(gateway: OpenRouterGateway, fake_openrouter: FakeOpenRouter) -> None:
    junk = [{"choices": [{"index": 0, "delta": {"tool_calls": value}, "finish_reason": None}]}
            for value in (None, "calls", 5, {"index": 0, "id": "x"}, [None, 5, "s", []])]
    received, ctx = await stream_tool_events(
        gateway, fake_openrouter, *map(sse_data, junk),
        tool_event({"index": 0, "id": "c", "function": "get_time"}),  # function not an object: id only
        tool_event({"index": 0}),  # nothing new: no delta
        tool_event({"index": 0, "function": {"name": 5, "arguments": 7}}),  # no usable name or arguments
        tool_event({"index": 0, "function": {"name": "get_time", "arguments": None}}),  # the name, late
        tool_event({"index": 0, "function": {"name": "other", "arguments": "{}"}}),  # the first name wins
        tool_event({"index": 0, "id": "c", "function": {"arguments": ""}}),  # the same id again: no delta
    )
    assert received == [ToolCallDelta(0, "c", None, ""), ToolCallDelta(0, None, "get_time", ""),
                        ToolCallDelta(0, None, None, "{}")]
    assert ctx.ending.tool_calls == [ToolCall("c", "get_time", "{}")]


async def test_a_call_without_id_or_name(gateway: OpenRouterGateway, fake_openrouter: FakeOpenRouter) -> None:
    received, ctx = await stream_tool_events(gateway, fake_openrouter, tool_event({"index": 0}),
                                             tool_event({"index": 1, "function": {"arguments": "{}"}}))
    first, second = received
    assert isinstance(first, ToolCallDelta) and isinstance(second, ToolCallDelta)
    assert first.id and second.id and first.id != second.id and first.id.startswith("call_")
    assert (first.name, first.arguments, second.name, second.arguments) == (None, "", None, "{}")
    assert ctx.ending.tool_calls == [ToolCall(first.id, "", ""), ToolCall(second.id, "", "{}")]


async def test_every_parallel_call_under_index_zero(gateway: OpenRouterGateway,
                                                    fake_openrouter: FakeOpenRouter) -> None:
    # Seen from some OpenAI-compatible servers: each call whole, all with index 0.
    received, ctx = await stream_tool_events(
        gateway, fake_openrouter,
        tool_event({"index": 0, "id": "a", "function": {"name": "get_time", "arguments": "{}"}}),
        tool_event({"index": 0, "id": "b", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}),
        tool_event({"index": 0, "id": "b", "function": {"arguments": ""}}),
    )
    assert [d.index for d in received if isinstance(d, ToolCallDelta)] == [0, 1]
    assert ctx.ending.tool_calls == [ToolCall("a", "get_time", "{}"), ToolCall("b", "get_weather", '{"city": "Rome"}')]


async def test_unstorable_text_in_fragments_is_cleaned(gateway: OpenRouterGateway,
                                                       fake_openrouter: FakeOpenRouter) -> None:
    long_id = "i" * 1000
    received, ctx = await stream_tool_events(
        gateway, fake_openrouter,
        tool_event({"index": 0, "id": long_id + "\x00", "function": {"name": "get\x00time" + "e" * 1000,
                                                                     "arguments": '{"a": "\x00'}}),
        tool_event({"index": 0, "function": {"arguments": 'x\ud83d'}}),  # a pair split over two fragments
        tool_event({"index": 0, "function": {"arguments": '\ude00"}'}}),
        tool_event({"index": 1, "id": "\ud800", "function": {"name": "n", "arguments": {"k\x00": ["\udfff"]}}}),
        tool_event({"index": 1, "function": {"arguments": "\ud800"}}),  # held back, never paired
    )
    deltas = [d for d in received if isinstance(d, ToolCallDelta)]
    first, second = ctx.ending.tool_calls
    assert first.id == long_id[:openrouter_module.MAX_TOOL_CALL_ID_CHARS]
    assert first.name == ("get\ufffdtime" + "e" * 1000)[:openrouter_module.MAX_TOOL_NAME_CHARS]
    assert first.arguments == '{"a": "\ufffdx\U0001f600"}'
    assert second.id == "\ufffd" and second.arguments == '{"k\ufffd": ["\ufffd"]}\ufffd'
    # The pieces still add up to the calls, and nothing unstorable was handed out.
    assert assembled(received) == {0: (first.id, first.name, first.arguments),
                                   1: (second.id, second.name, second.arguments)}
    for delta in deltas:
        for text in (delta.id or "", delta.name or "", delta.arguments):
            assert "\x00" not in text and not any("\ud800" <= ch <= "\udfff" for ch in text)


async def test_too_many_streamed_calls_are_dropped(gateway: OpenRouterGateway,
                                                   fake_openrouter: FakeOpenRouter) -> None:
    limit = openrouter_module.MAX_TOOL_CALLS_PER_ROUND
    fragments = [{"index": i, "id": f"c{i}", "function": {"name": "t", "arguments": "{}"}} for i in range(limit + 50)]
    received, ctx = await stream_tool_events(
        gateway, fake_openrouter, tool_event(*fragments),
        tool_event({"function": {"arguments": "more"}}),  # continues a dropped call: dropped too
        tool_event({"index": 0, "function": {"arguments": " "}}))
    assert len(ctx.ending.tool_calls) == limit
    assert [call.id for call in ctx.ending.tool_calls] == [f"c{i}" for i in range(limit)]
    assert ctx.ending.tool_calls[0].arguments == "{} "
    assert max(d.index for d in received if isinstance(d, ToolCallDelta)) == limit - 1


async def test_too_large_streamed_arguments_fail_the_stream(gateway: OpenRouterGateway, fake_openrouter: FakeOpenRouter,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(openrouter_module, "MAX_TOOL_ARGUMENTS_CHARS", 100)
    fake_openrouter.enqueue(fake_openrouter.raw_stream([
        tool_event({"index": 0, "id": "a", "function": {"name": "t", "arguments": "x" * 60}}),
        tool_event({"index": 1, "id": "b", "function": {"name": "t", "arguments": "y" * 60}}),
        FINISH_TOOL_CALLS, DONE]))
    ctx = await gateway.stream(model="m", messages=MESSAGES, max_tokens=64, client_tools=[TIME_TOOL])
    received = []
    with pytest.raises(UpstreamError, match="too large"):
        async for item in ctx.chunks:
            received.append(item)
    assert received == [ToolCallDelta(0, "a", "t", "x" * 60)]
    assert ctx.ending.status == "error" and ctx.record.error.endswith("too large")


async def test_an_error_chunk_after_tool_fragments(gateway: OpenRouterGateway, fake_openrouter: FakeOpenRouter) -> None:
    fake_openrouter.enqueue(fake_openrouter.raw_stream([
        tool_event({"index": 0, "id": "a", "function": {"name": "t", "arguments": '{"x":'}}),
        sse_data({"error": {"code": "server_error", "message": "Provider disconnected"},
                  "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "error"}]})]))
    ctx = await gateway.stream(model="m", messages=MESSAGES, max_tokens=64, client_tools=[TIME_TOOL])
    with pytest.raises(UpstreamError, match="Provider disconnected"):
        await items(ctx)
    assert ctx.ending.status == "error" and ctx.ending.tool_calls == [ToolCall("a", "t", '{"x":')]


# -- the fake upstream's tool-call stream ------------------------------------------------------


def test_sse_tool_calls_writes_openrouter_chunks() -> None:
    reply = sse_tool_calls([("get_weather", {"city": "Paris"})], split=3, usage=(20, 9), comments=False)
    events = [json.loads(write[len(b"data: "):]) for write in reply.writes if write != DONE]
    deltas = [event["choices"][0]["delta"] for event in events if event["choices"]]
    fragments = [fragment for delta in deltas for fragment in delta.get("tool_calls", [])]
    assert fragments[0] == {"index": 0, "id": tool_call("get_weather", {"city": "Paris"})["id"], "type": "function",
                            "function": {"name": "get_weather", "arguments": ""}}
    assert "".join(f["function"]["arguments"] for f in fragments) == '{"city": "Paris"}'
    assert len(fragments) == 4 and all(set(f) == {"index", "function"} for f in fragments[1:])
    assert events[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 9
    assert reply.writes[-1] == DONE
    assert reply.generation is not None and len(reply.generation.piece_writes) == 4
    assert reply.generation.prompt_tokens == 20


# -- FakeGateway -------------------------------------------------------------------------------


async def test_fake_gateway_honours_stop_and_ignores_the_rest() -> None:
    fake = FakeGateway(chunk_delay_seconds=0)
    messages = [{"role": "user", "content": "Tell me a joke"}]
    plain = await fake.generate(model="fake/echo", messages=messages, max_tokens=1000)
    result = await fake.generate(model="fake/echo", messages=messages, max_tokens=1000,
                                 params={"stop": ["joke", "Pantheon"], "temperature": 2, "model": "fake/error"})
    assert result.content == "You said: Tell me a " and result.finish_reason == "stop"
    assert result.usage.completion_tokens < plain.usage.completion_tokens
    ctx = await fake.stream(model="fake/echo", messages=messages, max_tokens=1000, params={"stop": "answer"})
    assert "".join(await items(ctx)) == "You said: Tell me a joke. This "
    assert ctx.ending.finish_reason == "stop"
    for stop in (None, [], "", [5, None], {"a": 1}):  # nothing to stop at
        result = await fake.generate(model="fake/echo", messages=messages, max_tokens=1000, params={"stop": stop})
        assert result.content == plain.content


async def test_fake_gateway_answers_text_to_client_tools() -> None:
    fake = FakeGateway(chunk_delay_seconds=0)
    result = await fake.generate(model="fake/echo", messages=ROUND_TRIP, max_tokens=1000, client_tools=[WEATHER_TOOL],
                                 params={"tool_choice": "required"})
    assert result.content.startswith("You said: Weather in Paris?") and result.tool_calls == []
    assert result.finish_reason == "stop" and result.tool_messages == []
    ctx = await fake.stream(model="fake/echo", messages=MESSAGES, max_tokens=1000, client_tools=[WEATHER_TOOL])
    received = await items(ctx)
    assert received and all(type(item) is str for item in received)
    assert ctx.ending.tool_calls == [] and ctx.ending.finish_reason == "stop"
    executor, _ = recording_executor()
    with pytest.raises(ValueError):
        await fake.generate(model="fake/echo", messages=MESSAGES, max_tokens=10, tool_executor=executor,
                            tools=[WEATHER_TOOL], client_tools=[WEATHER_TOOL])


async def test_concurrent_tool_streams_do_not_mix(gateway: OpenRouterGateway, fake_openrouter: FakeOpenRouter) -> None:
    def choose(request: Any) -> Any:
        city = request.body["messages"][-1]["content"]
        return sse_tool_calls([("get_weather", {"city": city}, f"call_{city}")], split=4, delay=0.01)

    fake_openrouter.reply_with(choose)

    async def one(city: str) -> list[ToolCall]:
        ctx = await gateway.stream(model="m", messages=[{"role": "user", "content": city}], max_tokens=64,
                                   client_tools=[WEATHER_TOOL])
        await items(ctx)
        return ctx.ending.tool_calls

    cities = ["Paris", "Oslo", "Rome", "Lima", "Cairo"]
    results = await asyncio.gather(*(one(city) for city in cities))
    assert results == [[ToolCall(f"call_{c}", "get_weather", json.dumps({"city": c}))] for c in cities]
