"""Non-streaming turns, end to end through the loopback OpenRouter server."""

import asyncio
import uuid
from decimal import Decimal

import httpx
import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from billing_app.models import CreditHold, LedgerEntry, UsageRecord, Wallet
from billing_app.selectors import ledger_problems
from sessions_app.models import LlmEvent, Message, Turn
from sessions_app.turns import TurnOutcome, build_context, close_turn, load_preflight
from tests.conftest import MODEL, client_for
from tests.sessions_app.helpers import begun_turn, wait_until_closed

pytestmark = pytest.mark.usefixtures("fake_openrouter_settings")


def post_turn(client, session, **body):
    return client.post(f"/api/v1/sessions/{session.id}/turns", {"content": "Hi there", **body}, format="json")


def test_turn_answers_and_pays(alice, alice_api, session_of, fake_openrouter):
    session = session_of(alice)
    fake_openrouter.enqueue(fake_openrouter.completion("Hello Alice", usage=(12, 7)))
    response = post_turn(alice_api, session)
    assert response.status_code == 201, response.content
    body = response.json()
    assert set(body) == {"turn", "message", "usage", "cost", "balance"}
    # 12 * 1000/1e6 + 7 * 2000/1e6 = 0.012 + 0.014
    assert body["cost"] == "0.026000" and body["balance"] == "9.974000"
    assert body["usage"] == {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19, "estimated": False,
                             "reconciled": False}
    assert body["message"]["role"] == "assistant" and body["message"]["content"] == "Hello Alice"
    turn = body["turn"]
    assert turn["status"] == "completed" and turn["model"] == MODEL
    assert turn["provider_model"] == fake_openrouter.DEFAULT_MODEL
    assert turn["cost"] == "0.026000" and turn["session_id"] == str(session.id)

    stored = Turn.objects.get(pk=turn["id"])
    assert [(m.role, m.content) for m in stored.messages.order_by("position")] == [
        ("user", "Hi there"), ("assistant", "Hello Alice")]
    debit = LedgerEntry.objects.get(turn_id=stored.id)
    assert (debit.kind, debit.amount, debit.balance_after) == ("debit", Decimal("-0.026"), Decimal("9.974"))
    usage = UsageRecord.objects.get(turn_id=stored.id)
    assert (usage.prompt_tokens, usage.completion_tokens, usage.cost) == (12, 7, Decimal("0.026"))
    event = LlmEvent.objects.get(turn=stored)
    assert (event.status, event.http_status, event.prompt_tokens, event.completion_tokens) == ("ok", 200, 12, 7)
    assert event.provider_model == fake_openrouter.DEFAULT_MODEL and event.requested_model == MODEL
    assert not CreditHold.objects.open().exists()
    sent = fake_openrouter.requests[-1]
    assert sent.headers["authorization"] == "Bearer test-key"
    assert sent.body["model"] == MODEL and 0 < sent.body["max_tokens"] <= 1024


def test_turn_requests_an_explicit_capped_max_tokens(alice, alice_api, session_of, fake_openrouter):
    post_turn(alice_api, session_of(alice), max_tokens=50)
    assert fake_openrouter.requests[-1].body["max_tokens"] == 50
    post_turn(alice_api, session_of(alice), max_tokens=10**6)
    assert fake_openrouter.requests[-1].body["max_tokens"] == 1024


def test_insufficient_credits_is_402_and_stores_nothing(make_user, session_of, fake_openrouter):
    user = make_user("poor", "0.001")
    client = client_for(user)
    response = post_turn(client, session_of(user))
    assert response.status_code == 402 and response.json()["code"] == "insufficient_credits"
    assert not Turn.objects.exists() and not CreditHold.objects.exists()
    assert LedgerEntry.objects.filter(user=user).count() == 1  # only the grant
    assert fake_openrouter.requests == []


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"content": ""}, "empty_content"),
        ({"content": "   "}, "empty_content"),
        ({"content": "x" * 40000}, "content_too_long"),
        ({"content": 5}, "invalid_content"),
        ({"content": "hi", "max_tokens": "ten"}, "invalid_max_tokens"),
        ({"content": "hi", "max_tokens": 0}, "invalid_max_tokens"),
        ({"content": "hi", "tools_enabled": "yes"}, "invalid_tools_enabled"),
        ({"content": "hi", "model": "nobody/knows"}, "unknown_model"),
        ({"content": "hi", "model": 7}, "invalid_model"),
    ],
)
def test_invalid_turn_bodies_are_400(alice, alice_api, session_of, fake_openrouter, body, code):
    response = alice_api.post(f"/api/v1/sessions/{session_of(alice).id}/turns", body, format="json")
    assert response.status_code == 400 and response.json()["code"] == code
    assert fake_openrouter.requests == [] and not CreditHold.objects.exists()


