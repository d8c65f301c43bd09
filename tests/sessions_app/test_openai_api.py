"""The OpenAI-compatible API (SPEC section 14, issue 15) through the official `openai` SDK.

Every test talks to a real uvicorn server (`live_server_url`) with `openai.OpenAI` or
`openai.AsyncOpenAI`, `base_url` pointed at `/v1` and a Pantheon key as `api_key`, and the
provider is the loopback fake (tests/fake_openrouter.py). The SDK is the client: what these
tests do is what any developer's code written for OpenAI does, unchanged.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from dataclasses import dataclass
from decimal import Decimal

import httpx
import openai
import pytest
from django.db import connection

from accounts.models import ApiKey
from billing_app.models import CreditHold, LedgerEntry, Wallet
from billing_app.selectors import ledger_problems
from billing_app.services import compute_cost, get_price
from core.db import db_call
from sessions_app.models import ChatSession, Turn
from tests.conftest import MODEL
from tests.fake_openrouter import completion, http_error, sse_stream, sse_tool_calls, tool_call
from tests.sessions_app.helpers import wait_until_closed

pytestmark = pytest.mark.usefixtures("fake_openrouter_settings")
postgres_only = pytest.mark.skipif(connection.vendor != "postgresql", reason="concurrency is tested on PostgreSQL")

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


# --- helpers ------------------------------------------------------------------------------

@dataclass
class Caller:
    """A user with a Pantheon key, as an OpenAI SDK user sees it."""

    base: str  # the server's root URL
    user: object
    key: ApiKey
    raw: str
    client: openai.OpenAI

    def sdk(self, **options) -> openai.OpenAI:
        return sdk(self.base, self.raw, **options)

    def async_sdk(self, **options) -> openai.AsyncOpenAI:
        return async_sdk(self.base, self.raw, **options)

    def api(self, method: str, path: str, **kwargs) -> httpx.Response:
        """Pantheon's own API (`/api/v1/...`) with this key."""
        with httpx.Client(base_url=self.base, timeout=20) as http:
            return http.request(method, path, headers={"Authorization": f"Bearer {self.raw}"}, **kwargs)


def sdk(base: str, key: str, *, max_retries: int = 0, timeout: float = 20, **options) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=max_retries, timeout=timeout, **options)


def async_sdk(base: str, key: str, *, max_retries: int = 0, timeout: float = 20, **options) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=key, max_retries=max_retries, timeout=timeout,
                              **options)


def caller_for(base: str, user, name: str = "") -> Caller:
    key, raw = ApiKey.issue(user=user, name=name)
    return Caller(base=base, user=user, key=key, raw=raw, client=sdk(base, raw))


@pytest.fixture
def alice_oa(alice, price, live_server_url) -> Caller:
    return caller_for(live_server_url, alice, name="my-script")


@pytest.fixture
def bob_oa(bob, price, live_server_url) -> Caller:
    return caller_for(live_server_url, bob)


class CountingHttp(httpx.Client):
    """An httpx client for the SDK that counts the requests it sends (the SDK's retries)."""

    def __init__(self, **kwargs):
        self.sent: list[httpx.Request] = []
        super().__init__(event_hooks={"request": [self.sent.append]}, **kwargs)


def turn_id_of(completion_id: str) -> uuid.UUID:
    assert completion_id.startswith("chatcmpl-"), completion_id
    return uuid.UUID(completion_id.removeprefix("chatcmpl-"))


def usage_cost(usage) -> str:
    """`usage.cost`: not in the SDK's types, kept as an extra field."""
    cost = getattr(usage, "cost", None)
    if cost is None:
        cost = (usage.model_extra or {}).get("cost")
    return cost


def balance_of(user) -> Decimal:
    return Wallet.objects.get(user=user).balance


def debits(turn_id) -> list[LedgerEntry]:
    return list(LedgerEntry.objects.filter(turn_id=turn_id, kind="debit"))


def answer(text: str | None = None, *, usage=(10, 5), pieces=None, tool_calls=None, **stream_kw):
    """A reply chooser that answers in the shape the request asked for (the facade decides
    whether it streams upstream; the tests only care what the provider said): `text`, or
    `pieces` streamed (joined when not streamed)."""
    if text is None:
        text = "".join(pieces) if pieces else "Hello from fake upstream"

    def choose(request):
        streamed = isinstance(request.body, dict) and request.body.get("stream")
        if tool_calls:
            if streamed:
                return sse_tool_calls([(c["function"]["name"], c["function"]["arguments"], c["id"])
                                       for c in tool_calls], usage=usage, **stream_kw)
            return completion(None, tool_calls=tool_calls, usage=usage)
        if streamed:
            return sse_stream(pieces or [text], usage=usage, **stream_kw)
        return completion(text, usage=usage)

    return choose


def chat_request(**fields):
    return {"model": MODEL, "messages": [{"role": "user", "content": "Hi there"}], **fields}


# --- GET /v1/models --------------------------------------------------------------------------

def test_models_list_gives_the_priced_models(alice_oa, fake_openrouter):
    from billing_app import services

    services.set_price(model="other/model", prompt_per_mtok=Decimal("1"), completion_per_mtok=Decimal("2"))
    models = list(alice_oa.client.models.list())
    ids = [m.id for m in models]
    assert set(ids) == {MODEL, "other/model"}
    test_model = next(m for m in models if m.id == MODEL)
    assert test_model.object == "model" and test_model.owned_by == "test" and isinstance(test_model.created, int)
    assert fake_openrouter.requests == []


