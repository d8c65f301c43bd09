"""Limits per key and per user (SPEC section 16, issue 17), through real servers.

Pantheon runs in a real uvicorn (`live_server_url`, or two worker processes from
`pantheon_server` where a limit must hold across processes); the model is the offline fake
(its words come `PANTHEON_FAKE_CHUNK_DELAY_SECONDS` apart, so streams can be made slow).
Concurrency is tested on PostgreSQL; the other tests run on SQLite too.
"""

from __future__ import annotations

import concurrent.futures
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import httpx
import openai
import pytest
from django.db import connection
from django.utils import timezone

from accounts.models import ApiKey
from billing_app.models import CreditHold, LedgerEntry, UsageRecord, Wallet
from sessions_app import limits
from sessions_app.models import Turn
from tests.conftest import MODEL
from tests.sessions_app.helpers import stream_url

postgres_only = pytest.mark.skipif(connection.vendor != "postgresql", reason="concurrency is tested on PostgreSQL")


def key_for(user, **limits_) -> tuple[ApiKey, str]:
    key, raw = ApiKey.issue(user=user, name="script")
    ApiKey.objects.filter(pk=key.pk).update(**limits_)
    key.refresh_from_db()
    return key, raw


def turn(base: str, session, raw: str, body: dict | None = None, *, stream: bool = False,
         headers: dict | None = None, timeout: float = 30) -> httpx.Response:
    """One turn; a stream is read to its end (its body is in `.content`)."""
    path = stream_url(session) if stream else f"/api/v1/sessions/{session.id}/turns"
    with httpx.Client(base_url=base, timeout=timeout) as http:
        response = http.post(path, json=body or {"content": "Hi"},
                             headers={"Authorization": f"Bearer {raw}", **(headers or {})})
        response.read()
        return response


def burst(count: int, call) -> list[httpx.Response]:
    with concurrent.futures.ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(lambda i: call(i), range(count)))


def _key_spend(key: ApiKey) -> Decimal:
    return sum((t.cost for t in Turn.objects.filter(api_key=key)), Decimal(0))


@pytest.fixture
def fast(settings):
    settings.PANTHEON_FAKE_CHUNK_DELAY_SECONDS = 0


# --- budget -----------------------------------------------------------------------------------

@postgres_only
def test_a_budget_holds_under_30_concurrent_streams(live_server_url, alice, session_of, fast):
    key, raw = key_for(alice, budget=Decimal("0.15"), budget_period="day")
    session = session_of(alice)
    wallet_before = Wallet.objects.get(user=alice).balance
    answers = burst(30, lambda i: turn(live_server_url, session, raw, {"content": "Hi", "max_tokens": 20},
                                       stream=True))
    statuses = [answer.status_code for answer in answers]
    assert set(statuses) <= {200, 402}, statuses
    assert 1 <= statuses.count(200) <= 4
    for answer in answers:
        if answer.status_code == 402:
            assert answer.json()["code"] == "key_budget_exceeded", answer.text
    spent = _key_spend(key)
    assert 0 < spent <= Decimal("0.15")
    assert Wallet.objects.get(user=alice).balance == wallet_before - spent
    assert not CreditHold.objects.open().exists()


@postgres_only
def test_a_budget_holds_across_two_worker_processes(pantheon_server, alice, session_of):
    key, raw = key_for(alice, budget=Decimal("0.15"), budget_period="total")
    session = session_of(alice)
    env = {"PANTHEON_FAKE_CHUNK_DELAY_SECONDS": "0.02"}
    servers = [pantheon_server(**env), pantheon_server(**env)]
    answers = burst(30, lambda i: turn(servers[i % 2].url, session, raw, {"content": "Hi", "max_tokens": 20},
                                       stream=True))
    statuses = [answer.status_code for answer in answers]
    assert set(statuses) <= {200, 402} and statuses.count(200) >= 1, statuses
    wait_for_no_running(key)
    assert _key_spend(key) <= Decimal("0.15")


def wait_for_no_running(key: ApiKey, timeout: float = 15) -> None:
    import time

    deadline = time.monotonic() + timeout
    while Turn.objects.filter(api_key=key, status=Turn.Status.RUNNING).exists():
        assert time.monotonic() < deadline, "turns still running"
        time.sleep(0.05)