def test_malformed_json_turn_is_400(alice, alice_api, session_of):
    response = alice_api.generic("POST", f"/api/v1/sessions/{session_of(alice).id}/turns", b"{oops",
                                 content_type="application/json")
    assert response.status_code == 400 and response.json()["code"] == "parse_error"


def test_other_users_session_is_404_and_no_auth_is_401(alice, bob_api, session_of):
    session = session_of(alice)
    response = post_turn(bob_api, session)
    assert response.status_code == 404 and response.json()["code"] == "not_found"
    assert post_turn(bob_api, type("S", (), {"id": uuid.uuid4()})).status_code == 404
    from rest_framework.test import APIClient

    assert post_turn(APIClient(), session).status_code == 401


@pytest.mark.parametrize(("reply", "status", "code"), [
    ("http_error_500", 502, "upstream_error"),
    ("timeout", 504, "upstream_timeout"),
])
def test_upstream_failures_map_to_502_504_and_store_a_failed_turn(alice, alice_api, session_of, fake_openrouter,
                                                                   settings, reply, status, code):
    settings.PANTHEON_UPSTREAM_TIMEOUT_SECONDS = 0.5
    if reply == "timeout":
        fake_openrouter.enqueue(fake_openrouter.completion("late", delay=2))
    else:
        fake_openrouter.enqueue(fake_openrouter.http_error(500, "boom"))
    response = post_turn(alice_api, session_of(alice))
    assert response.status_code == status and response.json()["code"] == code
    turn = Turn.objects.get()
    assert turn.status == "failed" and turn.cost == 0 and turn.error_code == code
    assert str(turn.id) == response.json()["turn_id"]
    assert Wallet.objects.get(user=alice).balance == Decimal("10")
    assert not CreditHold.objects.open().exists()
    assert LlmEvent.objects.get(turn=turn).status == "error"


def test_429_is_retried_once_then_succeeds(alice, alice_api, session_of, fake_openrouter):
    fake_openrouter.enqueue(fake_openrouter.http_error(429, "slow down", retry_after=0),
                            fake_openrouter.completion("second time lucky"))
    response = post_turn(alice_api, session_of(alice))
    assert response.status_code == 201 and response.json()["message"]["content"] == "second time lucky"
    assert len(fake_openrouter.requests) == 2
    events = LlmEvent.objects.order_by("created_at")
    assert [(e.status, e.http_status) for e in events] == [("error", 429), ("ok", 200)]


def test_context_sends_system_prompt_and_history_oldest_dropped_first(alice, alice_api, session_of,
                                                                      fake_openrouter, settings):
    session = session_of(alice, system_prompt="You are terse.")
    for i in range(3):
        fake_openrouter.enqueue(fake_openrouter.completion(f"answer {i}"))
        assert post_turn(alice_api, session, content=f"question {i}").status_code == 201
    sent = fake_openrouter.requests[-1].body["messages"]
    assert sent == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "question 0"}, {"role": "assistant", "content": "answer 0"},
        {"role": "user", "content": "question 1"}, {"role": "assistant", "content": "answer 1"},
        {"role": "user", "content": "question 2"},
    ]
    # A budget that fits the system prompt, the new message and two earlier messages.
    from llm_gateway.tokens import estimate_prompt_tokens

    fixed = estimate_prompt_tokens([{"role": "system", "content": "You are terse."},
                                    {"role": "user", "content": "question 3"}])
    one = estimate_prompt_tokens([{"role": "user", "content": "question 2"}])
    settings.PANTHEON_CONTEXT_BUDGET_TOKENS = fixed + 2 * one
    history = load_preflight(session_id=session.pk, model=None, user_id=alice.pk).history
    context = build_context(session.system_prompt, history, "question 3")
    assert context == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "question 2"}, {"role": "assistant", "content": "answer 2"},
        {"role": "user", "content": "question 3"},
    ]


def test_close_turn_uses_a_fixed_number_of_queries(alice, session_of):
    session = session_of(alice)
    from llm_gateway import CallRecord, Usage

    counts = []
    for length in (1, 1, 300):  # the first queues the session's title: measured after it
        prepared = begun_turn(alice, session)
        outcome = TurnOutcome(status="completed", content="a" * length, usage=Usage(5, 5),
                              records=[CallRecord(requested_model=MODEL, usage=Usage(5, 5))] * min(length, 3))
        with CaptureQueriesContext(connection) as queries:
            close_turn(prepared.turn_id, outcome, price=prepared.price)
        counts.append(len(queries))
    assert counts[1] == counts[2], counts
    assert Message.objects.count() == 6


def test_close_turn_is_idempotent(alice, session_of):
    from llm_gateway import Usage

    prepared = begun_turn(alice, session_of(alice))
    first = close_turn(prepared.turn_id, TurnOutcome(status="completed", content="x", usage=Usage(100, 100)))
    second = close_turn(prepared.turn_id, TurnOutcome(status="cancelled", content="y", usage=Usage(1, 1)))
    assert second.turn.pk == first.turn.pk and second.turn.status == "completed"
    assert second.message.content == "x"
    assert LedgerEntry.objects.filter(turn_id=prepared.turn_id).count() == 1
    assert second.balance == first.balance == Decimal("9.7")