def test_models_list_needs_a_valid_key(live_server_url, price):
    with pytest.raises(openai.AuthenticationError) as caught:
        sdk(live_server_url, "pk_not_a_key").models.list()
    assert caught.value.status_code == 401 and caught.value.code == "invalid_api_key"


# --- Non-streamed -------------------------------------------------------------------------------

def test_a_completion_matches_the_provider_the_wallet_and_the_turn(alice, alice_oa, fake_openrouter):
    fake_openrouter.reply_with(answer("The answer is 42.", usage=(12, 7), pieces=["The answer ", "is 42."]))
    raw = alice_oa.client.chat.completions.with_raw_response.create(
        model=MODEL, temperature=0.3, seed=7,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 6*7?"}],
    )
    answer_ = raw.parse()
    assert answer_.object == "chat.completion"
    assert answer_.choices[0].message.content == "The answer is 42."
    assert answer_.choices[0].message.role == "assistant"
    assert answer_.choices[0].finish_reason == "stop"
    assert answer_.model in {MODEL, fake_openrouter.DEFAULT_MODEL}
    usage = answer_.usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (12, 7, 19)
    cost = compute_cost(prompt_tokens=12, completion_tokens=7, price=get_price(MODEL))
    assert usage_cost(usage) == f"{cost:.6f}" == "0.026000"
    # The wallet paid exactly that, and the headers say so.
    balance = balance_of(alice)
    assert balance == Decimal("10") - cost
    assert raw.headers["X-Pantheon-Cost"] == f"{cost:.6f}"
    assert Decimal(raw.headers["X-Pantheon-Balance"]) == balance
    # The turn: completed, in the key's API session, holding the last message and the answer.
    turn_id = turn_id_of(answer_.id)
    assert raw.headers["X-Pantheon-Turn-Id"] == str(turn_id)
    turn = Turn.objects.get(pk=turn_id)
    assert turn.status == "completed" and turn.user_id == alice.pk and turn.cost == cost
    assert (turn.prompt_tokens, turn.completion_tokens, turn.usage_estimated) == (12, 7, False)
    assert turn.session.title == "API: my-script" and turn.session.user_id == alice.pk
    assert ChatSession.objects.get(api_key=alice_oa.key) == turn.session
    contents = {m.role: m.content for m in turn.messages.all()}
    assert contents == {"user": "What is 6*7?", "assistant": "The answer is 42."}
    assert [e.amount for e in debits(turn.id)] == [-cost]
    assert not CreditHold.objects.open().exists()
    # What the provider was sent: the client's messages and its parameters.
    assert len(fake_openrouter.requests) == 1
    upstream = fake_openrouter.requests[-1].body
    assert upstream["model"] == MODEL
    assert upstream["messages"] == [{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "What is 6*7?"}]
    assert upstream["temperature"] == 0.3 and upstream["seed"] == 7
    assert isinstance(upstream["max_tokens"], int) and upstream["max_tokens"] > 0


