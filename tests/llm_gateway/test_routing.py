"""llm_gateway.routing: fallbacks over candidate models and cooldowns (SPEC section 15).

The in-process FakeGateway (`upstream=None`, its failure models fake/error, fake/timeout,
fake/error-mid) and two loopback fake OpenRouters (tests/fake_openrouter.py) as two providers.
Every test passes a fresh `Cooldowns()`, so the process-wide `COOLDOWNS` is never touched.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from llm_gateway import (
    FakeGateway,
    GatewayError,
    GenerationNotFound,
    Upstream,
    UpstreamError,
    UpstreamTimeout,
    routing,
)
from llm_gateway.openrouter import aclose_shared_client
from llm_gateway.routing import Candidate, Cooldowns, falls_back
from tests.fake_openrouter import FakeOpenRouter, http_error, raw_stream, sse_data
from tests.llm_gateway.helpers import collect

MESSAGES = [{"role": "user", "content": "Hi there"}]
REPLY = FakeGateway.reply_for(MESSAGES)
FILE_ID = "3f2b8c1e-4d5a-4b6c-9e7f-0a1b2c3d4e5f"
FILE_READ_TOOL = {"type": "function", "function": {
    "name": "file_read", "description": "Read a file",
    "parameters": {"type": "object", "properties": {"file_id": {"type": "string"}}, "required": ["file_id"]}}}

# Catalogue names differ from the ids sent, so labels can be told from what the provider saw.
BROKEN = Candidate(model="cat/broken", upstream=None, upstream_model="fake/error")
TIMEOUT = Candidate(model="cat/slow", upstream=None, upstream_model="fake/timeout")
MID = Candidate(model="cat/mid", upstream=None, upstream_model="fake/error-mid")
ECHO = Candidate(model="cat/echo", upstream=None, upstream_model="fake/echo")

KEYS = {"alpha": "key-alpha", "beta": "key-beta"}


def labels(records: list[Any]) -> list[tuple[str, str, str]]:
    return [(record.model, record.upstream, record.status) for record in records]


def on(server: FakeOpenRouter, name: str, *, timeout: float = 5) -> Upstream:
    return Upstream(name=name, base_url=server.base_url, api_key=KEYS[name], timeout_seconds=timeout)


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # nothing listens there once closed


@pytest.fixture
def cooldowns() -> Cooldowns:
    return Cooldowns()


@pytest.fixture
def fake_settings(settings: Any) -> Any:
    """The configured provider is the in-process fake, fast, one attempt per candidate."""
    settings.PANTHEON_LLM_PROVIDER = "fake"
    settings.PANTHEON_FAKE_CHUNK_DELAY_SECONDS = 0
    settings.PANTHEON_UPSTREAM_MAX_RETRIES = 0
    settings.PANTHEON_COOLDOWN_FAILURES = 100  # no cooldown unless a test asks for one
    return settings


@pytest.fixture
async def servers(fake_openrouter: FakeOpenRouter, fake_settings: Any) -> AsyncIterator[tuple[FakeOpenRouter,
                                                                                             FakeOpenRouter]]:
    """Two loopback providers, `alpha` and `beta`, each insisting on its own key."""
    with FakeOpenRouter() as beta:
        fake_openrouter.api_key, beta.api_key = KEYS["alpha"], KEYS["beta"]
        yield fake_openrouter, beta
        await aclose_shared_client()


# -- falls_back ----------------------------------------------------------------------------


def test_timeout_falls_back() -> None:
    assert falls_back(UpstreamTimeout("slow")) is True


@pytest.mark.parametrize("status", [401, 403, 404, 408, 429, 500, 502, 503, 599])
def test_provider_statuses_fall_back(status: int) -> None:
    assert falls_back(UpstreamError("no", status=status)) is True


@pytest.mark.parametrize("status", [400, 409, 422])
def test_request_faults_do_not_fall_back(status: int) -> None:
    assert falls_back(UpstreamError("no", status=status)) is False


def test_no_status_falls_back_only_when_unreachable() -> None:
    assert falls_back(UpstreamError("no connection", unreachable=True)) is True
    assert falls_back(UpstreamError("bad chunk")) is False


def test_other_gateway_errors_do_not_fall_back() -> None:
    assert falls_back(GatewayError("something")) is False
    assert falls_back(GenerationNotFound("none")) is False


# -- Cooldowns -----------------------------------------------------------------------------


def test_cooldown_starts_at_the_nth_consecutive_failure_per_model(cooldowns: Cooldowns) -> None:
    started: list[tuple[str, float]] = []
    cooldowns.listeners.append(lambda model, seconds: started.append((model, seconds)))

    assert cooldowns.failed("a", failures=3, seconds=60) is False
    assert cooldowns.failed("b", failures=3, seconds=60) is False
    assert cooldowns.failed("a", failures=3, seconds=60) is False
    assert cooldowns.failed("b", failures=3, seconds=60) is False
    assert not cooldowns.cooling("a") and not cooldowns.cooling("b") and started == []

    assert cooldowns.failed("a", failures=3, seconds=60) is True
    assert cooldowns.cooling("a") and not cooldowns.cooling("b")
    assert started == [("a", 60)]
    # The run starts again: the next failure does not start (nor announce) another cooldown.
    assert cooldowns.failed("a", failures=3, seconds=60) is False
    assert started == [("a", 60)]


def test_failures_below_one_count_as_one(cooldowns: Cooldowns) -> None:
    assert cooldowns.failed("a", failures=0, seconds=60) is True
    assert cooldowns.cooling("a")


def test_success_ends_the_run_and_the_cooldown(cooldowns: Cooldowns) -> None:
    cooldowns.failed("a", failures=3, seconds=60)
    cooldowns.failed("a", failures=3, seconds=60)
    cooldowns.succeeded("a")
    assert cooldowns.failed("a", failures=3, seconds=60) is False
    assert cooldowns.failed("a", failures=3, seconds=60) is False
    assert cooldowns.failed("a", failures=3, seconds=60) is True

    cooldowns.succeeded("a")
    assert not cooldowns.cooling("a") and cooldowns.cooling_now() == {}
    cooldowns.succeeded("never-failed")  # harmless


def test_cooldown_ends_after_its_seconds(cooldowns: Cooldowns) -> None:
    assert cooldowns.failed("a", failures=1, seconds=0.05) is True
    assert cooldowns.cooling("a")
    assert not cooldowns.cooling("a", now=time.monotonic() + 1)
    time.sleep(0.2)
    assert not cooldowns.cooling("a")
    assert cooldowns.cooling_now() == {}


def test_cooling_now_lists_only_cooling_models(cooldowns: Cooldowns) -> None:
    cooldowns.failed("hot", failures=1, seconds=60)
    cooldowns.failed("expired", failures=1, seconds=0.01)
    cooldowns.failed("counted", failures=3, seconds=60)
    time.sleep(0.05)
    cooling = cooldowns.cooling_now()
    assert list(cooling) == ["hot"]
    assert 0 < cooling["hot"] <= 60


def test_clear_forgets_cooldowns_and_runs(cooldowns: Cooldowns) -> None:
    cooldowns.failed("hot", failures=1, seconds=60)
    cooldowns.failed("counted", failures=2, seconds=60)
    cooldowns.clear()
    assert not cooldowns.cooling("hot") and cooldowns.cooling_now() == {}
    assert cooldowns.failed("counted", failures=2, seconds=60) is False  # its run started over


# -- generate, in-process fake -------------------------------------------------------------


async def test_generate_without_candidates_is_refused(fake_settings: Any, cooldowns: Cooldowns) -> None:
    with pytest.raises(ValueError):
        await routing.generate([], cooldowns=cooldowns, messages=MESSAGES, max_tokens=64)


@pytest.mark.parametrize("failing", [BROKEN, TIMEOUT], ids=["error", "timeout"])
async def test_generate_falls_back_to_the_next_candidate(fake_settings: Any, cooldowns: Cooldowns,
                                                         failing: Candidate) -> None:
    completion, chosen = await routing.generate([failing, ECHO], cooldowns=cooldowns, messages=MESSAGES,
                                                max_tokens=64)
    assert chosen == ECHO
    assert completion.content == REPLY
    assert labels(completion.records) == [(failing.model, "fake", "error"), ("cat/echo", "fake", "ok")]
    assert [record.requested_model for record in completion.records] == [failing.upstream_model, "fake/echo"]


async def test_generate_lone_failing_candidate_raises_its_error(fake_settings: Any, cooldowns: Cooldowns) -> None:
    with pytest.raises(UpstreamError) as info:
        await routing.generate([BROKEN], cooldowns=cooldowns, messages=MESSAGES, max_tokens=64)
    assert info.value.status == 502
    assert info.value.model == "cat/broken"
    assert labels(info.value.records) == [("cat/broken", "fake", "error")]


async def test_generate_all_failing_raises_the_last_error_with_every_record(fake_settings: Any,
                                                                            cooldowns: Cooldowns) -> None:
    with pytest.raises(UpstreamTimeout) as info:
        await routing.generate([BROKEN, TIMEOUT], cooldowns=cooldowns, messages=MESSAGES, max_tokens=64)
    assert info.value.model == "cat/slow"
    assert labels(info.value.records) == [("cat/broken", "fake", "error"), ("cat/slow", "fake", "error")]


async def test_generate_answered_tool_round_is_not_started_elsewhere(fake_settings: Any,
                                                                     cooldowns: Cooldowns) -> None:
    async def executor(name: str, arguments: dict[str, Any]) -> str:
        return "file text"

    messages = [{"role": "user", "content": f"Read {FILE_ID}"}]
    with pytest.raises(UpstreamError) as info:
        await routing.generate([MID, ECHO], cooldowns=cooldowns, messages=messages, max_tokens=64,
                               tools=[FILE_READ_TOOL], tool_executor=executor)
    assert info.value.model == "cat/mid"
    assert labels(info.value.records) == [("cat/mid", "fake", "ok"), ("cat/mid", "fake", "error")]


async def test_generate_skips_a_cooling_candidate(fake_settings: Any, cooldowns: Cooldowns) -> None:
    fake_settings.PANTHEON_COOLDOWN_FAILURES = 2
    started: list[tuple[str, float]] = []
    cooldowns.listeners.append(lambda model, seconds: started.append((model, seconds)))
    for _ in range(2):
        completion, _ = await routing.generate([BROKEN, ECHO], cooldowns=cooldowns, messages=MESSAGES,
                                               max_tokens=64)
        assert [record.model for record in completion.records] == ["cat/broken", "cat/echo"]
    assert cooldowns.cooling("cat/broken") and [model for model, _ in started] == ["cat/broken"]

    completion, chosen = await routing.generate([BROKEN, ECHO], cooldowns=cooldowns, messages=MESSAGES,
                                                max_tokens=64)
    assert chosen == ECHO
    assert labels(completion.records) == [("cat/echo", "fake", "ok")]


async def test_generate_tries_every_candidate_when_all_are_cooling(fake_settings: Any,
                                                                   cooldowns: Cooldowns) -> None:
    for candidate in (BROKEN, ECHO):
        cooldowns.failed(candidate.model, failures=1, seconds=60)
    completion, chosen = await routing.generate([BROKEN, ECHO], cooldowns=cooldowns, messages=MESSAGES,
                                                max_tokens=64)
    assert chosen == ECHO
    assert labels(completion.records) == [("cat/broken", "fake", "error"), ("cat/echo", "fake", "ok")]
    assert not cooldowns.cooling("cat/echo")  # its success ended its cooldown
    assert cooldowns.cooling("cat/broken")


# -- generate, loopback providers ----------------------------------------------------------


async def test_generate_request_fault_does_not_fall_back(servers: tuple[FakeOpenRouter, FakeOpenRouter],
                                                         cooldowns: Cooldowns) -> None:
    alpha, beta = servers
    alpha.enqueue(http_error(400, "context too long"))
    candidates = [Candidate("cat/alpha", on(alpha, "alpha"), "alpha-upstream"),
                  Candidate("cat/beta", on(beta, "beta"), "beta-upstream")]
    with pytest.raises(UpstreamError) as info:
        await routing.generate(candidates, cooldowns=cooldowns, messages=MESSAGES, max_tokens=64)
    assert info.value.status == 400 and info.value.model == "cat/alpha"
    assert labels(info.value.records) == [("cat/alpha", "alpha", "error")]
    assert len(alpha.chat_requests()) == 1
    assert beta.chat_requests() == []
    assert not cooldowns.cooling_now() and cooldowns.failed("cat/alpha", failures=2, seconds=60) is False


async def test_generate_provider_error_falls_back_to_the_other_provider(
        servers: tuple[FakeOpenRouter, FakeOpenRouter], cooldowns: Cooldowns) -> None:
    alpha, beta = servers
    alpha.enqueue(http_error(502, "bad gateway"))
    candidates = [Candidate("cat/alpha", on(alpha, "alpha"), "alpha-upstream"),
                  Candidate("cat/beta", on(beta, "beta"), "beta-upstream")]
    completion, chosen = await routing.generate(candidates, cooldowns=cooldowns, messages=MESSAGES, max_tokens=64)
    assert chosen == candidates[1]
    assert completion.content == FakeOpenRouter.DEFAULT_CONTENT
    assert labels(completion.records) == [("cat/alpha", "alpha", "error"), ("cat/beta", "beta", "ok")]
    assert completion.records[0].http_status == 502

    [first] = alpha.chat_requests()
    [second] = beta.chat_requests()
    assert first.headers["authorization"] == "Bearer key-alpha" and first.body["model"] == "alpha-upstream"
    assert second.headers["authorization"] == "Bearer key-beta" and second.body["model"] == "beta-upstream"


async def test_generate_unreachable_provider_falls_back(servers: tuple[FakeOpenRouter, FakeOpenRouter],
                                                        cooldowns: Cooldowns) -> None:
    _, beta = servers
    dead = Upstream(name="dead", base_url=f"http://127.0.0.1:{closed_port()}/api/v1", timeout_seconds=2)
    candidates = [Candidate("cat/dead", dead, "dead-upstream"), Candidate("cat/beta", on(beta, "beta"), "b")]
    completion, chosen = await routing.generate(candidates, cooldowns=cooldowns, messages=MESSAGES, max_tokens=64)
    assert chosen == candidates[1]
    assert labels(completion.records) == [("cat/dead", "dead", "error"), ("cat/beta", "beta", "ok")]


# -- stream, in-process fake ---------------------------------------------------------------


async def test_stream_falls_back_and_hands_out_the_first_delta(fake_settings: Any, cooldowns: Cooldowns) -> None:
    ctx, chosen = await routing.stream([BROKEN, ECHO], cooldowns=cooldowns, messages=MESSAGES, max_tokens=64)
    try:
        assert chosen == ECHO
        assert ctx.prefetched == ["You"]
        assert [(record.model, record.upstream) for record in ctx.records] == [("cat/broken", "fake"),
                                                                               ("cat/echo", "fake")]
        assert ctx.records[0].status == "error" and ctx.records[0].requested_model == "fake/error"
        assert ctx.prior_records == ctx.records[:1]
        text = "".join([*ctx.prefetched, *await collect(ctx)])
        assert text == REPLY
        assert ctx.ending.status == "ok"
        assert labels(ctx.ending.records) == [("cat/broken", "fake", "error"), ("cat/echo", "fake", "ok")]
    finally:
        await ctx.aclose()


async def test_stream_lone_candidate_is_not_prefetched(fake_settings: Any, cooldowns: Cooldowns) -> None:
    ctx, chosen = await routing.stream([ECHO], cooldowns=cooldowns, messages=MESSAGES, max_tokens=64)
    try:
        assert chosen == ECHO
        assert ctx.prefetched == []
        assert "".join(await collect(ctx)) == REPLY
        assert labels(ctx.records) == [("cat/echo", "fake", "ok")]
    finally:
        await ctx.aclose()


async def test_stream_lone_failing_candidate_raises(fake_settings: Any, cooldowns: Cooldowns) -> None:
    with pytest.raises(UpstreamError) as info:
        await routing.stream([BROKEN], cooldowns=cooldowns, messages=MESSAGES, max_tokens=64)
    assert info.value.model == "cat/broken"
    assert labels(info.value.records) == [("cat/broken", "fake", "error")]


async def test_stream_all_failing_raises_the_last_error(fake_settings: Any, cooldowns: Cooldowns) -> None:
    with pytest.raises(UpstreamError) as info:
        await routing.stream([TIMEOUT, BROKEN], cooldowns=cooldowns, messages=MESSAGES, max_tokens=64)
    assert info.value.model == "cat/broken"
    assert labels(info.value.records) == [("cat/slow", "fake", "error"), ("cat/broken", "fake", "error")]


async def test_stream_no_fallback_once_output_arrived(fake_settings: Any, cooldowns: Cooldowns) -> None:
    ctx, chosen = await routing.stream([MID, ECHO], cooldowns=cooldowns, messages=MESSAGES, max_tokens=64)
    try:
        assert chosen == MID
        assert ctx.prefetched == ["You"]
        seen: list[Any] = []
        with pytest.raises(UpstreamError):
            async for delta in ctx.chunks:
                seen.append(delta)
        assert seen == [" said:"]
        assert ctx.ending.status == "error"
        assert labels(ctx.records) == [("cat/mid", "fake", "error")]
    finally:
        await ctx.aclose()


async def test_stream_ended_during_prefetch_keeps_every_record_in_its_ending(fake_settings: Any,
                                                                             cooldowns: Cooldowns) -> None:
    # max_tokens=0: the fake's reply is cut to nothing, so its stream ends while prefetched.
    ctx, chosen = await routing.stream([BROKEN, ECHO], cooldowns=cooldowns, messages=MESSAGES, max_tokens=0)
    try:
        assert chosen == ECHO and ctx.prefetched == []
        assert labels(ctx.records) == [("cat/broken", "fake", "error"), ("cat/echo", "fake", "ok")]
        assert ctx.ending.status == "ok"
        assert labels(ctx.ending.records) == labels(ctx.records)  # what sessions_app/streaming.py stores
    finally:
        await ctx.aclose()


# -- stream, loopback providers ------------------------------------------------------------


def stalled(seconds: float) -> Any:
    """Headers at once, then nothing for `seconds`."""
    late = sse_data({"choices": [{"index": 0, "delta": {"content": "late"}, "finish_reason": None}]})
    return raw_stream([b"", late, b"data: [DONE]\n\n"], delay=seconds)


async def test_stream_stall_after_headers_falls_back(servers: tuple[FakeOpenRouter, FakeOpenRouter],
                                                     cooldowns: Cooldowns) -> None:
    alpha, beta = servers
    alpha.enqueue(stalled(3))
    candidates = [Candidate("cat/alpha", on(alpha, "alpha", timeout=1), "alpha-upstream"),
                  Candidate("cat/beta", on(beta, "beta"), "beta-upstream")]
    started = time.monotonic()
    ctx, chosen = await routing.stream(candidates, cooldowns=cooldowns, messages=MESSAGES, max_tokens=64)
    try:
        assert time.monotonic() - started < 30
        assert chosen == candidates[1]
        assert ctx.prefetched == ["Hello"]
        assert [(record.model, record.upstream) for record in ctx.records] == [("cat/alpha", "alpha"),
                                                                               ("cat/beta", "beta")]
        assert ctx.records[0].status == "error"
        assert "".join([*ctx.prefetched, *await collect(ctx)]) == FakeOpenRouter.DEFAULT_CONTENT
        [second] = beta.chat_requests()
        assert second.headers["authorization"] == "Bearer key-beta" and second.body["model"] == "beta-upstream"
    finally:
        await ctx.aclose()


async def test_stream_error_chunk_first_falls_back(servers: tuple[FakeOpenRouter, FakeOpenRouter],
                                                   cooldowns: Cooldowns) -> None:
    alpha, beta = servers
    alpha.enqueue(raw_stream([sse_data({"error": {"message": "overloaded", "code": 502}})]))
    candidates = [Candidate("cat/alpha", on(alpha, "alpha"), "alpha-upstream"),
                  Candidate("cat/beta", on(beta, "beta"), "beta-upstream")]
    ctx, chosen = await routing.stream(candidates, cooldowns=cooldowns, messages=MESSAGES, max_tokens=64)
    try:
        assert chosen == candidates[1]
        assert ctx.prefetched == ["Hello"]
        first = ctx.records[0]
        assert (first.model, first.upstream, first.status) == ("cat/alpha", "alpha", "error")
        assert "overloaded" in first.error
        assert "".join([*ctx.prefetched, *await collect(ctx)]) == FakeOpenRouter.DEFAULT_CONTENT
        assert labels(ctx.ending.records) == [("cat/alpha", "alpha", "error"), ("cat/beta", "beta", "ok")]
    finally:
        await ctx.aclose()


async def test_cancelling_while_the_primary_stalls_closes_its_connection(
        servers: tuple[FakeOpenRouter, FakeOpenRouter], cooldowns: Cooldowns) -> None:
    alpha, beta = servers
    alpha.enqueue(stalled(10))
    candidates = [Candidate("cat/alpha", on(alpha, "alpha", timeout=20), "alpha-upstream"),
                  Candidate("cat/beta", on(beta, "beta"), "beta-upstream")]
    task = asyncio.ensure_future(routing.stream(candidates, cooldowns=cooldowns, messages=MESSAGES,
                                                max_tokens=64))
    assert await asyncio.to_thread(alpha.wait_for_requests, 1)
    await asyncio.sleep(0.3)  # the headers came: routing waits for the first delta
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await asyncio.to_thread(alpha.disconnected.wait, 5)
    assert beta.chat_requests() == []
