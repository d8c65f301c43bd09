"""Several providers, fallbacks and cooldowns (SPEC section 15, issue 16), through a real server.

Two loopback fake OpenRouters (tests/fake_openrouter.py started twice), each with its own key,
are two provider rows: `alpha` serves the catalogue model `m/alpha` (sent upstream as
`alpha-upstream`), `beta` serves `m/beta` (`beta-upstream`), dearer. `m/alpha` falls back to
`m/beta`. Pantheon runs in a real uvicorn (`live_server_url`); clients are httpx and, for the
OpenAI front door, the official SDK.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import threading
import time
from decimal import Decimal

import httpx
import openai
import pytest

from billing_app import services
from billing_app.models import ModelPrice, Provider, UsageRecord, Wallet
from billing_app.services import compute_cost
from llm_gateway.routing import COOLDOWNS
from sessions_app.models import ChatSession, LlmEvent, Turn
from tests.fake_openrouter import FakeOpenRouter, completion, http_error, raw_stream, sse_data
from tests.sessions_app.helpers import read_stream, stream_url, wait_until_closed

ALPHA, BETA = "m/alpha", "m/beta"
ALPHA_PRICE = (Decimal("1000"), Decimal("2000"))  # credits per million prompt / completion tokens
BETA_PRICE = (Decimal("3000"), Decimal("9000"))
KEYS = {"alpha": "key-alpha", "beta": "key-beta"}


@dataclasses.dataclass
class Setup:
    base: str  # Pantheon's root URL
    user: object
    key: str  # the user's Pantheon key
    session: ChatSession
    alpha: FakeOpenRouter
    beta: FakeOpenRouter

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def turn(self, body: dict | None = None) -> httpx.Response:
        with httpx.Client(base_url=self.base, timeout=30) as http:
            return http.post(f"/api/v1/sessions/{self.session.id}/turns", json=body or {"content": "Hi there"},
                             headers=self.headers)

    def stream(self, body: dict | None = None):
        return read_stream(self.base, self.session, self.headers, body or {"content": "Hi there"})

    def sdk(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base}/v1", api_key=self.key, max_retries=0, timeout=30)


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # nothing listens there once closed


@pytest.fixture
def two_providers(live_server_url, make_user, settings):
    settings.PANTHEON_UPSTREAM_MAX_RETRIES = 0  # one attempt per candidate unless a test says otherwise
    settings.PANTHEON_COOLDOWN_FAILURES = 100  # no cooldown unless a test asks for one
    COOLDOWNS.clear()
    with FakeOpenRouter() as alpha, FakeOpenRouter() as beta:
        alpha.api_key, beta.api_key = KEYS["alpha"], KEYS["beta"]
        rows = {}
        for name, server in (("alpha", alpha), ("beta", beta)):
            rows[name] = Provider.objects.create(name=name, base_url=server.base_url, api_key=KEYS[name],
                                                 timeout_seconds=2)
        ModelPrice.objects.create(model=BETA, prompt_price_per_mtok=BETA_PRICE[0],
                                  completion_price_per_mtok=BETA_PRICE[1], provider=rows["beta"],
                                  upstream_model="beta-upstream")
        ModelPrice.objects.create(model=ALPHA, prompt_price_per_mtok=ALPHA_PRICE[0],
                                  completion_price_per_mtok=ALPHA_PRICE[1], provider=rows["alpha"],
                                  upstream_model="alpha-upstream", fallbacks=[BETA])
        user = make_user("carol", "10")
        from accounts.models import ApiKey

        _, raw = ApiKey.issue(user=user)
        session = ChatSession.objects.create(user=user, model=ALPHA)
        yield Setup(base=live_server_url, user=user, key=raw, session=session, alpha=alpha, beta=beta)
    COOLDOWNS.clear()


def stalled_stream(seconds: float = 5.0):
    """Headers at once, then nothing for `seconds` (past the provider's 2 s timeout)."""
    return raw_stream([b"", sse_data({"choices": [{"delta": {"content": "late"}}]}), b"data: [DONE]\n\n"],
                      delay=seconds)


def stalled_completion(seconds: float = 5.0):
    return dataclasses.replace(completion("late"), delay=seconds)


FAILURES = {
    "502": (lambda stream: http_error(502, "bad gateway")),
    "429": (lambda stream: http_error(429, "rate limited upstream", retry_after=0)),
    "stall": (lambda stream: stalled_stream() if stream else stalled_completion()),
    "404": (lambda stream: http_error(404, "No endpoints found for alpha-upstream")),
}


def _events(turn_id) -> list[LlmEvent]:
    return list(LlmEvent.objects.filter(turn_id=turn_id).order_by("created_at", "latency_ms"))


def _served_by_beta(setup: Setup, turn: Turn, *, alpha_error: str) -> None:
    """The turn answered by the fallback: its model asked, its served model, its price, its
    events, and what went to each provider."""
    assert turn.status == Turn.Status.COMPLETED
    assert (turn.model, turn.served_model) == (ALPHA, BETA)
    price = ModelPrice.objects.get(model=BETA)
    assert turn.cost == compute_cost(prompt_tokens=turn.prompt_tokens, completion_tokens=turn.completion_tokens,
                                     price=price) > 0
    record = UsageRecord.objects.get(turn_id=turn.id)
    assert (record.model, record.served_model, record.cost) == (ALPHA, BETA, turn.cost)
    events = LlmEvent.objects.filter(turn_id=turn.id)
    failed = [e for e in events if e.model == ALPHA]
    served = [e for e in events if e.model == BETA]
    assert failed and all(e.status == "error" and e.upstream == "alpha" and e.requested_model == "alpha-upstream"
                          for e in failed), [(e.model, e.status, e.error) for e in events]
    assert alpha_error in failed[-1].error, failed[-1].error
    assert len(served) == 1 and served[0].status == "ok" and served[0].upstream == "beta"
    assert served[0].requested_model == "beta-upstream"
    beta_calls = setup.beta.chat_requests()
    assert len(beta_calls) == 1
    assert beta_calls[0].headers["authorization"] == f"Bearer {KEYS['beta']}"
    assert beta_calls[0].body["model"] == "beta-upstream"


@pytest.mark.parametrize("failure", [*FAILURES, "refused"])
@pytest.mark.parametrize("streamed", [False, True], ids=["plain", "stream"])
def test_a_failing_primary_is_served_by_the_fallback_on_the_other_provider(two_providers, failure, streamed):
    setup = two_providers
    if failure == "refused":
        Provider.objects.filter(name="alpha").update(base_url=f"http://127.0.0.1:{_closed_port()}/api/v1")
        expected_error = "could not connect"
    else:
        setup.alpha.enqueue(FAILURES[failure](streamed))
        expected_error = {"502": "HTTP 502", "429": "HTTP 429", "stall": "timeout", "404": "HTTP 404"}[failure]
    if streamed:
        response, events, _ = setup.stream()
        assert response.status_code == 200
        names = [name for name, _, _ in events]
        assert names[0] == "start" and names[-1] == "done", names
        assert events[0][1]["model"] == ALPHA  # the model asked for
        done = events[-1][1]
        assert done["served_model"] == BETA and done["status"] == "completed"
        text = "".join(data["delta"] for name, data, _ in events if name == "chunk")
        assert text == "Hello from fake upstream"
    else:
        response = setup.turn()
        assert response.status_code == 201, response.text
        body = response.json()
        assert body["turn"]["served_model"] == BETA and body["turn"]["model"] == ALPHA
        assert body["message"]["content"] == "Hello from fake upstream"
    turn = wait_until_closed(session=setup.session)
    if failure == "stall":
        expected_error = "read timeout" if streamed else "timeout"
    _served_by_beta(setup, turn, alpha_error=expected_error)
    if failure != "refused":
        assert setup.alpha.chat_requests()[0].headers["authorization"] == f"Bearer {KEYS['alpha']}"
    detail = httpx.get(f"{setup.base}/api/v1/turns/{turn.id}", headers=setup.headers).json()
    assert detail["served_model"] == BETA


def test_each_candidate_gets_its_retries_before_the_fallback(two_providers, settings):
    settings.PANTHEON_UPSTREAM_MAX_RETRIES = 2
    setup = two_providers
    setup.alpha.enqueue(*(http_error(502, retry_after=0) for _ in range(3)))
    assert setup.turn().status_code == 201
    turn = wait_until_closed(session=setup.session)
    assert len(setup.alpha.chat_requests()) == 3  # the first try and two retries
    assert [e.model for e in _events(turn.id)].count(ALPHA) == 3
    _served_by_beta(setup, turn, alpha_error="HTTP 502")


@pytest.mark.parametrize("streamed", [False, True], ids=["plain", "stream"])
def test_a_400_from_the_primary_is_the_request_s_fault_no_fallback(two_providers, streamed):
    setup = two_providers
    setup.alpha.enqueue(http_error(400, "max_tokens is too large for this model"))
    if streamed:
        response, _, raw = setup.stream()
    else:
        response = setup.turn()
        raw = response.content
    assert response.status_code == 502
    body = json.loads(raw)
    assert body["code"] == "upstream_error" and "max_tokens is too large" in body["detail"]
    assert setup.beta.chat_requests() == []
    turn = wait_until_closed(session=setup.session)
    assert (turn.status, turn.served_model, turn.cost) == (Turn.Status.FAILED, ALPHA, 0)


def test_a_failure_after_the_first_chunk_does_not_fall_back_and_is_billed(two_providers):
    setup = two_providers
    writes = [sse_data({"id": "gen-x", "model": "alpha-upstream", "choices": [{"delta": {"content": w}}]})
              for w in ("Hello ", "there ", "friend ")]
    writes.append(sse_data({"error": {"message": "overloaded", "code": 502}}))
    setup.alpha.enqueue(raw_stream(writes, delay=0.05))
    response, events, _ = setup.stream()
    assert response.status_code == 200
    assert [name for name, _, _ in events][-1] == "error"
    assert "".join(d["delta"] for name, d, _ in events if name == "chunk") == "Hello there friend "
    assert setup.beta.chat_requests() == []
    turn = wait_until_closed(session=setup.session)
    assert (turn.status, turn.served_model) == (Turn.Status.FAILED, ALPHA)
    assert turn.cost == compute_cost(prompt_tokens=turn.prompt_tokens, completion_tokens=turn.completion_tokens,
                                     price=ModelPrice.objects.get(model=ALPHA)) > 0


@pytest.mark.parametrize("streamed", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("how", ["error", "timeout"])
def test_every_candidate_failing_costs_nothing(two_providers, streamed, how):
    setup = two_providers
    for server in (setup.alpha, setup.beta):
        server.enqueue(http_error(503, "down") if how == "error" else
                       (stalled_stream() if streamed else stalled_completion()))
    if streamed:
        response, _, raw = setup.stream()
    else:
        response = setup.turn()
        raw = response.content
    status, code = (502, "upstream_error") if how == "error" else (504, "upstream_timeout")
    assert response.status_code == status, raw
    assert json.loads(raw)["code"] == code
    turn = wait_until_closed(session=setup.session)
    assert (turn.status, turn.served_model, turn.cost) == (Turn.Status.FAILED, BETA, 0)  # the last one tried
    assert {e.model for e in _events(turn.id)} == {ALPHA, BETA}
    assert Wallet.objects.get(user=setup.user).balance == Decimal("10")


def _poorer(setup: Setup, make_user, credits: str) -> Setup:
    """The same providers, for a user with only `credits`."""
    from accounts.models import ApiKey

    user = make_user(f"poor{credits}", credits)
    _, raw = ApiKey.issue(user=user)
    session = ChatSession.objects.create(user=user, model=ALPHA)
    return dataclasses.replace(setup, user=user, key=raw, session=session)


def test_the_hold_is_sized_for_the_dearest_candidate(two_providers, make_user):
    # 0.1 credits afford m/alpha's least answer (about 0.04), not m/beta's (about 0.17): the
    # preflight refuses, as the fallback could be the one that answers.
    setup = _poorer(two_providers, make_user, "0.1")
    alone = setup.turn({"content": "Hi there", "models": []})
    assert alone.status_code == 201, alone.text
    with_fallback = setup.turn({"content": "Hi there"})
    assert with_fallback.status_code == 402, with_fallback.text
    body = with_fallback.json()
    assert body["code"] == "insufficient_credits" and Decimal(body["needed"]) > Decimal(body["available"])
    assert len(setup.alpha.chat_requests()) == 1 and setup.beta.chat_requests() == []
    assert Wallet.objects.get(user=setup.user).balance >= 0


def test_max_tokens_is_capped_by_the_dearest_candidate_and_sent_to_every_one(two_providers, make_user):
    setup = _poorer(two_providers, make_user, "1")
    assert setup.turn({"content": "Hi there", "max_tokens": 1000, "models": []}).status_code == 201
    alone = Turn.objects.get(session=setup.session).max_tokens
    setup.alpha.enqueue(http_error(502))
    response = setup.turn({"content": "Hi there", "max_tokens": 1000})
    assert response.status_code == 201, response.text
    turn = Turn.objects.get(pk=response.json()["turn"]["id"])
    sent = [setup.alpha.chat_requests()[-1].body["max_tokens"], setup.beta.chat_requests()[0].body["max_tokens"]]
    assert sent[0] == sent[1] == turn.max_tokens < alone < 1000
    # The dearer m/beta at that cap fits what the wallet had.
    beta = ModelPrice.objects.get(model=BETA)
    assert compute_cost(prompt_tokens=0, completion_tokens=turn.max_tokens, price=beta) < Decimal("1")
    assert Wallet.objects.get(user=setup.user).balance >= 0


def _metrics(setup: Setup) -> dict[str, float]:
    lines = httpx.get(f"{setup.base}/metrics").text.splitlines()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith("pantheon_")}


def test_a_cooldown_skips_a_dead_provider(two_providers, settings):
    settings.PANTHEON_COOLDOWN_FAILURES = 2
    settings.PANTHEON_COOLDOWN_SECONDS = 60
    setup = two_providers
    before = _metrics(setup)
    setup.alpha.enqueue(http_error(502), http_error(502))
    for _ in range(2):
        assert setup.turn().status_code == 201
    assert len(setup.alpha.chat_requests()) == 2
    for _ in range(3):  # alpha is not asked again while it cools down
        response = setup.turn()
        assert response.status_code == 201 and response.json()["turn"]["served_model"] == BETA
    assert len(setup.alpha.chat_requests()) == 2
    assert len(setup.beta.chat_requests()) == 5
    after = _metrics(setup)  # the counters are the process's: compare with before
    assert after.get('pantheon_model_cooldowns_total{model="m/alpha"}', 0) - \
        before.get('pantheon_model_cooldowns_total{model="m/alpha"}', 0) == 1
    assert after.get('pantheon_fallbacks_total{model="m/alpha"}', 0) - \
        before.get('pantheon_fallbacks_total{model="m/alpha"}', 0) == 2
    assert after['pantheon_model_cooldown_until_timestamp_seconds{model="m/alpha"}'] > time.time() + 50
    # The only candidate left is still tried, cooldown or not: a request is never refused for it.
    assert setup.turn({"content": "Hi there", "models": []}).status_code == 201
    assert len(setup.alpha.chat_requests()) == 3


def test_a_cooldown_ends(two_providers, settings):
    settings.PANTHEON_COOLDOWN_FAILURES = 1
    settings.PANTHEON_COOLDOWN_SECONDS = 0.5
    setup = two_providers
    setup.alpha.enqueue(http_error(502))
    assert setup.turn().json()["turn"]["served_model"] == BETA
    assert setup.turn().json()["turn"]["served_model"] == BETA
    assert len(setup.alpha.chat_requests()) == 1
    time.sleep(0.6)
    assert setup.turn().json()["turn"]["served_model"] == ALPHA
    assert len(setup.alpha.chat_requests()) == 2


@pytest.mark.parametrize("streamed", [False, True], ids=["plain", "stream"])
def test_a_wrong_provider_key_is_reported_as_the_provider_s_not_the_user_s(two_providers, streamed):
    setup = two_providers
    Provider.objects.filter(name="alpha").update(api_key="not-the-key")
    body = {"content": "Hi there", "models": []}
    if streamed:
        response, _, raw = setup.stream(body)
    else:
        response = setup.turn(body)
        raw = response.content
    assert response.status_code == 502, raw
    error = json.loads(raw)
    assert error["code"] == "upstream_error"
    assert "refused Pantheon's credentials" in error["detail"] and "'alpha'" in error["detail"]
    turn = wait_until_closed(session=setup.session)
    assert turn.error_message == error["detail"]
    # With a fallback, another provider answers.
    response = setup.turn()
    assert response.status_code == 201 and response.json()["turn"]["served_model"] == BETA


def test_a_provider_key_from_the_environment(two_providers, monkeypatch):
    setup = two_providers
    monkeypatch.setenv("PANTHEON_TEST_ALPHA_KEY", KEYS["alpha"])
    Provider.objects.filter(name="alpha").update(api_key="", api_key_env="PANTHEON_TEST_ALPHA_KEY")
    response = setup.turn()
    assert response.status_code == 201 and response.json()["turn"]["served_model"] == ALPHA
    assert setup.alpha.chat_requests()[0].headers["authorization"] == f"Bearer {KEYS['alpha']}"


def test_a_request_s_models_replace_the_configured_fallbacks(two_providers):
    setup = two_providers
    services.set_price(model="m/third", prompt_per_mtok=Decimal("1"), completion_per_mtok=Decimal("1"))
    ModelPrice.objects.filter(model="m/third").update(provider=Provider.objects.get(name="beta"),
                                                      upstream_model="third-upstream")
    setup.alpha.enqueue(http_error(502))
    response = setup.turn({"content": "Hi there", "models": ["m/third"]})
    assert response.status_code == 201 and response.json()["turn"]["served_model"] == "m/third"
    assert setup.beta.chat_requests()[0].body["model"] == "third-upstream"
    # Without `model`, the list's first is the model asked for.
    response = setup.turn({"content": "Hi there", "models": [BETA, ALPHA]})
    assert response.json()["turn"]["model"] == BETA and response.json()["turn"]["served_model"] == BETA
    # Every candidate must be priced, or nothing happens.
    refused = setup.turn({"content": "Hi there", "models": ["m/unpriced"]})
    assert refused.status_code == 400 and refused.json()["code"] == "unknown_model"
    assert "m/unpriced" in refused.json()["detail"]
    for bad in ("m/alpha", [""], [1], ["x"] * 17):
        refused = setup.turn({"content": "Hi there", "models": bad})
        assert refused.status_code == 400 and refused.json()["code"] == "invalid_models", bad
    assert Turn.objects.filter(session=setup.session).count() == 2


def test_a_client_leaving_during_fallbacks_leaves_a_cancelled_turn_that_costs_nothing(two_providers):
    setup = two_providers
    Provider.objects.filter(name="alpha").update(timeout_seconds=10)
    setup.alpha.enqueue(stalled_stream(8))
    with pytest.raises(httpx.ReadTimeout):  # the primary accepted and stalls: hang up meanwhile
        httpx.post(f"{setup.base}{stream_url(setup.session)}", json={"content": "Hi"}, headers=setup.headers,
                   timeout=0.5)
    turn = wait_until_closed(session=setup.session)
    assert (turn.status, turn.cost) == (Turn.Status.CANCELLED, 0)
    assert setup.beta.chat_requests() == []
    assert setup.alpha.disconnected.wait(5)  # the stalled upstream was closed


def test_the_openai_front_door_falls_back_and_names_the_served_model(two_providers):
    setup = two_providers
    client = setup.sdk()
    setup.alpha.enqueue(http_error(502))
    answer = client.chat.completions.create(model=ALPHA, messages=[{"role": "user", "content": "Hi"}])
    assert answer.model == BETA and answer.choices[0].message.content == "Hello from fake upstream"
    setup.alpha.enqueue(stalled_stream())
    chunks = list(client.chat.completions.create(model=ALPHA, messages=[{"role": "user", "content": "Hi"}],
                                                 stream=True))
    assert {chunk.model for chunk in chunks} == {BETA}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello from fake upstream"
    # The request's own list, OpenRouter's way.
    setup.alpha.enqueue(http_error(429, retry_after=0))
    answer = client.chat.completions.create(model=ALPHA, messages=[{"role": "user", "content": "Hi"}],
                                            extra_body={"models": [BETA]})
    assert answer.model == BETA
    with pytest.raises(openai.NotFoundError) as refused:
        client.chat.completions.create(model=ALPHA, messages=[{"role": "user", "content": "Hi"}],
                                       extra_body={"models": ["m/unpriced"]})
    assert refused.value.code == "model_not_found"
    with pytest.raises(openai.InternalServerError) as failed:  # no fallback left: the provider's 502
        setup.alpha.enqueue(http_error(502))
        client.chat.completions.create(model=ALPHA, messages=[{"role": "user", "content": "Hi"}],
                                       extra_body={"models": []})
    assert failed.value.status_code == 502


def test_concurrent_fallback_turns_keep_the_ledger_exact(two_providers):
    setup = two_providers
    setup.alpha.reply_with(lambda request: http_error(502))
    results = []

    def one():
        results.append(setup.turn({"content": "Hi there", "max_tokens": 50}).status_code)

    threads = [threading.Thread(target=one) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [201] * 8
    turns = Turn.objects.filter(session=setup.session)
    assert {t.served_model for t in turns} == {BETA}
    spent = sum(t.cost for t in turns)
    assert Wallet.objects.get(user=setup.user).balance == Decimal("10") - spent


def test_retries_and_fallbacks_stop_at_the_turn_s_time_limit(two_providers, settings):
    settings.PANTHEON_MAX_TURN_SECONDS = 3
    setup = two_providers
    setup.alpha.enqueue(stalled_stream())
    setup.beta.enqueue(stalled_stream())
    Provider.objects.update(timeout_seconds=2.5)  # 5 s in all: past the limit
    started = time.monotonic()
    response, _, raw = setup.stream()
    assert response.status_code == 504 and json.loads(raw)["code"] == "upstream_timeout"
    assert time.monotonic() - started < 4.5
    turn = wait_until_closed(session=setup.session)
    assert (turn.status, turn.cost) == (Turn.Status.FAILED, 0)


@pytest.mark.parametrize("path", ["turns", "turns/stream"])
def test_a_client_leaving_while_the_fallback_works_keeps_the_failed_attempt_s_record(two_providers, path):
    setup = two_providers
    Provider.objects.filter(name="beta").update(timeout_seconds=10)
    setup.alpha.enqueue(http_error(502, "bad gateway"))
    setup.beta.enqueue(stalled_stream(8) if path.endswith("stream") else stalled_completion(8))
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{setup.base}/api/v1/sessions/{setup.session.id}/{path}", json={"content": "Hi"},
                   headers=setup.headers, timeout=0.7)
    turn = wait_until_closed(session=setup.session)
    assert (turn.status, turn.served_model) == (Turn.Status.CANCELLED, BETA)
    events = _events(turn.id)
    assert [(e.model, e.status, e.http_status) for e in events] == [(ALPHA, "error", 502)]
    if path.endswith("stream"):
        assert turn.cost == 0  # nothing was produced
    else:  # the provider had the prompt: billed an estimate, at the served model's price
        assert turn.usage_estimated and turn.cost == compute_cost(
            prompt_tokens=turn.prompt_tokens, completion_tokens=0, price=ModelPrice.objects.get(model=BETA))


def test_a_configured_fallback_whose_price_was_deleted_is_skipped(two_providers):
    setup = two_providers
    ModelPrice.objects.filter(model=ALPHA).update(fallbacks=["m/deleted", BETA])
    setup.alpha.enqueue(http_error(502))
    response = setup.turn()
    assert response.status_code == 201 and response.json()["turn"]["served_model"] == BETA