def test_calls_of_one_key_share_its_session_and_each_is_a_turn(alice, alice_oa, fake_openrouter):
    first = alice_oa.client.chat.completions.create(**chat_request())
    second = alice_oa.client.chat.completions.create(**chat_request(messages=[
        {"role": "user", "content": "Hi there"}, {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And again"}]))
    one, two = Turn.objects.get(pk=turn_id_of(first.id)), Turn.objects.get(pk=turn_id_of(second.id))
    assert one.pk != two.pk and one.session_id == two.session_id
    assert ChatSession.objects.filter(user=alice).count() == 1
    # The session holds the last message of each call, not the whole list again.
    assert two.messages.get(role="user").content == "And again"
    assert list(ChatSession.objects.get().turns.values_list("status", flat=True)) == ["completed", "completed"]


def test_developer_messages_and_text_parts_are_accepted(alice_oa, fake_openrouter):
    alice_oa.client.chat.completions.create(model=MODEL, messages=[
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]},
    ])
    assert fake_openrouter.requests[-1].body["messages"] == [{"role": "system", "content": "Be brief."},
                                                             {"role": "user", "content": "Hello there"}]


def test_every_passed_field_reaches_the_provider_and_no_other(alice_oa, fake_openrouter):
    schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    alice_oa.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=50, temperature=0.5, top_p=0.9,
        stop=["END"], seed=3, presence_penalty=0.1, frequency_penalty=0.2, response_format=schema,
        tools=[WEATHER_TOOL], tool_choice="auto", parallel_tool_calls=False, user="end-user-1",
        store=True, metadata={"k": "v"}, service_tier="auto",
    )
    upstream = fake_openrouter.requests[-1].body
    assert upstream["max_tokens"] == 50  # the client's cap, affordable, honoured
    expected = {"temperature": 0.5, "top_p": 0.9, "stop": ["END"], "seed": 3, "presence_penalty": 0.1,
                "frequency_penalty": 0.2, "response_format": schema, "tool_choice": "auto",
                "parallel_tool_calls": False, "user": "end-user-1"}
    assert {k: upstream.get(k) for k in expected} == expected
    assert upstream["tools"] == [WEATHER_TOOL]
    assert not {"store", "metadata", "service_tier", "n", "models"} & set(upstream)


def test_a_provider_finish_reason_is_mapped_to_openais(alice_oa, fake_openrouter):
    fake_openrouter.enqueue(completion("cut", finish_reason="max_tokens"))
    answer_ = alice_oa.client.chat.completions.create(**chat_request())
    assert answer_.choices[0].finish_reason == "length"


# --- Streamed -----------------------------------------------------------------------------------

def test_a_stream_without_include_usage_sends_no_usage_chunk(alice, alice_oa, fake_openrouter):
    fake_openrouter.reply_with(answer(pieces=["Hel", "lo", " world"], usage=(12, 3)))
    raw = alice_oa.client.chat.completions.with_raw_response.create(**chat_request(stream=True))
    assert raw.headers["content-type"].startswith("text/event-stream")
    turn_id = uuid.UUID(raw.headers["X-Pantheon-Turn-Id"])
    chunks = list(raw.parse())
    assert chunks and all(c.id == f"chatcmpl-{turn_id}" for c in chunks)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert all(c.usage is None and c.choices for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == "Hello world"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "stop"
    # The provider was asked for usage all the same, and the turn is billed with it.
    upstream = fake_openrouter.requests[-1].body
    assert upstream["stream"] is True and upstream.get("stream_options", {}).get("include_usage") is True
    turn = wait_until_closed(pk=turn_id)
    cost = compute_cost(prompt_tokens=12, completion_tokens=3, price=get_price(MODEL))
    assert turn.status == "completed" and turn.streamed and turn.cost == cost
    assert turn.messages.get(role="assistant").content == "Hello world"
    assert balance_of(alice) == Decimal("10") - cost


def test_a_stream_with_include_usage_ends_with_the_usage_and_cost(alice, alice_oa, fake_openrouter):
    fake_openrouter.reply_with(answer(pieces=["Hel", "lo"], usage=(12, 2)))
    stream = alice_oa.client.chat.completions.create(**chat_request(stream=True,
                                                                     stream_options={"include_usage": True}))
    chunks = list(stream)
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == (12, 2, 14)
    cost = compute_cost(prompt_tokens=12, completion_tokens=2, price=get_price(MODEL))
    assert usage_cost(last.usage) == f"{cost:.6f}" == "0.016000"
    assert all(c.usage is None for c in chunks[:-1])
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == "Hello"
    turn = wait_until_closed(pk=turn_id_of(last.id))
    assert turn.cost == cost and balance_of(alice) == Decimal("10") - cost


async def test_the_async_client_streams_with_and_without_usage(alice, alice_oa, fake_openrouter):
    fake_openrouter.reply_with(answer(pieces=["as", "ync"], usage=(12, 2)))
    client = alice_oa.async_sdk()
    try:
        plain = [c async for c in await client.chat.completions.create(**chat_request(stream=True))]
        with_usage = [c async for c in await client.chat.completions.create(
            **chat_request(stream=True, stream_options={"include_usage": True}))]
        full = await client.chat.completions.create(**chat_request())
    finally:
        await client.close()
    assert "".join(c.choices[0].delta.content or "" for c in plain) == "async"
    assert all(c.usage is None for c in plain)
    assert with_usage[-1].choices == [] and usage_cost(with_usage[-1].usage) == "0.016000"
    assert full.choices[0].message.content == "async" and usage_cost(full.usage) == "0.016000"
    ids = {turn_id_of(plain[0].id), turn_id_of(with_usage[0].id), turn_id_of(full.id)}
    assert len(ids) == 3

    @db_call  # hands its connection back, unlike a bare sync_to_async
    def check():
        turns = [wait_until_closed(pk=turn_id) for turn_id in ids]
        assert {t.status for t in turns} == {"completed"}
        assert balance_of(alice) == Decimal("10") - 3 * Decimal("0.016")

    await check()


def test_the_wire_is_data_lines_pings_and_done(alice_oa, fake_openrouter, settings):
    """No `event:` names, `: ping` comments while the provider is silent, `data: [DONE]` last."""
    settings.PANTHEON_HEARTBEAT_SECONDS = 0.1
    fake_openrouter.reply_with(answer(pieces=["slow ", "answer"], delay=0.6))
    with httpx.Client(base_url=alice_oa.base, timeout=20) as http:
        with http.stream("POST", "/v1/chat/completions", json=chat_request(stream=True),
                         headers={"Authorization": f"Bearer {alice_oa.raw}"}) as response:
            assert response.status_code == 200
            body = response.read()
    lines = [line for line in body.split(b"\n") if line]
    assert b": ping" in lines
    assert not any(line.startswith(b"event:") for line in lines)
    assert all(line.startswith((b"data: ", b":")) for line in lines)
    assert lines[-1] == b"data: [DONE]"
    wait_until_closed(pk=response.headers["X-Pantheon-Turn-Id"])


# --- Tools, both ways ----------------------------------------------------------------------------

def test_a_tool_round_trip(alice, alice_oa, fake_openrouter):
    call = tool_call("get_weather", {"city": "Paris"})

    def choose(request):
        if request.body["messages"][-1]["role"] == "tool":
            return answer("It is 18 degrees in Paris.")(request)
        return answer(tool_calls=[call])(request)

    fake_openrouter.reply_with(choose)
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = alice_oa.client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL])
    message = first.choices[0].message
    assert first.choices[0].finish_reason == "tool_calls"
    assert message.content is None and len(message.tool_calls) == 1
    asked = message.tool_calls[0]
    assert asked.id == call["id"] and asked.type == "function" and asked.function.name == "get_weather"
    assert json.loads(asked.function.arguments) == {"city": "Paris"}
    assert fake_openrouter.requests[0].body["tools"][0]["function"]["name"] == "get_weather"
    # The client runs the tool and sends the SDK's message object back, as OpenAI's docs do.
    messages += [message, {"role": "tool", "tool_call_id": asked.id, "content": '{"temp": 18}'}]
    second = alice_oa.client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL])
    assert second.choices[0].message.content == "It is 18 degrees in Paris."
    assert second.choices[0].finish_reason == "stop"
    sent = fake_openrouter.requests[-1].body["messages"]
    assert sent[-1] == {"role": "tool", "tool_call_id": asked.id, "content": '{"temp": 18}'}
    assert sent[-2]["role"] == "assistant"
    assert sent[-2]["tool_calls"] == [{"id": call["id"], "type": "function",
                                       "function": {"name": "get_weather", "arguments": call["function"]["arguments"]}}]
    assert sent[0] == {"role": "user", "content": "What is the weather in Paris?"}
    # Two turns, both billed; Pantheon ran no tool itself (two provider calls, no more).
    assert len(fake_openrouter.requests) == 2
    turns = [Turn.objects.get(pk=turn_id_of(c.id)) for c in (first, second)]
    assert [t.status for t in turns] == ["completed", "completed"]
    assert balance_of(alice) == Decimal("10") - sum(t.cost for t in turns)
    assert '{"temp": 18}' in [m.content for m in turns[1].messages.all()]


