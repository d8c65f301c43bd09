"""Idempotent turn requests (SPEC section 11, issue 11): `Idempotency-Key` on both turn
endpoints, through a real uvicorn server."""

from __future__ import annotations

from decimal import Decimal

import httpx
import pytest
from django.db import connection

from billing_app import services
from billing_app.models import LedgerEntry, Wallet
from sessions_app.models import IdempotencyKey, Turn
from tests.conftest import client_for, in_threads
from tests.fake_openrouter import completion
from tests.sessions_app.helpers import auth, read_stream, stream_url
from tests.sessions_app.test_resume import Events, deltas

pytestmark = pytest.mark.usefixtures("fake_openrouter_settings")
postgres_only = pytest.mark.skipif(connection.vendor != "postgresql", reason="concurrency is tested on PostgreSQL")


def turns_url(session) -> str:
    return f"/api/v1/sessions/{session.id}/turns"


@pytest.fixture
def alice_key(alice):
    return auth(client_for(alice))


def post(base, session, headers, body, key):
    with httpx.Client(base_url=base, timeout=30) as http:
        return http.post(turns_url(session), json=body, headers={**headers, "Idempotency-Key": key})


def test_a_repeated_post_answers_the_first_answer_and_pays_once(alice, alice_key, session_of, live_server_url,
                                                                fake_openrouter):
    session = session_of(alice)
    first = post(live_server_url, session, alice_key, {"content": "hi"}, "k-1")
    second = post(live_server_url, session, alice_key, {"content": "hi"}, "k-1")
    assert first.status_code == second.status_code == 201
    assert first.json() == second.json()
    assert Turn.objects.count() == 1 and len(fake_openrouter.requests) == 1
    assert LedgerEntry.objects.filter(kind="debit").count() == 1
    assert Wallet.objects.get(user=alice).balance == Decimal("10") - Turn.objects.get().cost


def test_the_same_key_with_another_body_is_422_and_a_new_key_is_a_new_turn(alice, alice_key, session_of,
                                                                           live_server_url):
    session = session_of(alice)
    assert post(live_server_url, session, alice_key, {"content": "hi"}, "k-2").status_code == 201
    reused = post(live_server_url, session, alice_key, {"content": "something else"}, "k-2")
    assert reused.status_code == 422 and reused.json()["code"] == "idempotency_key_reused"
    assert post(live_server_url, session, alice_key, {"content": "hi"}, "k-3").status_code == 201
    assert Turn.objects.count() == 2


def test_a_refused_request_does_not_use_up_its_key(alice, alice_key, session_of, live_server_url, make_user):
    session = session_of(alice)
    bad = post(live_server_url, session, alice_key, {"content": ""}, "k-4")
    assert bad.status_code == 400
    assert post(live_server_url, session, alice_key, {"content": "hi"}, "k-4").status_code == 201
    poor = make_user("poor")
    poor_key, poor_session = auth(client_for(poor)), session_of(poor)
    refused = post(live_server_url, poor_session, poor_key, {"content": "hi"}, "k-5")
    assert refused.status_code == 402
    services.grant(user_id=poor.pk, amount=Decimal("1"))
    assert post(live_server_url, poor_session, poor_key, {"content": "hi"}, "k-5").status_code == 201
    assert IdempotencyKey.objects.count() == 2


@pytest.mark.parametrize("key", ["", "x" * 201, "clé", "tab\there"])
def test_a_malformed_key_is_400(alice, alice_key, session_of, live_server_url, key):
    session = session_of(alice)
    with httpx.Client(base_url=live_server_url, timeout=30) as http:
        answer = http.post(turns_url(session), json={"content": "hi"},
                           headers={**alice_key, "Idempotency-Key": key.encode("utf-8")})
    assert answer.status_code == 400 and answer.json()["code"] == "invalid_idempotency_key"
    assert Turn.objects.count() == 0


def test_keys_belong_to_their_user(alice, bob, alice_key, session_of, live_server_url):
    alice_session = session_of(alice)
    first = post(live_server_url, alice_session, alice_key, {"content": "hi"}, "shared")
    bob_answer = post(live_server_url, session_of(bob), auth(client_for(bob)), {"content": "hi"}, "shared")
    repeat = post(live_server_url, alice_session, alice_key, {"content": "hi"}, "shared")
    assert first.status_code == bob_answer.status_code == repeat.status_code == 201
    assert bob_answer.json()["turn"]["id"] != first.json()["turn"]["id"] == repeat.json()["turn"]["id"]
    assert Turn.objects.filter(user=alice).count() == 1 and Turn.objects.filter(user=bob).count() == 1