def test_a_budget_caps_max_tokens_and_refuses_when_spent(live_server_url, alice, session_of, fast):
    key, raw = key_for(alice, budget=Decimal("0.05"), budget_period="day")
    session = session_of(alice)
    first = turn(live_server_url, session, raw)
    assert first.status_code == 201, first.text
    capped = Turn.objects.get(pk=first.json()["turn"]["id"])
    # 0.05 credits at 1000/2000 per million tokens: the hold covers fewer than 25 output tokens.
    assert capped.max_tokens < 25
    while True:
        answer = turn(live_server_url, session, raw)
        if answer.status_code != 201:
            break
    assert answer.status_code == 402
    body = answer.json()
    assert body["code"] == "key_budget_exceeded"
    assert Decimal(body["available"]) < Decimal(body["needed"])
    assert _key_spend(key) <= Decimal("0.05")


def test_when_the_wallet_and_the_budget_are_both_short_the_402_is_the_wallet_s(
        live_server_url, make_user, session_of, fast):
    poor = make_user("poor", "0.01")
    _, raw = key_for(poor, budget=Decimal("0.001"), budget_period="day")
    answer = turn(live_server_url, session_of(poor), raw)
    assert answer.status_code == 402 and answer.json()["code"] == "insufficient_credits"


def test_budget_periods_roll_over(alice, session_of, price):
    """With an injected clock: yesterday's spend does not count today; a week starts on
    Monday, a month on its first, `total` never."""
    key, _ = key_for(alice, budget=Decimal("1"), budget_period="day")
    session = session_of(alice)
    now = datetime(2026, 12, 2, 0, 0, 5, tzinfo=UTC)  # a Wednesday, just after midnight
    for finished, cost in ((now - timedelta(seconds=10), "0.4"), (now - timedelta(days=3), "0.3")):
        Turn.objects.create(session=session, user=alice, api_key=key, status=Turn.Status.COMPLETED, model=MODEL,
                            cost=Decimal(cost), created_at=finished, finished_at=finished)

    def left(period: str) -> Decimal:
        ApiKey.objects.filter(pk=key.pk).update(budget_period=period)
        limits_ = limits.KeyLimits(id=key.id, budget=Decimal("1"), budget_period=period)
        return limits.admit(user_id=alice.pk, key=limits_, now=now).budget_left

    assert left("day") == Decimal("1")  # both were before today
    assert left("week") == Decimal("0.6")  # Monday 30 Nov 00:00 on: not Sunday 29th
    assert left("month") == Decimal("0.6")  # 1 Dec on
    assert left("total") == Decimal("0.3")
    assert left("day") == Decimal("1")


# --- rpm, max_parallel, tpm -----------------------------------------------------------------------

@postgres_only
def test_max_parallel_admits_exactly_that_many_at_a_time(live_server_url, alice, session_of, settings):
    settings.PANTHEON_FAKE_CHUNK_DELAY_SECONDS = 0.2  # each stream takes a few seconds
    key, raw = key_for(alice, max_parallel=2)
    session = session_of(alice)
    answers = burst(10, lambda i: turn(live_server_url, session, raw, stream=True))
    statuses = sorted(answer.status_code for answer in answers)
    assert statuses == [200, 200] + [429] * 8, statuses
    for answer in answers:
        if answer.status_code == 429:
            assert answer.json()["code"] == "rate_limited" and int(answer.headers["Retry-After"]) >= 1
    wait_for_no_running(key)
    assert turn(live_server_url, session, raw, stream=True).status_code == 200  # free again


@postgres_only
def test_rpm_admits_exactly_that_many_in_a_burst_across_two_workers(pantheon_server, alice, session_of):
    key, raw = key_for(alice, rpm=5)
    session = session_of(alice)
    env = {"PANTHEON_FAKE_CHUNK_DELAY_SECONDS": "0"}
    servers = [pantheon_server(**env), pantheon_server(**env)]
    answers = burst(20, lambda i: turn(servers[i % 2].url, session, raw))
    statuses = sorted(answer.status_code for answer in answers)
    assert statuses == [201] * 5 + [429] * 15, statuses
    refused = next(answer for answer in answers if answer.status_code == 429)
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert refused.headers["x-ratelimit-limit-requests"] == "5"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert Turn.objects.filter(api_key=key).count() == 5