def test_a_streamed_tool_round_trip_reassembles_the_fragments(alice, alice_oa, fake_openrouter):
    call_id = "call_weather_1"

    def choose(request):
        if request.body["messages"][-1]["role"] == "tool":
            return sse_stream(["It is ", "18 degrees."]) if request.body.get("stream") else completion(
                "It is 18 degrees.")
        return sse_tool_calls([("get_weather", {"city": "Paris"}, call_id)], split=4)

    fake_openrouter.reply_with(choose)
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    stream = alice_oa.client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL],
                                                     stream=True)
    calls: dict[int, dict] = {}
    finish = None
    fragments = 0
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        finish = choice.finish_reason or finish
        for fragment in choice.delta.tool_calls or []:
            fragments += 1
            entry = calls.setdefault(fragment.index, {"id": None, "name": None, "arguments": ""})
            if fragment.id:
                entry["id"] = fragment.id
            if fragment.function and fragment.function.name:
                entry["name"] = fragment.function.name
            if fragment.function and fragment.function.arguments:
                entry["arguments"] += fragment.function.arguments
    assert finish == "tool_calls"
    assert fragments > 1  # streamed as fragments, not one lump
    assert list(calls) == [0]
    assert calls[0]["id"] == call_id and calls[0]["name"] == "get_weather"
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris"}
    messages += [{"role": "assistant", "content": None,
                  "tool_calls": [{"id": call_id, "type": "function",
                                  "function": {"name": "get_weather", "arguments": calls[0]["arguments"]}}]},
                 {"role": "tool", "tool_call_id": call_id, "content": "18 C"}]
    second = alice_oa.client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL],
                                                     stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in second if c.choices) == "It is 18 degrees."
    sent = fake_openrouter.requests[-1].body["messages"]
    assert sent[-1] == {"role": "tool", "tool_call_id": call_id, "content": "18 C"}
    assert sent[-2]["tool_calls"][0]["id"] == call_id
    assert json.loads(sent[-2]["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris"}
    for turn in Turn.objects.all():
        wait_until_closed(pk=turn.pk)
    assert Turn.objects.filter(status="completed").count() == 2


# --- Errors a client can cause ------------------------------------------------------------------

def test_a_bad_key_is_an_authentication_error(live_server_url, price, fake_openrouter):
    with pytest.raises(openai.AuthenticationError) as caught:
        sdk(live_server_url, "pk_not_a_key").chat.completions.create(**chat_request())
    error = caught.value
    assert error.status_code == 401 and error.code == "invalid_api_key" and error.type == "invalid_request_error"
    assert fake_openrouter.requests == [] and not Turn.objects.exists()


def test_a_revoked_key_is_an_authentication_error(alice_oa, fake_openrouter):
    alice_oa.key.revoke()
    with pytest.raises(openai.AuthenticationError):
        alice_oa.client.chat.completions.create(**chat_request())
    assert fake_openrouter.requests == []


def test_an_unpriced_model_is_not_found(alice_oa, fake_openrouter):
    with pytest.raises(openai.NotFoundError) as caught:
        alice_oa.client.chat.completions.create(**chat_request(model="nope/nope"))
    assert caught.value.status_code == 404 and caught.value.code == "model_not_found"
    assert caught.value.type == "invalid_request_error"
    assert fake_openrouter.requests == [] and not Turn.objects.exists()


def test_n_other_than_one_is_a_bad_request(alice_oa, fake_openrouter):
    with pytest.raises(openai.BadRequestError) as caught:
        alice_oa.client.chat.completions.create(**chat_request(n=2))
    assert caught.value.status_code == 400 and caught.value.code == "unsupported_parameter"
    assert caught.value.param == "n"
    assert fake_openrouter.requests == [] and not Turn.objects.exists()


def test_a_non_text_content_part_is_a_bad_request(alice_oa, fake_openrouter):
    with pytest.raises(openai.BadRequestError) as caught:
        alice_oa.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
        ]}])
    assert caught.value.status_code == 400 and caught.value.code == "unsupported_content"
    assert fake_openrouter.requests == [] and not Turn.objects.exists()