def test_a_repeated_stream_replays_the_first_turns_events(alice, alice_key, session_of, live_server_url,
                                                          fake_openrouter):
    session = session_of(alice)
    headers = {**alice_key, "Idempotency-Key": "s-1"}
    _, first, _ = read_stream(live_server_url, session, headers, {"content": "hi"})
    _, second, _ = read_stream(live_server_url, session, headers, {"content": "hi"})
    assert first[0][1]["turn_id"] == second[0][1]["turn_id"]
    assert [(e, i) for e, _, i in first] == [(e, i) for e, _, i in second]
    assert deltas(first) == deltas(second) and second[-1][0] == "done"
    assert Turn.objects.count() == 1 and len(fake_openrouter.requests) == 1
    assert LedgerEntry.objects.filter(kind="debit").count() == 1


def test_a_repeat_while_the_first_stream_runs_follows_it_live(alice, alice_key, session_of, live_server_url,
                                                             fake_openrouter):
    session = session_of(alice)
    fake_openrouter.enqueue(fake_openrouter.slow_stream(pieces=30, delay=0.03))
    headers = {**alice_key, "Idempotency-Key": "s-2"}
    body = {"content": "long", "resumable": True}
    with httpx.Client(base_url=live_server_url, timeout=30) as http:
        with http.stream("POST", stream_url(session), json=body, headers=headers) as response:
            Events(response).next()  # the network drops after `start`
        with http.stream("POST", stream_url(session), json=body, headers=headers) as response:
            again = Events(response).rest()
    turn = Turn.objects.get()
    assert again[0][0] == "start" and again[0][1]["turn_id"] == str(turn.pk)
    assert again[-1][0] == "done" and again[-1][1]["status"] == "completed"
    assert deltas(again) == turn.messages.get(role="assistant").content
    assert len(fake_openrouter.requests) == 1


@postgres_only
def test_concurrent_repeats_make_one_turn_one_model_call_and_one_debit(alice, alice_key, session_of,
                                                                       live_server_url, fake_openrouter):
    session = session_of(alice)
    fake_openrouter.reply_with(lambda request: completion("slow answer", delay=0.3))
    answers = in_threads(lambda _: post(live_server_url, session, alice_key, {"content": "hi"}, "race"), 8,
                         workers=8)
    assert {a.status_code for a in answers} == {201}
    assert len({a.json()["turn"]["id"] for a in answers}) == 1
    assert Turn.objects.count() == 1 and len(fake_openrouter.requests) == 1
    assert LedgerEntry.objects.filter(kind="debit").count() == 1


@postgres_only
def test_concurrent_streamed_repeats_make_one_turn(alice, alice_key, session_of, live_server_url, fake_openrouter):
    session = session_of(alice)
    headers = {**alice_key, "Idempotency-Key": "race-stream"}
    results = in_threads(lambda _: read_stream(live_server_url, session, headers, {"content": "hi"})[1], 6,
                         workers=6)
    assert len({events[0][1]["turn_id"] for events in results}) == 1
    assert all(events[-1][0] == "done" for events in results)
    assert Turn.objects.count() == 1 and len(fake_openrouter.requests) == 1
    assert LedgerEntry.objects.filter(kind="debit").count() == 1


def test_a_key_older_than_a_day_is_used_afresh_and_the_sweep_forgets_old_keys(alice, alice_key, session_of,
                                                                              live_server_url):
    from datetime import timedelta

    from django.utils import timezone

    from sessions_app.turns import sweep_lapsed_turns

    session = session_of(alice)
    first = post(live_server_url, session, alice_key, {"content": "hi"}, "old")
    IdempotencyKey.objects.update(created_at=timezone.now() - timedelta(hours=25))
    again = post(live_server_url, session, alice_key, {"content": "hi"}, "old")
    assert again.status_code == 201 and again.json()["turn"]["id"] != first.json()["turn"]["id"]
    assert IdempotencyKey.objects.get().turn_id == Turn.objects.get(pk=again.json()["turn"]["id"]).pk
    IdempotencyKey.objects.update(created_at=timezone.now() - timedelta(hours=25))
    sweep_lapsed_turns()
    assert not IdempotencyKey.objects.exists()
