"""Provider cost reconciliation in the gateway (SPEC section 13): the generation id and the
provider's cost on every CallRecord, and `generation()`, against the loopback fake upstream."""

from __future__ import annotations

import asyncio
import socket
from decimal import Decimal
from typing import Any

import pytest
from asgiref.sync import async_to_sync

from llm_gateway import (
    FakeGateway,
    Generation,
    GenerationNotFound,
    OpenRouterGateway,
    UpstreamError,
    UpstreamTimeout,
    Usage,
)
from tests.fake_openrouter import FakeOpenRouter, JsonReply, completion, http_error, raw_json, sse_data
from tests.llm_gateway.helpers import collect

MESSAGES = [{"role": "user", "content": "Hi there"}]
# The fake's default price: 1e-6 credits per prompt token, 2e-6 per completion token.
PROMPT_PRICE, COMPLETION_PRICE = Decimal("0.000001"), Decimal("0.000002")


def fake_cost(prompt: int, completion_tokens: int) -> Decimal:
    return prompt * PROMPT_PRICE + completion_tokens * COMPLETION_PRICE


def chunk(content: str = "", **fields: Any) -> bytes:
    return sse_data({"choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}], **fields})


DONE = b"data: [DONE]\n\n"


# -- the ids and costs on the records ----------------------------------------------------


async def test_streamed_call_records_the_chunk_id_and_the_cost(gateway: OpenRouterGateway,
                                                               fake_openrouter: FakeOpenRouter) -> None:
    fake_openrouter.enqueue(fake_openrouter.sse_stream(["a", "b"], usage=(12, 2)))
    ctx = await gateway.stream(model="m", messages=MESSAGES, max_tokens=8)
    assert await collect(ctx) == ["a", "b"]
    [generation_id] = fake_openrouter.generation_ids
    assert generation_id.startswith("gen-fake-")
    assert fake_openrouter.requests[0].generation_id == generation_id
    assert ctx.record.generation_id == generation_id
    assert ctx.record.provider_cost == Decimal("0.000100")  # the scripted usage.cost, 0.0001
    assert ctx.record.status == "ok"


async def test_non_streamed_call_records_the_body_id_and_the_cost(gateway: OpenRouterGateway,
                                                                  fake_openrouter: FakeOpenRouter) -> None:
    usage = {"prompt_tokens": 1077, "completion_tokens": 66, "cost": 0.00012195}
    fake_openrouter.enqueue(completion("Hi", usage=usage))
    result = await gateway.generate(model="m", messages=MESSAGES, max_tokens=8)
    [record] = result.records
    assert record.generation_id == fake_openrouter.generation_ids[0]
    assert record.provider_cost == Decimal("0.000122")  # 6 places, half up


async def test_every_reply_has_its_own_id(gateway: OpenRouterGateway, fake_openrouter: FakeOpenRouter) -> None:
    first = await gateway.generate(model="m", messages=MESSAGES, max_tokens=8)
    ctx = await gateway.stream(model="m", messages=MESSAGES, max_tokens=8)
    await collect(ctx)
    second = await gateway.generate(model="m", messages=MESSAGES, max_tokens=8)
    ids = [first.records[0].generation_id, ctx.record.generation_id, second.records[0].generation_id]
    assert ids == fake_openrouter.generation_ids and len(set(ids)) == 3


async def test_tool_rounds_each_have_their_id(gateway: OpenRouterGateway, fake_openrouter: FakeOpenRouter) -> None:
    call = fake_openrouter.tool_call("file_read", {"file_id": "f"}, id="call_1")
    fake_openrouter.enqueue(completion(None, tool_calls=[call]), completion("done"))

    async def executor(name: str, arguments: dict[str, Any]) -> str:
        return "contents"

    tool = {"type": "function", "function": {"name": "file_read", "parameters": {"type": "object"}}}
    result = await gateway.generate(model="m", messages=MESSAGES, max_tokens=8, tools=[tool],
                                    tool_executor=executor)
    assert [r.generation_id for r in result.records] == fake_openrouter.generation_ids
    assert len(set(fake_openrouter.generation_ids)) == 2


async def test_header_id_when_the_chunks_carry_none(gateway: OpenRouterGateway,
                                                    fake_openrouter: FakeOpenRouter) -> None:
    fake_openrouter.enqueue(fake_openrouter.sse_stream(["a"], chunk_ids=False),
                            completion("b", body_id=False))
    ctx = await gateway.stream(model="m", messages=MESSAGES, max_tokens=8)
    await collect(ctx)
    result = await gateway.generate(model="m", messages=MESSAGES, max_tokens=8)
    assert [ctx.record.generation_id, result.records[0].generation_id] == fake_openrouter.generation_ids


async def test_the_chunk_id_wins_over_the_header(gateway: OpenRouterGateway, fake_openrouter: FakeOpenRouter) -> None:
    # Ids that are no non-empty string are skipped; the first real one counts.
    writes = [chunk(id=123), chunk("a", id=""), chunk("b", id="gen-chunk"), chunk("c", id="gen-other"), DONE]
    fake_openrouter.enqueue(fake_openrouter.raw_stream(writes, headers={"X-Generation-Id": "gen-header"}))
    ctx = await gateway.stream(model="m", messages=MESSAGES, max_tokens=8)
    assert await collect(ctx) == ["a", "b", "c"]
    assert ctx.record.generation_id == "gen-chunk"

    fake_openrouter.enqueue(fake_openrouter.raw_json(
        b'{"id": "gen-body", "choices": [{"message": {"content": "x"}}]}', headers={"X-Generation-Id": "gen-h"}))
    result = await gateway.generate(model="m", messages=MESSAGES, max_tokens=8)
    assert result.records[0].generation_id == "gen-body"


async def test_no_id_anywhere(gateway: OpenRouterGateway, fake_openrouter: FakeOpenRouter) -> None:
    fake_openrouter.enqueue(fake_openrouter.raw_stream([chunk("a"), DONE]))
    ctx = await gateway.stream(model="m", messages=MESSAGES, max_tokens=8)
    await collect(ctx)
    assert ctx.record.generation_id == "" and ctx.record.provider_cost is None
    assert fake_openrouter.generation_ids == []


async def test_hostile_ids_are_cleaned_and_cut(gateway: OpenRouterGateway, fake_openrouter: FakeOpenRouter) -> None:
    fake_openrouter.enqueue(fake_openrouter.raw_stream([chunk("a", id="gen\x00" + "x" * 500), DONE]))
    ctx = await gateway.stream(model="m", messages=MESSAGES, max_tokens=8)
    await collect(ctx)
    assert ctx.record.generation_id == "gen\ufffd" + "x" * 196

    fake_openrouter.enqueue(fake_openrouter.raw_json(b'{"id": "\\ud800", "choices": [{"message": {}}]}',
                                                     headers={"X-Generation-Id": "h" * 300}))
    result = await gateway.generate(model="m", messages=MESSAGES, max_tokens=8)
    assert result.records[0].generation_id == "\ufffd"

    fake_openrouter.enqueue(fake_openrouter.raw_json(b'{"id": 5, "choices": [{"message": {}}]}',
                                                     headers={"X-Generation-Id": "h" * 300}))
    result = await gateway.generate(model="m", messages=MESSAGES, max_tokens=8)
    assert result.records[0].generation_id == "h" * 200


async def test_the_json_answer_to_a_stream_request(gateway: OpenRouterGateway, fake_openrouter: FakeOpenRouter) -> None:
    fake_openrouter.enqueue(completion("All at once", usage={"prompt_tokens": 3, "completion_tokens": 2,
                                                             "cost": "0.25"}))
    ctx = await gateway.stream(model="m", messages=MESSAGES, max_tokens=8)
    assert await collect(ctx) == ["All at once"]
    assert ctx.record.generation_id == fake_openrouter.generation_ids[0]
    assert ctx.record.provider_cost == Decimal("0.250000")


@pytest.mark.parametrize("usage", [None, {"prompt_tokens": 3, "completion_tokens": 2}])
async def test_cost_absent(gateway: OpenRouterGateway, fake_openrouter: FakeOpenRouter, usage: Any) -> None:
    fake_openrouter.enqueue(fake_openrouter.sse_stream(["a"], usage=usage), completion("b", usage=usage))
    ctx = await gateway.stream(model="m", messages=MESSAGES, max_tokens=8)
    await collect(ctx)
    result = await gateway.generate(model="m", messages=MESSAGES, max_tokens=8)
    assert ctx.record.provider_cost is None and result.records[0].provider_cost is None
    assert ctx.record.generation_id and result.records[0].generation_id


HOSTILE_COSTS = ["NaN", "nan", "-nan", "sNaN", "Infinity", "-inf", float("nan"), float("inf"), float("-inf"),
                 -0.5, -1, "-0.01", True, False, 1e10, 10**9 + 1, 10**4000, "1e400", "1" * 100, "", "abc",
                 "0x10", "1,5", [], {}, None, [0.1], {"total": 0.1}]


@pytest.mark.parametrize("cost", HOSTILE_COSTS)
async def test_hostile_costs_are_ignored(gateway: OpenRouterGateway,
                                         fake_openrouter: FakeOpenRouter, cost: Any) -> None:
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "cost": cost}
    fake_openrouter.enqueue(completion("b", usage=usage), fake_openrouter.sse_stream(["a"], usage=usage))
    result = await gateway.generate(model="m", messages=MESSAGES, max_tokens=8)
    ctx = await gateway.stream(model="m", messages=MESSAGES, max_tokens=8)
    assert await collect(ctx) == ["a"]
    assert result.records[0].provider_cost is None and ctx.record.provider_cost is None
    # The rest of the answer is still taken.
    assert result.usage == ctx.ending.usage == Usage(3, 2)


@pytest.mark.parametrize(("cost", "expected"), [
    (0, "0.000000"), (0.0, "0.000000"), (-0.0, "0.000000"), (3, "3.000000"), (1e-9, "0.000000"),
    (0.0000005, "0.000001"), (0.1, "0.100000"), (" 0.5 ", "0.500000"), ("2E-3", "0.002000"),
    (1e9, "1000000000.000000"), (10**9, "1000000000.000000"),
])
async def test_sane_costs(gateway: OpenRouterGateway,
                          fake_openrouter: FakeOpenRouter, cost: Any, expected: str) -> None:
    fake_openrouter.enqueue(completion("b", usage={"prompt_tokens": 3, "completion_tokens": 2, "cost": cost}))
    result = await gateway.generate(model="m", messages=MESSAGES, max_tokens=8)
    assert result.records[0].provider_cost == Decimal(expected)
    assert str(result.records[0].provider_cost) == expected


async def test_the_last_reported_cost_counts(gateway: OpenRouterGateway, fake_openrouter: FakeOpenRouter) -> None:
    writes = [chunk("a", id="g"), chunk(usage={"prompt_tokens": 1, "completion_tokens": 1, "cost": 0.1}),
              chunk(usage={"prompt_tokens": 2, "completion_tokens": 2, "cost": 0.2}),
              chunk(usage={"prompt_tokens": 3, "completion_tokens": 3}), DONE]
    fake_openrouter.enqueue(fake_openrouter.raw_stream(writes))
    ctx = await gateway.stream(model="m", messages=MESSAGES, max_tokens=8)
    await collect(ctx)
    assert ctx.record.provider_cost == Decimal("0.200000")
    assert ctx.record.usage == Usage(3, 3)


# -- failures after a 2xx keep the id ------------------------------------------------------


async def test_error_chunk_after_some_pieces_keeps_the_id_and_its_cost(gateway: OpenRouterGateway,
                                                                      fake_openrouter: FakeOpenRouter) -> None:
    fake_openrouter.enqueue(fake_openrouter.sse_stream(["one ", "two ", "three"], error_after=2,
                                                       error_usage={"prompt_tokens": 9, "completion_tokens": 2,
                                                                    "cost": 0.003}))
    ctx = await gateway.stream(model="m", messages=MESSAGES, max_tokens=8)
    with pytest.raises(UpstreamError) as info:
        await collect(ctx)
    assert ctx.record.status == "error"
    assert ctx.record.generation_id == fake_openrouter.generation_ids[0]
    assert ctx.record.provider_cost == Decimal("0.003000")
    assert info.value.records[-1].generation_id == ctx.record.generation_id


async def test_truncated_stream_keeps_the_id(gateway: OpenRouterGateway, fake_openrouter: FakeOpenRouter) -> None:
    fake_openrouter.enqueue(fake_openrouter.sse_stream(["a", "b"], done=False, usage=None, drop_connection=True))
    ctx = await gateway.stream(model="m", messages=MESSAGES, max_tokens=8)
    with pytest.raises(UpstreamError, match="truncated"):
        await collect(ctx)
    assert (ctx.record.status, ctx.record.generation_id) == ("error", fake_openrouter.generation_ids[0])
    assert ctx.record.provider_cost is None


async def test_error_answer_with_status_200_keeps_the_id(gateway: OpenRouterGateway,
                                                         fake_openrouter: FakeOpenRouter) -> None:
    fake_openrouter.enqueue(completion(extra={"error": {"code": 502, "message": "Provider returned error"},
                                              "choices": []}),
                            fake_openrouter.raw_json(b"not json", headers={"X-Generation-Id": "gen-h"}))
    with pytest.raises(UpstreamError) as info:
        await gateway.generate(model="m", messages=MESSAGES, max_tokens=8)
    [record] = info.value.records
    assert record.status == "error" and record.generation_id == fake_openrouter.generation_ids[0]
    assert record.provider_cost == Decimal("0.000100")
    with pytest.raises(UpstreamError, match="invalid JSON") as info:
        await gateway.generate(model="m", messages=MESSAGES, max_tokens=8)
    assert info.value.records[0].generation_id == "gen-h"


async def test_http_errors_have_no_id(gateway: OpenRouterGateway, fake_openrouter: FakeOpenRouter) -> None:
    fake_openrouter.enqueue(http_error(503, retry_after=0), fake_openrouter.sse_stream(["ok"]))
    ctx = await gateway.stream(model="m", messages=MESSAGES, max_tokens=8)
    await collect(ctx)
    assert [r.generation_id for r in ctx.records] == ["", "gen-fake-1"]
    assert fake_openrouter.generation_ids == ["gen-fake-1"]


async def test_aclose_mid_stream_keeps_the_id_and_the_provider_counts_what_was_sent(
        gateway: OpenRouterGateway, fake_openrouter: FakeOpenRouter) -> None:
    # Slow enough that the 4th piece is never written before the server sees the close.
    fake_openrouter.enqueue(fake_openrouter.slow_stream(50, delay=0.3, usage=(21, 50)))
    ctx = await gateway.stream(model="m", messages=MESSAGES, max_tokens=8)
    received = []
    async for delta in ctx.chunks:
        received.append(delta)
        if len(received) == 3:
            break
    await ctx.aclose()
    [generation_id] = fake_openrouter.generation_ids
    assert (ctx.record.status, ctx.record.generation_id) == ("cancelled", generation_id)
    assert ctx.record.provider_cost is None and ctx.ending.usage is None

    assert await asyncio.to_thread(fake_openrouter.wait_for_generation, generation_id)
    found = await gateway.generation(generation_id)
    assert found == Generation(id=generation_id, prompt_tokens=21, completion_tokens=3,
                               total_cost=fake_cost(21, 3), cancelled=True)
    assert found.has_counts


async def test_aclose_before_reading_keeps_the_header_id(gateway: OpenRouterGateway,
                                                         fake_openrouter: FakeOpenRouter) -> None:
    fake_openrouter.enqueue(fake_openrouter.slow_stream(50, delay=0.2, usage=None))
    ctx = await gateway.stream(model="m", messages=MESSAGES, max_tokens=8)
    await ctx.aclose()
    [generation_id] = fake_openrouter.generation_ids
    assert (ctx.record.status, ctx.record.generation_id) == ("cancelled", generation_id)
    assert await asyncio.to_thread(fake_openrouter.wait_for_generation, generation_id)
    found = await gateway.generation(generation_id)
    # The fake's default prompt count; nothing was written past the opening chunks.
    assert (found.prompt_tokens, found.completion_tokens, found.cancelled) == (10, 0, True)


async def test_cancelled_reader_keeps_the_id(gateway: OpenRouterGateway, fake_openrouter: FakeOpenRouter) -> None:
    fake_openrouter.enqueue(fake_openrouter.slow_stream(50, delay=0.05))
    ctx = await gateway.stream(model="m", messages=MESSAGES, max_tokens=8)
    task = asyncio.create_task(collect(ctx))
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (ctx.record.status, ctx.record.generation_id) == ("cancelled", fake_openrouter.generation_ids[0])


# -- generation() ----------------------------------------------------------------------------


async def test_generation_of_a_finished_stream(gateway: OpenRouterGateway, fake_openrouter: FakeOpenRouter) -> None:
    pieces = ["Hel", "lo", " there", "!"]
    fake_openrouter.enqueue(fake_openrouter.sse_stream(pieces, usage=(12, 99)))
    ctx = await gateway.stream(model="m", messages=MESSAGES, max_tokens=8)
    await collect(ctx)
    generation_id = ctx.record.generation_id
    assert await asyncio.to_thread(fake_openrouter.wait_for_generation, generation_id)
    found = await gateway.generation(generation_id)
    # The fake counts 1 completion token per piece it wrote.
    assert found == Generation(id=generation_id, prompt_tokens=12, completion_tokens=len(pieces),
                               total_cost=fake_cost(12, 4), cancelled=False)
    request = fake_openrouter.last_request
    assert (request.method, request.path) == ("GET", f"/api/v1/generation?id={generation_id}")
    assert request.headers["authorization"] == "Bearer test-key"
    assert request.headers["http-referer"] == "https://pantheon.test"
    assert request.headers["x-openrouter-title"] == "Pantheon Test"
    assert fake_openrouter.generation_lookups(generation_id) == 1


async def test_generation_of_a_stream_cut_by_an_error(gateway: OpenRouterGateway,
                                                      fake_openrouter: FakeOpenRouter) -> None:
    fake_openrouter.enqueue(fake_openrouter.sse_stream(["a", "b", "c", "d"], error_after=3, usage=None))
    ctx = await gateway.stream(model="m", messages=MESSAGES, max_tokens=8)
    with pytest.raises(UpstreamError):
        await collect(ctx)
    assert await asyncio.to_thread(fake_openrouter.wait_for_generation, ctx.record.generation_id)
    found = await gateway.generation(ctx.record.generation_id)
    assert (found.prompt_tokens, found.completion_tokens, found.cancelled) == (10, 3, False)


@pytest.mark.parametrize(("usage", "counts"), [((40, 7), (40, 7)), (None, (10, 3))])
async def test_generation_of_a_completion(gateway: OpenRouterGateway, fake_openrouter: FakeOpenRouter,
                                          usage: Any, counts: tuple[int, int]) -> None:
    fake_openrouter.enqueue(completion("three little words", usage=usage))
    result = await gateway.generate(model="m", messages=MESSAGES, max_tokens=8)
    generation_id = result.records[0].generation_id
    assert await asyncio.to_thread(fake_openrouter.wait_for_generation, generation_id)
    found = await gateway.generation(generation_id)
    assert (found.prompt_tokens, found.completion_tokens) == counts
    assert found.total_cost == fake_cost(*counts) and found.cancelled is False


async def test_generation_price_is_configurable(gateway: OpenRouterGateway, fake_openrouter: FakeOpenRouter) -> None:
    fake_openrouter.generation_price = (0.5, 1.25)
    result = await gateway.generate(model="m", messages=MESSAGES, max_tokens=8)
    generation_id = result.records[0].generation_id
    assert await asyncio.to_thread(fake_openrouter.wait_for_generation, generation_id)
    found = await gateway.generation(generation_id)
    assert found.total_cost == Decimal("11.250000")  # 10 * 0.5 + 5 * 1.25


async def test_unknown_generation_is_not_found(gateway: OpenRouterGateway, fake_openrouter: FakeOpenRouter) -> None:
    with pytest.raises(GenerationNotFound) as info:
        await gateway.generation("gen-nope")
    assert info.value.code == "generation_not_found"
    assert fake_openrouter.last_request.path == "/api/v1/generation?id=gen-nope"
    with pytest.raises(GenerationNotFound):
        await gateway.generation("")  # nothing to ask
    assert len(fake_openrouter.requests) == 1


async def test_generation_lag_then_the_record(gateway: OpenRouterGateway, fake_openrouter: FakeOpenRouter) -> None:
    fake_openrouter.generation_lag = 2
    result = await gateway.generate(model="m", messages=MESSAGES, max_tokens=8)
    generation_id = result.records[0].generation_id
    assert await asyncio.to_thread(fake_openrouter.wait_for_generation, generation_id)
    for _ in range(2):
        with pytest.raises(GenerationNotFound):
            await gateway.generation(generation_id)
    found = await gateway.generation(generation_id)
    assert (found.prompt_tokens, found.completion_tokens) == (10, 5)
    assert fake_openrouter.generation_lookups(generation_id) == 3


async def test_id_with_odd_characters_is_sent_encoded(gateway: OpenRouterGateway,
                                                      fake_openrouter: FakeOpenRouter) -> None:
    odd = "gen/1 & 2?x=é"
    fake_openrouter.generations[odd] = {"id": odd, "native_tokens_prompt": 1, "native_tokens_completion": 2}
    found = await gateway.generation(odd)
    assert (found.id, found.prompt_tokens, found.completion_tokens) == (odd, 1, 2)


@pytest.mark.parametrize(("data", "expected"), [
    # native counts first, then the normalized ones; never a mix unless neither pair is whole
    ({"native_tokens_prompt": 5, "native_tokens_completion": 6, "tokens_prompt": 7, "tokens_completion": 8},
     (5, 6)),
    ({"native_tokens_prompt": 5, "tokens_prompt": 7, "tokens_completion": 8}, (7, 8)),
    ({"tokens_prompt": "7", "tokens_completion": 8.2}, (7, 9)),
    ({"native_tokens_prompt": 5, "tokens_completion": 8}, (5, 8)),
    ({"native_tokens_prompt": None, "native_tokens_completion": "x", "tokens_prompt": True}, (None, None)),
    ({"native_tokens_prompt": 2**40, "native_tokens_completion": -3}, ((2**31 - 1) // 2, 0)),
    ({"id": "g"}, (None, None)),
])
async def test_generation_counts(gateway: OpenRouterGateway, fake_openrouter: FakeOpenRouter, data: dict[str, Any],
                                 expected: tuple[int | None, int | None]) -> None:
    fake_openrouter.generations["g"] = data
    found = await gateway.generation("g")
    assert (found.prompt_tokens, found.completion_tokens) == expected
    assert found.has_counts == (None not in expected)
    assert found.total_cost is None and found.cancelled is False


@pytest.mark.parametrize(("fields", "cost", "cancelled"), [
    ({"total_cost": 0.0012345, "cancelled": True}, Decimal("0.001235"), True),
    ({"total_cost": "0.5", "cancelled": "true"}, Decimal("0.500000"), False),
    ({"total_cost": "NaN", "cancelled": 1}, None, False),
    ({"total_cost": -1, "cancelled": None}, None, False),
    ({"total_cost": True}, None, False),
    ({"total_cost": 1e12}, None, False),
])
async def test_generation_cost_and_cancelled(gateway: OpenRouterGateway, fake_openrouter: FakeOpenRouter,
                                             fields: dict[str, Any], cost: Decimal | None, cancelled: bool) -> None:
    fake_openrouter.generations["g"] = {"native_tokens_prompt": 1, "native_tokens_completion": 1, **fields}
    found = await gateway.generation("g")
    assert (found.total_cost, found.cancelled) == (cost, cancelled)


async def test_generation_server_error(gateway: OpenRouterGateway, fake_openrouter: FakeOpenRouter) -> None:
    fake_openrouter.generations["g"] = http_error(500, "database on fire")
    with pytest.raises(UpstreamError) as info:
        await gateway.generation("g")
    assert info.value.status == 500 and "database on fire" in info.value.message
    assert len(fake_openrouter.requests) == 1  # no retries: the caller retries

    fake_openrouter.generations["g"] = http_error(429, retry_after=0)
    with pytest.raises(UpstreamError) as info:
        await gateway.generation("g")
    assert info.value.status == 429 and not isinstance(info.value, GenerationNotFound)


@pytest.mark.parametrize("body", [b"not json", b"", b"[1, 2]", b'{"data": null}', b'{"data": [1]}',
                                  b'{"error": "x"}', b"\xff\xfe{", b"[" * 100_000])
async def test_generation_invalid_body(gateway: OpenRouterGateway,
                                       fake_openrouter: FakeOpenRouter, body: bytes) -> None:
    fake_openrouter.generations["g"] = raw_json(body)
    with pytest.raises(UpstreamError):
        await gateway.generation("g")


async def test_generation_body_too_large(gateway: OpenRouterGateway, fake_openrouter: FakeOpenRouter) -> None:
    fake_openrouter.generations["g"] = raw_json(b'{"data": {"x": "' + b"a" * (2 * 1024 * 1024) + b'"}}')
    with pytest.raises(UpstreamError, match="too large"):
        await gateway.generation("g")


async def test_generation_timeout(fake_openrouter: FakeOpenRouter) -> None:
    gateway = OpenRouterGateway(base_url=fake_openrouter.base_url, api_key="k", timeout_seconds=0.3)
    fake_openrouter.generations["g"] = JsonReply(body={"data": {}}, delay=2.0)
    with pytest.raises(UpstreamTimeout):
        await gateway.generation("g")


async def test_generation_connection_refused() -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    gateway = OpenRouterGateway(base_url=f"http://127.0.0.1:{port}/api/v1", api_key="k", timeout_seconds=2)
    with pytest.raises(UpstreamError) as info:
        await gateway.generation("g")
    assert not isinstance(info.value, GenerationNotFound)


def test_generation_from_fresh_event_loops(fake_openrouter: FakeOpenRouter) -> None:
    # As the background worker calls it: async_to_sync, a new event loop each time.
    gateway = OpenRouterGateway(base_url=fake_openrouter.base_url, api_key="k", timeout_seconds=5)
    fake_openrouter.generations["g"] = {"native_tokens_prompt": 4, "native_tokens_completion": 2,
                                        "total_cost": 0.01}
    for _ in range(3):
        found = async_to_sync(gateway.generation)("g")
        assert (found.prompt_tokens, found.completion_tokens, found.total_cost) == (4, 2, Decimal("0.010000"))


async def test_fake_gateway_keeps_no_generations() -> None:
    with pytest.raises(GenerationNotFound):
        await FakeGateway().generation("gen-1")
    ctx = await FakeGateway(chunk_delay_seconds=0).stream(model="fake/echo", messages=MESSAGES, max_tokens=64)
    await collect(ctx)
    assert ctx.record.generation_id == "" and ctx.record.provider_cost is None


# -- the fake's registry -----------------------------------------------------------------


async def test_a_scripted_record_is_not_overwritten(gateway: OpenRouterGateway,
                                                    fake_openrouter: FakeOpenRouter) -> None:
    fake_openrouter.generations["gen-fake-1"] = {"native_tokens_prompt": 1, "native_tokens_completion": 1}
    result = await gateway.generate(model="m", messages=MESSAGES, max_tokens=8)
    assert result.records[0].generation_id == "gen-fake-1"
    assert await asyncio.to_thread(fake_openrouter.wait_for_generation, "gen-fake-1")
    found = await gateway.generation("gen-fake-1")
    assert (found.prompt_tokens, found.completion_tokens) == (1, 1)
    del fake_openrouter.generations["gen-fake-1"]
    with pytest.raises(GenerationNotFound):
        await gateway.generation("gen-fake-1")


async def test_the_fake_serves_the_record_shape(gateway: OpenRouterGateway, fake_openrouter: FakeOpenRouter) -> None:
    await gateway.generate(model="m", messages=MESSAGES, max_tokens=8)
    assert await asyncio.to_thread(fake_openrouter.wait_for_generation, "gen-fake-1")
    assert fake_openrouter.generations["gen-fake-1"] == {
        "id": "gen-fake-1", "model": fake_openrouter.DEFAULT_MODEL, "streamed": False,
        "native_tokens_prompt": 10, "native_tokens_completion": 5, "tokens_prompt": 10, "tokens_completion": 5,
        "total_cost": pytest.approx(0.00002), "cancelled": False,
    }