@pytest.mark.skipif(connection.vendor != "postgresql", reason="concurrency is tested on PostgreSQL")
def test_twenty_concurrent_turns_on_a_wallet_that_affords_three(make_user, session_of, live_server_url,
                                                                 fake_openrouter, settings):
    settings.PANTHEON_MAX_OUTPUT_TOKENS = 100
    settings.PANTHEON_MIN_OUTPUT_TOKENS = 100
    user = make_user("racer", "0.75")  # each hold is ~0.2 + prompt: three fit, the fourth does not
    client = client_for(user)
    session = session_of(user)
    for _ in range(20):
        fake_openrouter.enqueue(fake_openrouter.completion("ok", usage=(30, 100), delay=0.3))

    async def run_all():
        async with httpx.AsyncClient(base_url=live_server_url, timeout=30,
                                     headers={"Authorization": f"Bearer {client.raw_key}"}) as http:
            return await asyncio.gather(*[
                http.post(f"/api/v1/sessions/{session.id}/turns", json={"content": f"go {i}"}) for i in range(20)
            ])

    responses = asyncio.run(run_all())
    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(201) >= 3 and set(statuses) <= {201, 402}, statuses
    assert statuses.count(201) == 3, statuses
    wallet = Wallet.objects.get(user=user)
    assert wallet.balance >= 0
    assert not CreditHold.objects.open().exists()
    assert ledger_problems(user_ids=[user.pk], allow_open_holds=False) == []
    assert Turn.objects.filter(user=user, status="completed").count() == 3


def test_client_leaving_a_non_streaming_turn_stores_it_cancelled(alice, session_of, live_server_url, fake_openrouter):
    key = client_for(alice).raw_key
    session = session_of(alice)
    fake_openrouter.enqueue(fake_openrouter.completion("too late", delay=3))
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{live_server_url}/api/v1/sessions/{session.id}/turns", json={"content": "hello"},
                   headers={"Authorization": f"Bearer {key}"}, timeout=0.5)
    turn = wait_until_closed()
    assert turn.status == "cancelled" and turn.usage_estimated
    assert not CreditHold.objects.open().exists()
    assert ledger_problems(user_ids=[alice.pk]) == []


def test_a_body_over_the_request_size_limit_is_a_json_400(alice, alice_api, session_of, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    response = alice_api.post(f"/api/v1/sessions/{session_of(alice).id}/turns", {"content": "x" * 5000},
                              format="json")
    assert response.status_code == 400 and response.json()["code"] == "bad_request"


@pytest.mark.open_holds_ok
def test_the_preflight_uses_a_fixed_number_of_queries(alice, session_of):
    """Whatever the history's length (a joined read, the history, the hold, the inserts)."""
    from llm_gateway import Usage

    session = session_of(alice)
    counts = []
    for _ in range(2):
        with CaptureQueriesContext(connection) as queries:
            prepared = begun_turn(alice, session)
        counts.append(len(queries))
        close_turn(prepared.turn_id, TurnOutcome(status="completed", content="a", usage=Usage(1, 1)))
        Message.objects.bulk_create([
            Message(session=session, turn_id=prepared.turn_id, user=alice, role="assistant", content=f"m{i}",
                    position=10 + i) for i in range(150)])
    assert counts[0] == counts[1], counts


@pytest.mark.django_db(transaction=True)
def test_a_session_deleted_while_its_preflight_runs_is_a_404_not_a_500(alice, session_of):
    from sessions_app.turns import TurnInput, TurnRejected, begin_turn

    session = session_of(alice)
    preflight = load_preflight(session_id=session.pk, model=None, user_id=alice.pk)
    session.delete()  # between the preflight's read and its transaction
    with pytest.raises(TurnRejected) as refused:
        begin_turn(preflight, TurnInput(content="hi"), streamed=True)
    assert refused.value.code == "not_found"
    assert not Turn.objects.exists() and not CreditHold.objects.exists()
    assert Wallet.objects.get(user=alice).held == 0


def test_the_turn_as_begun_is_the_row_its_close_would_lock(alice, session_of):
    """close_turn(..., as_begun=) skips the locking read: what it is given instead must be
    what that read finds, field for field."""
    from core import sql
    from sessions_app.turns import _lock_turn

    prepared = begun_turn(alice, session_of(alice, title="Named"), "q", max_tokens=50)
    with sql.transaction():
        locked = _lock_turn(prepared.turn_id)
    assert prepared.as_begun == locked
    close_turn(prepared.turn_id, TurnOutcome(status=Turn.Status.CANCELLED))