def test_rpm_headers_on_every_turn_answer(live_server_url, alice, session_of, fast):
    _, raw = key_for(alice, rpm=3, tpm=100000)
    session = session_of(alice)
    first = turn(live_server_url, session, raw)
    assert first.headers["x-ratelimit-limit-requests"] == "3"
    assert first.headers["x-ratelimit-remaining-requests"] == "2"
    assert first.headers["x-ratelimit-reset-requests"].endswith("s")
    assert first.headers["x-ratelimit-limit-tokens"] == "100000"
    assert int(first.headers["x-ratelimit-remaining-tokens"]) < 100000
    streamed = turn(live_server_url, session, raw, stream=True)
    assert streamed.headers["x-ratelimit-remaining-requests"] == "1"
    client = openai.OpenAI(base_url=f"{live_server_url}/v1", api_key=raw, max_retries=0)
    answer = client.chat.completions.with_raw_response.create(model=MODEL, messages=[{"role": "user",
                                                                                      "content": "Hi"}])
    assert answer.headers["x-ratelimit-remaining-requests"] == "0"
    refused = turn(live_server_url, session, raw)
    assert refused.status_code == 429 and refused.headers["x-ratelimit-remaining-requests"] == "0"
    with pytest.raises(openai.RateLimitError) as error:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}])
    assert error.value.code == "rate_limited"
    assert int(error.value.response.headers["Retry-After"]) >= 1


@postgres_only
def test_tpm_admits_by_reservation_and_frees_by_real_counts(live_server_url, alice, session_of, settings):
    settings.PANTHEON_FAKE_CHUNK_DELAY_SECONDS = 0.15
    key, raw = key_for(alice, tpm=250)
    session = session_of(alice)
    body = {"content": "Hi", "max_tokens": 100}  # a reservation of about 110 tokens
    answers = burst(6, lambda i: turn(live_server_url, session, raw, body, stream=True))
    statuses = sorted(answer.status_code for answer in answers)
    assert statuses == [200, 200, 429, 429, 429, 429], statuses
    wait_for_no_running(key)
    # Closed, the two count their real tokens (a few dozen each), not their reservations:
    # more turns fit in the same minute, until real counts and the next reservation pass 250.
    settings.PANTHEON_FAKE_CHUNK_DELAY_SECONDS = 0
    admitted = 0
    while turn(live_server_url, session, raw, body).status_code == 201:
        admitted += 1
        assert admitted < 10
    assert admitted >= 1
    counted = sum(t.prompt_tokens + t.completion_tokens for t in Turn.objects.filter(api_key=key))
    assert counted <= 250


def test_user_wide_limits_count_every_key_and_the_browser(live_server_url, alice, session_of, settings, fast):
    settings.PANTHEON_USER_RPM = 2
    session = session_of(alice)
    _, one = key_for(alice)
    _, two = key_for(alice)
    assert turn(live_server_url, session, one).status_code == 201
    assert turn(live_server_url, session, two).status_code == 201
    refused = turn(live_server_url, session, one)
    assert refused.status_code == 429 and refused.json()["code"] == "rate_limited"
    assert int(refused.headers["Retry-After"]) >= 1


# --- allow-list, expiry, idempotency ----------------------------------------------------------

def test_an_allow_list_refuses_other_models_everywhere(live_server_url, alice, session_of, fast):
    from billing_app import services

    services.set_price(model="other/model", prompt_per_mtok=Decimal("1"), completion_per_mtok=Decimal("1"))
    _, raw = key_for(alice, allowed_models=[MODEL])
    session = session_of(alice)
    assert turn(live_server_url, session, raw).status_code == 201
    for body in ({"content": "Hi", "model": "other/model"}, {"content": "Hi", "models": ["other/model"]}):
        for stream in (False, True):
            refused = turn(live_server_url, session, raw, body, stream=stream)
            assert refused.status_code == 403 and refused.json()["code"] == "model_not_allowed", refused.text
    headers = {"Authorization": f"Bearer {raw}"}
    created = httpx.post(f"{live_server_url}/api/v1/sessions", json={"model": "other/model"}, headers=headers)
    assert created.status_code == 403 and created.json()["code"] == "model_not_allowed"
    client = openai.OpenAI(base_url=f"{live_server_url}/v1", api_key=raw, max_retries=0)
    assert [m.id for m in client.models.list()] == [MODEL]
    with pytest.raises(openai.PermissionDeniedError) as error:
        client.chat.completions.create(model="other/model", messages=[{"role": "user", "content": "Hi"}])
    assert error.value.code == "model_not_allowed"
    assert Turn.objects.filter(model="other/model").count() == 0