def test_an_empty_wallet_is_a_402_that_the_sdk_does_not_retry(make_user, price, live_server_url, fake_openrouter):
    user = make_user("broke", "0.0001")
    _, raw = ApiKey.issue(user=user)
    http = CountingHttp(timeout=20)
    client = sdk(live_server_url, raw, max_retries=2, http_client=http)
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(**chat_request())
    error = caught.value
    assert error.status_code == 402 and error.code == "insufficient_credits" and error.type == "insufficient_quota"
    assert len(http.sent) == 1  # the SDK does not retry a 402
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(**chat_request(stream=True))
    assert caught.value.status_code == 402 and caught.value.code == "insufficient_credits"
    assert fake_openrouter.requests == [] and not Turn.objects.exists() and not CreditHold.objects.exists()
    assert balance_of(user) == Decimal("0.0001")


def test_a_huge_prompt_on_a_small_wallet_is_a_402_not_a_400_or_500(make_user, price, live_server_url,
                                                                    fake_openrouter):
    user = make_user("small", "0.01")
    _, raw = ApiKey.issue(user=user)
    prompt = "lorem ipsum " * (2_000_000 // 12)  # 2 MB of text
    with pytest.raises(openai.APIStatusError) as caught:
        sdk(live_server_url, raw).chat.completions.create(model=MODEL,
                                                          messages=[{"role": "user", "content": prompt}])
    assert caught.value.status_code == 402 and caught.value.code == "insufficient_credits"
    assert fake_openrouter.requests == [] and not Turn.objects.exists()


def test_a_nul_character_in_a_message_is_400_invalid_text(alice_oa, fake_openrouter):
    with pytest.raises(openai.BadRequestError) as caught:
        alice_oa.client.chat.completions.create(model=MODEL,
                                                messages=[{"role": "user", "content": "nul \x00 here"}])
    assert caught.value.code == "invalid_text" and caught.value.param == "messages[0].content"
    assert fake_openrouter.requests == [] and not Turn.objects.exists() and not CreditHold.objects.exists()


@pytest.mark.parametrize(("raw_body", "code"), [
    (b'{"model": "test/model", "messages": [{"role": "user", "content": "lone \\ud800"}]}', "invalid_text"),
    (b'{"model": "test/model", "messages": [{"role": "user", "content": "hi"}], "metadata": '
     + b'{"a": ' * 5000 + b"1" + b"}" * 5001, "invalid_json"),
    (b"not json at all", "invalid_json"),
    (b"[1, 2, 3]", "invalid_json"),
    (b'{"model": "test/model", "messages": [{"role": "user", "content": "\xff\xfe"}]}', "invalid_json"),
    (b'{"model": "test/model", "temperature": NaN, "messages": [{"role": "user", "content": "hi"}]}',
     "invalid_json"),
])
def test_hostile_bodies_are_openai_400s_never_500s(alice_oa, fake_openrouter, raw_body, code):
    with httpx.Client(base_url=alice_oa.base, timeout=20) as http:
        response = http.post("/v1/chat/completions", content=raw_body,
                             headers={"Authorization": f"Bearer {alice_oa.raw}",
                                      "Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == code and error["type"] == "invalid_request_error"
    assert set(error) >= {"message", "type", "param", "code"}
    assert fake_openrouter.requests == [] and not Turn.objects.exists()


def test_no_key_is_a_401_openai_body(live_server_url, price):
    with httpx.Client(base_url=live_server_url, timeout=20) as http:
        response = http.post("/v1/chat/completions", json=chat_request())
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize(("method", "path"), [("GET", "/v1/chat/completions"), ("GET", "/v1/nothing"),
                                            ("POST", "/v1/completions"), ("DELETE", "/v1/models")])
def test_other_paths_and_methods_are_openai_json_errors_not_html(alice_oa, method, path):
    with httpx.Client(base_url=alice_oa.base, timeout=20) as http:
        response = http.request(method, path, headers={"Authorization": f"Bearer {alice_oa.raw}"})
    assert 400 <= response.status_code < 500, response.text
    assert response.headers["content-type"].startswith("application/json"), response.text[:200]
    assert set(response.json()["error"]) >= {"message", "type", "code"}


def test_a_provider_failure_before_output_is_a_502_and_costs_nothing(alice, alice_oa, fake_openrouter):
    fake_openrouter.enqueue(http_error(400, "bad params"), http_error(400, "bad params"))
    with pytest.raises(openai.InternalServerError) as caught:
        alice_oa.client.chat.completions.create(**chat_request())
    assert caught.value.status_code == 502 and caught.value.code == "upstream_error"
    assert caught.value.type == "api_error"
    with pytest.raises(openai.InternalServerError) as caught:
        alice_oa.client.chat.completions.create(**chat_request(stream=True))
    assert caught.value.status_code == 502 and caught.value.code == "upstream_error"
    turns = list(Turn.objects.all())
    assert [t.status for t in turns] == ["failed", "failed"] and all(t.cost == 0 for t in turns)
    assert not LedgerEntry.objects.filter(kind="debit").exists() and balance_of(alice) == Decimal("10")


def test_a_provider_too_slow_to_answer_is_a_504(alice, alice_oa, fake_openrouter, settings):
    settings.PANTHEON_UPSTREAM_TIMEOUT_SECONDS = 0.5
    settings.PANTHEON_UPSTREAM_MAX_RETRIES = 0
    fake_openrouter.enqueue(completion("late", delay=3), sse_stream(open_delay=3))
    with pytest.raises(openai.InternalServerError) as caught:
        alice_oa.client.chat.completions.create(**chat_request())
    assert caught.value.status_code == 504 and caught.value.code == "upstream_timeout"
    with pytest.raises(openai.InternalServerError) as caught:
        alice_oa.client.chat.completions.create(**chat_request(stream=True))
    assert caught.value.status_code == 504 and caught.value.code == "upstream_timeout"
    assert not LedgerEntry.objects.filter(kind="debit").exists() and balance_of(alice) == Decimal("10")


# --- A failure mid-stream, a client that leaves --------------------------------------------------

def test_an_error_mid_stream_raises_api_error_and_the_turn_is_failed_and_billed(alice, alice_oa, fake_openrouter):
    fake_openrouter.enqueue(sse_stream(["a ", "b ", "c"], error_after=2))
    stream = alice_oa.client.chat.completions.create(**chat_request(stream=True))
    received = ""
    with pytest.raises(openai.APIError) as caught:
        for chunk in stream:
            if chunk.choices:
                received += chunk.choices[0].delta.content or ""
    assert received == "a b "
    assert caught.value.code == "upstream_error"
    turn = wait_until_closed(pk=turn_id_of(chunk.id))
    assert turn.status == "failed" and turn.error_code == "upstream_error"
    assert turn.usage_estimated and turn.completion_tokens > 0 and turn.cost > 0
    assert turn.messages.get(role="assistant").content == "a b "
    assert len(debits(turn.id)) == 1 and debits(turn.id)[0].amount == -turn.cost
    assert balance_of(alice) == Decimal("10") - turn.cost


def test_closing_the_stream_early_cancels_the_turn_and_the_upstream(alice, alice_oa, fake_openrouter):
    fake_openrouter.enqueue(fake_openrouter.slow_stream(pieces=100, delay=0.05))
    stream = alice_oa.client.chat.completions.create(**chat_request(stream=True))
    turn_id = None
    received = ""
    for chunk in stream:
        turn_id = turn_id_of(chunk.id)
        if chunk.choices:
            received += chunk.choices[0].delta.content or ""
        if received:
            break
    stream.close()
    closed_at = time.monotonic()
    assert fake_openrouter.disconnected.wait(5), "the upstream was not closed"
    assert time.monotonic() - closed_at < 3
    turn = wait_until_closed(pk=turn_id)
    assert turn.status == "cancelled"
    stored = turn.messages.get(role="assistant").content
    assert stored.startswith(received) and len(stored) < len("".join(f"w{i} " for i in range(100)))
    assert turn.cost > 0 and turn.completion_tokens > 0  # billed for what was produced
    assert [e.amount for e in debits(turn.id)] == [-turn.cost]
    assert balance_of(alice) == Decimal("10") - turn.cost


def test_a_facade_call_billed_on_an_estimate_is_reconciled_like_any_turn(alice, alice_oa, fake_openrouter):
    from billing_app.models import LedgerEntry
    from billing_app.services import compute_cost, get_price
    from sessions_app.models import LlmEvent
    from sessions_app.tasks import reconcile_turn_task

    fake_openrouter.enqueue(fake_openrouter.slow_stream(pieces=100, delay=0.05))
    stream = alice_oa.client.chat.completions.create(**chat_request(stream=True))
    turn_id = None
    for chunk in stream:
        turn_id = turn_id_of(chunk.id)
        if chunk.choices and chunk.choices[0].delta.content:
            break
    stream.close()
    turn = wait_until_closed(pk=turn_id)
    assert turn.status == "cancelled" and turn.usage_estimated and turn.reconciliation == "pending"
    estimated = turn.cost
    event = LlmEvent.objects.get(turn=turn)
    assert fake_openrouter.wait_for_generation(event.generation_id)
    record = fake_openrouter.generations[event.generation_id]
    assert reconcile_turn_task.call(str(turn.id)) == "done"
    turn.refresh_from_db()
    real = compute_cost(prompt_tokens=record["native_tokens_prompt"],
                        completion_tokens=record["native_tokens_completion"], price=get_price(turn.model))
    assert turn.reconciled and turn.cost == real
    adjustments = [e.amount for e in LedgerEntry.objects.filter(turn_id=turn.id, kind="adjustment")]
    assert adjustments == ([] if real == estimated else [estimated - real])
    assert balance_of(alice) == Decimal("10") - real


def test_a_non_streamed_call_whose_client_gave_up_still_closes_its_turn(alice, alice_oa, fake_openrouter):
    fake_openrouter.enqueue(completion("late answer", delay=1.5))
    with pytest.raises(openai.APITimeoutError):
        alice_oa.sdk(timeout=0.5).chat.completions.create(**chat_request())
    turn = wait_until_closed(timeout=10)  # never left running, never lost
    assert turn.status == "cancelled"  # SPEC 10: the client going away at any moment cancels
    assert ledger_problems() == []


# --- The SDK's own retries, Idempotency-Key -----------------------------------------------------

def test_the_sdks_retries_after_a_502_never_bill(alice, alice_oa, fake_openrouter, settings):
    settings.PANTHEON_UPSTREAM_MAX_RETRIES = 0
    fake_openrouter.reply_with(lambda request: http_error(502))
    http = CountingHttp(timeout=20)
    client = alice_oa.sdk(max_retries=2, http_client=http)
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(**chat_request())
    assert caught.value.status_code == 502 and caught.value.code == "upstream_error"
    assert len(http.sent) == 3  # the first attempt and two retries
    chat_calls = [r for r in fake_openrouter.requests if r.path.endswith("/chat/completions")]
    assert len(chat_calls) == 3
    turns = list(Turn.objects.all())
    assert len(turns) == 3 and {t.status for t in turns} == {"failed"} and all(t.cost == 0 for t in turns)
    assert not LedgerEntry.objects.filter(kind="debit").exists()
    assert balance_of(alice) == Decimal("10")
    assert ledger_problems() == []


def test_the_sdks_retries_of_a_stream_never_bill(alice, alice_oa, fake_openrouter, settings):
    settings.PANTHEON_UPSTREAM_MAX_RETRIES = 0
    fake_openrouter.reply_with(lambda request: http_error(502))
    http = CountingHttp(timeout=20)
    with pytest.raises(openai.InternalServerError):
        alice_oa.sdk(max_retries=2, http_client=http).chat.completions.create(**chat_request(stream=True))
    assert len(http.sent) == 3
    assert Turn.objects.filter(status="failed", cost=0).count() == 3
    assert not LedgerEntry.objects.filter(kind="debit").exists() and balance_of(alice) == Decimal("10")


def test_an_idempotency_key_gives_the_same_turn_and_one_debit(alice, alice_oa, fake_openrouter):
    headers = {"Idempotency-Key": "k1"}
    first = alice_oa.client.chat.completions.with_raw_response.create(**chat_request(), extra_headers=headers)
    again = alice_oa.client.chat.completions.with_raw_response.create(**chat_request(), extra_headers=headers)
    assert first.headers["X-Pantheon-Turn-Id"] == again.headers["X-Pantheon-Turn-Id"]
    one, two = first.parse(), again.parse()
    assert one.id == two.id and one.choices[0].message.content == two.choices[0].message.content
    assert usage_cost(one.usage) == usage_cost(two.usage)
    assert len(fake_openrouter.requests) == 1 and Turn.objects.count() == 1
    assert len(debits(turn_id_of(one.id))) == 1
    assert balance_of(alice) == Decimal("10") - Turn.objects.get().cost


def test_an_idempotency_key_on_a_stream_replays_the_same_turn(alice, alice_oa, fake_openrouter):
    fake_openrouter.reply_with(answer(pieces=["one ", "two"], usage=(12, 2)))
    headers = {"Idempotency-Key": "stream-1"}
    request = chat_request(stream=True, stream_options={"include_usage": True})
    first = list(alice_oa.client.chat.completions.create(**request, extra_headers=headers))
    wait_until_closed(pk=turn_id_of(first[0].id))
    again = list(alice_oa.client.chat.completions.create(**request, extra_headers=headers))
    assert {c.id for c in first} == {c.id for c in again} and len({c.id for c in first}) == 1

    def text(chunks):
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    assert text(first) == text(again) == "one two"
    assert usage_cost(again[-1].usage) == usage_cost(first[-1].usage) == "0.016000"
    assert len(fake_openrouter.requests) == 1 and Turn.objects.count() == 1
    assert LedgerEntry.objects.filter(kind="debit").count() == 1


def test_an_idempotency_key_with_another_body_is_422(alice_oa, fake_openrouter):
    alice_oa.client.chat.completions.create(**chat_request(), extra_headers={"Idempotency-Key": "k3"})
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        alice_oa.client.chat.completions.create(**chat_request(messages=[{"role": "user", "content": "other"}]),
                                                extra_headers={"Idempotency-Key": "k3"})
    assert caught.value.status_code == 422 and caught.value.code == "idempotency_key_reused"
    assert len(fake_openrouter.requests) == 1


def test_a_malformed_idempotency_key_is_400(alice_oa, fake_openrouter):
    with pytest.raises(openai.BadRequestError) as caught:
        alice_oa.client.chat.completions.create(**chat_request(), extra_headers={"Idempotency-Key": "x" * 201})
    assert caught.value.code == "invalid_idempotency_key"
    assert fake_openrouter.requests == [] and not Turn.objects.exists()


def test_a_refused_request_does_not_use_up_its_idempotency_key(make_user, price, live_server_url, fake_openrouter):
    from billing_app import services

    user = make_user("later", "0.0001")
    _, raw = ApiKey.issue(user=user)
    client = sdk(live_server_url, raw)
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(**chat_request(), extra_headers={"Idempotency-Key": "k4"})
    assert caught.value.status_code == 402
    services.grant(user_id=user.pk, amount=Decimal("5"), note="top-up")
    answer_ = client.chat.completions.create(**chat_request(), extra_headers={"Idempotency-Key": "k4"})
    assert Turn.objects.get(pk=turn_id_of(answer_.id)).status == "completed"


# --- Concurrency: no overspend ----------------------------------------------------------------

@postgres_only
@pytest.mark.django_db(transaction=True)
def test_thirty_concurrent_sdk_streams_on_a_small_wallet_never_overspend(make_user, price, live_server_url,
                                                                          fake_openrouter):
    # Each answer costs 10 * 0.001 + 5 * 0.002 = 0.02; each hold is at least its prompt plus
    # 16 output tokens (>= 0.032). 0.4 credits: about ten at a time, never more than twenty in all.
    user = make_user("crowd", "0.4")
    _, raw = ApiKey.issue(user=user)
    fake_openrouter.reply_with(lambda request: sse_stream(["a ", "b ", "c"], usage=(10, 5), delay=0.05))
    cost = compute_cost(prompt_tokens=10, completion_tokens=5, price=get_price(MODEL))

    async def one(client, i):
        try:
            stream = await client.chat.completions.create(
                **chat_request(messages=[{"role": "user", "content": f"hi {i}"}], max_tokens=16, stream=True,
                               stream_options={"include_usage": True}))
            chunks = [c async for c in stream]
            return "ok", chunks
        except openai.APIStatusError as exc:
            return exc.status_code, exc.code

    async def crowd():
        client = async_sdk(live_server_url, raw, timeout=60)
        try:
            return await asyncio.gather(*(one(client, i) for i in range(30)))
        finally:
            await client.close()

    results = asyncio.run(crowd())
    served = [chunks for outcome, chunks in results if outcome == "ok"]
    refused = [(status, code) for status, code in results if status != "ok"]
    assert set(refused) <= {(402, "insufficient_credits")}, refused
    assert len(served) + len(refused) == 30 and served and refused
    for chunks in served:
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "a b c"
        assert usage_cost(chunks[-1].usage) == f"{cost:.6f}"
    for turn in Turn.objects.all():
        wait_until_closed(pk=turn.pk)
    balance = balance_of(user)
    assert balance >= 0
    assert balance == Decimal("0.4") - len(served) * cost
    assert Turn.objects.filter(status="completed").count() == len(served) == LedgerEntry.objects.filter(
        kind="debit").count()
    assert len(fake_openrouter.requests) == len(served)
    assert ledger_problems() == []


@postgres_only
@pytest.mark.django_db(transaction=True)
def test_concurrent_non_streamed_calls_in_threads_never_overspend(make_user, price, live_server_url,
                                                                  fake_openrouter):
    user = make_user("threads", "0.2")
    _, raw = ApiKey.issue(user=user)
    fake_openrouter.reply_with(lambda request: completion("ok", usage=(10, 5), delay=0.2))
    results: list = []
    lock = threading.Lock()

    def run(i):
        client = sdk(live_server_url, raw, timeout=60)
        try:
            answer_ = client.chat.completions.create(
                **chat_request(messages=[{"role": "user", "content": f"hi {i}"}], max_tokens=16))
            outcome = ("ok", answer_.id)
        except openai.APIStatusError as exc:
            outcome = (exc.status_code, exc.code)
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(results) == 20
    served = [r for r in results if r[0] == "ok"]
    assert {r for r in results if r[0] != "ok"} <= {(402, "insufficient_credits")}
    assert served and balance_of(user) >= 0
    assert balance_of(user) == Decimal("0.2") - len(served) * Decimal("0.02")
    assert ledger_problems() == []


# --- Another user's data ------------------------------------------------------------------------

def test_another_users_turns_and_sessions_are_never_reachable(alice, bob, alice_oa, bob_oa, fake_openrouter):
    alice_answer = alice_oa.client.chat.completions.create(**chat_request(), extra_headers={"Idempotency-Key": "same"})
    # Bob using the same Idempotency-Key gets his own turn, not Alice's answer.
    bob_answer = bob_oa.client.chat.completions.create(**chat_request(), extra_headers={"Idempotency-Key": "same"})
    alice_turn, bob_turn = turn_id_of(alice_answer.id), turn_id_of(bob_answer.id)
    assert alice_turn != bob_turn
    assert Turn.objects.get(pk=bob_turn).user_id == bob.pk
    listed = bob_oa.api("GET", "/api/v1/sessions").json()
    assert listed["count"] == 1
    bob_session = listed["results"][0]
    assert bob_session["title"] == f"API: {bob_oa.key.prefix}"  # a key without a name
    assert bob_session["id"] == str(Turn.objects.get(pk=bob_turn).session_id)
    assert str(Turn.objects.get(pk=alice_turn).session_id) != bob_session["id"]
    assert bob_oa.api("GET", f"/api/v1/turns/{alice_turn}").status_code == 404
    assert bob_oa.api("GET", f"/api/v1/turns/{alice_turn}/events").status_code == 404
    alice_session = Turn.objects.get(pk=alice_turn).session_id
    assert bob_oa.api("GET", f"/api/v1/sessions/{alice_session}").status_code == 404
    assert bob_oa.api("GET", f"/api/v1/sessions/{alice_session}/messages").status_code == 404
    assert alice_oa.api("GET", f"/api/v1/turns/{alice_turn}").status_code == 200
    # And each wallet paid its own call only.
    assert balance_of(alice) == Decimal("10") - Turn.objects.get(pk=alice_turn).cost
    assert balance_of(bob) == Decimal("5") - Turn.objects.get(pk=bob_turn).cost


def test_the_facade_turns_show_in_usage_like_any_other(alice, alice_oa, fake_openrouter):
    answer_ = alice_oa.client.chat.completions.create(**chat_request())
    response = alice_oa.api("GET", "/api/v1/usage")
    assert response.status_code == 200
    records = response.json()["results"]
    assert [r["turn_id"] for r in records] == [str(turn_id_of(answer_.id))]
    assert records[0]["cost"] == usage_cost(answer_.usage)