def test_an_allow_list_skips_configured_fallbacks_outside_it(alice, session_of, price):
    from billing_app import services
    from billing_app.models import ModelPrice
    from tests.sessions_app.helpers import begun_turn

    services.set_price(model="fallback/model", prompt_per_mtok=Decimal("1"), completion_per_mtok=Decimal("1"))
    ModelPrice.objects.filter(model=MODEL).update(fallbacks=["fallback/model"])
    key, _ = key_for(alice, allowed_models=[MODEL])
    from sessions_app.turns import TurnInput, begin_turn, load_preflight

    session = session_of(alice)
    free = begun_turn(alice, session)
    assert [route.model for route in free.routes] == [MODEL, "fallback/model"]
    preflight = load_preflight(session_id=session.pk, model=None, key_hash=key.key_hash)
    limited = begin_turn(preflight, TurnInput(content="q"), streamed=False)
    assert [route.model for route in limited.routes] == [MODEL]
    from sessions_app.turns import TurnOutcome, close_turn

    for prepared in (free, limited):
        close_turn(prepared.turn_id, TurnOutcome(status=Turn.Status.CANCELLED))


def test_an_expired_key_is_a_401_everywhere(live_server_url, alice, session_of, fast):
    _, raw = key_for(alice, expires_at=timezone.now() - timedelta(seconds=1))
    session = session_of(alice)
    headers = {"Authorization": f"Bearer {raw}"}
    for stream in (False, True):
        assert turn(live_server_url, session, raw, stream=stream).status_code == 401
    assert httpx.get(f"{live_server_url}/api/v1/sessions", headers=headers).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{live_server_url}/v1", api_key=raw, max_retries=0).models.list()
    assert not Turn.objects.exists()


def test_a_refused_request_does_not_use_up_its_idempotency_key(live_server_url, alice, session_of, fast):
    key, raw = key_for(alice, budget=Decimal("0.000001"), budget_period="day")
    session = session_of(alice)
    headers = {"Idempotency-Key": "once-only"}
    refused = turn(live_server_url, session, raw, headers=headers)
    assert refused.status_code == 402 and refused.json()["code"] == "key_budget_exceeded"
    ApiKey.objects.filter(pk=key.pk).update(budget=Decimal("5"))
    admitted = turn(live_server_url, session, raw, headers=headers)
    assert admitted.status_code == 201, admitted.text
    repeat = turn(live_server_url, session, raw, headers=headers)
    assert repeat.json()["turn"]["id"] == admitted.json()["turn"]["id"]
    assert Turn.objects.count() == 1


def test_turns_and_usage_records_say_which_key_made_them(live_server_url, alice, session_of, fast):
    key, raw = key_for(alice)
    session = session_of(alice)
    made = turn(live_server_url, session, raw).json()["turn"]["id"]
    assert Turn.objects.get(pk=made).api_key_id == key.id
    assert UsageRecord.objects.get(turn_id=made).api_key_id == key.id
    client = openai.OpenAI(base_url=f"{live_server_url}/v1", api_key=raw, max_retries=0)
    answer = client.chat.completions.with_raw_response.create(model=MODEL, messages=[{"role": "user",
                                                                                      "content": "Hi"}])
    facade = answer.headers["X-Pantheon-Turn-Id"]
    assert Turn.objects.get(pk=facade).api_key_id == key.id


def test_no_limits_no_extra_statement(alice, session_of, price, django_assert_max_num_queries):
    """A key without limits (and no user limits): the preflight's transaction is as before."""
    from sessions_app.turns import TurnInput, TurnOutcome, begin_turn, close_turn, load_preflight

    session = session_of(alice)
    key, _ = key_for(alice)
    limited, _ = key_for(alice, rpm=100)
    counts = {}
    for which in (key, limited):
        preflight = load_preflight(session_id=session.pk, model=None, key_hash=which.key_hash)
        from django.test.utils import CaptureQueriesContext

        with CaptureQueriesContext(connection) as queries:
            prepared = begin_turn(preflight, TurnInput(content="q"), streamed=False)
        counts[which.pk] = len(queries)
        close_turn(prepared.turn_id, TurnOutcome(status=Turn.Status.CANCELLED))
    assert counts[limited.pk] == counts[key.pk] + 2  # the lock and the counts: one round trip, pipelined


def test_ledger_and_key_spend_agree(live_server_url, alice, session_of, fast):
    key, raw = key_for(alice, budget=Decimal("1"), budget_period="month")
    session = session_of(alice)
    for _ in range(3):
        assert turn(live_server_url, session, raw).status_code == 201
    debited = -sum(e.amount for e in LedgerEntry.objects.filter(kind="debit", turn_id__in=Turn.objects.filter(
        api_key=key).values("id")))
    assert debited == _key_spend(key) > 0
