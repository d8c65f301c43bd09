import uuid
from decimal import Decimal

import pytest

from sessions_app.models import ChatSession, Message, Turn
from tests.conftest import MODEL


def make_turn(session, **fields) -> Turn:
    from django.utils import timezone

    now = timezone.now()
    turn = Turn.objects.create(session=session, user=session.user, status="completed", model=session.model,
                               provider_model="p/m", prompt_tokens=3, completion_tokens=4, created_at=now,
                               finished_at=now + timezone.timedelta(milliseconds=1), **fields)
    # Continued from the session's current leaf, as a turn does (SPEC section 17).
    question = Message.objects.create(session=session, turn=turn, user=session.user, role="user", content="hi",
                                      position=0, created_at=turn.created_at, parent_id=session.current_leaf_id)
    answer = Message.objects.create(session=session, turn=turn, user=session.user, role="assistant",
                                    content="hello", position=1, created_at=turn.finished_at, parent=question)
    Turn.objects.filter(pk=turn.pk).update(reply_to=question)
    ChatSession.objects.filter(pk=session.pk).update(current_leaf=answer)
    session.current_leaf = answer
    return turn


def test_create_session_returns_its_fields(alice_api, price):
    response = alice_api.post("/api/v1/sessions", {"title": "Plans", "model": MODEL, "system_prompt": "Be brief."},
                              format="json")
    assert response.status_code == 201
    body = response.json()
    assert set(body) == {"id", "title", "model", "system_prompt", "current_leaf_id", "created_at", "updated_at"}
    assert body["title"] == "Plans" and body["model"] == MODEL and body["system_prompt"] == "Be brief."
    uuid.UUID(body["id"])


def test_create_session_defaults_to_the_default_model(alice_api, price, settings):
    settings.PANTHEON_DEFAULT_MODEL = MODEL
    response = alice_api.post("/api/v1/sessions", {}, format="json")
    assert response.status_code == 201 and response.json()["model"] == MODEL


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"model": "nobody/knows"}, "unknown_model"),
        ({"title": "x" * 201}, "invalid_max_length"),
        ({"title": ["not", "a", "string"]}, "invalid"),
    ],
)
def test_create_session_rejects_bad_bodies(alice_api, price, settings, body, code):
    settings.PANTHEON_DEFAULT_MODEL = MODEL
    response = alice_api.post("/api/v1/sessions", body, format="json")
    assert response.status_code == 400
    assert response.json()["code"] == code and response.json()["detail"]


def test_malformed_json_is_400(alice_api):
    response = alice_api.generic("POST", "/api/v1/sessions", "{not json", content_type="application/json")
    assert response.status_code == 400 and response.json()["code"] == "parse_error"


def test_list_sessions_newest_first_and_paginated(alice, alice_api, price):
    for i in range(3):
        ChatSession.objects.create(user=alice, model=MODEL, title=f"s{i}")
    page = alice_api.get("/api/v1/sessions?page_size=2").json()
    assert set(page) == {"count", "next", "previous", "results"}
    assert page["count"] == 3 and page["previous"] is None and page["next"]
    assert [s["title"] for s in page["results"]] == ["s2", "s1"]
    second = alice_api.get(page["next"]).json()
    assert [s["title"] for s in second["results"]] == ["s0"] and second["next"] is None


def test_session_detail_messages_and_turns(alice, alice_api, price):
    session = ChatSession.objects.create(user=alice, model=MODEL, title="t")
    turn = make_turn(session)
    detail = alice_api.get(f"/api/v1/sessions/{session.id}").json()
    assert detail["id"] == str(session.id) and detail["title"] == "t"

    messages = alice_api.get(f"/api/v1/sessions/{session.id}/messages").json()["results"]
    assert [(m["role"], m["content"]) for m in messages] == [("user", "hi"), ("assistant", "hello")]
    assert set(messages[0]) == {"id", "turn_id", "parent_id", "role", "content", "created_at", "sibling_index",
                                "sibling_count"}
    assert messages[0]["turn_id"] == str(turn.id)

    turns = alice_api.get(f"/api/v1/sessions/{session.id}/turns").json()["results"]
    assert turns == [{
        "id": str(turn.id), "session_id": str(session.id), "kind": "chat", "status": "completed", "model": MODEL,
        "served_model": MODEL, "provider_model": "p/m",
        "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7, "estimated": False,
                  "reconciled": False},
        "cost": "0.000000", "created_at": turns[0]["created_at"], "finished_at": turns[0]["finished_at"],
    }]


@pytest.mark.parametrize("suffix", ["", "/messages", "/turns"])
def test_other_users_session_is_404(alice, bob_api, price, suffix):
    session = ChatSession.objects.create(user=alice, model=MODEL)
    make_turn(session)
    response = bob_api.get(f"/api/v1/sessions/{session.id}{suffix}")
    assert response.status_code == 404
    assert response.json()["code"] == "not_found"
    assert bob_api.get(f"/api/v1/sessions/{uuid.uuid4()}{suffix}").json() == response.json()


def test_other_users_sessions_are_not_listed(alice, bob_api, price):
    ChatSession.objects.create(user=alice, model=MODEL)
    assert bob_api.get("/api/v1/sessions").json()["count"] == 0


def test_unknown_api_path_is_json_404(alice_api):
    response = alice_api.get("/api/v1/nothing-here")
    assert response.status_code == 404 and response.json()["code"] == "not_found"


# --- PATCH and DELETE /sessions/{id} (SPEC sections 4 and 17) ---------------------------------


def test_patch_renames_a_session_and_changes_its_system_prompt(alice, alice_api, price):
    session = ChatSession.objects.create(user=alice, model=MODEL, title="old", system_prompt="Be brief.")
    before = session.updated_at
    response = alice_api.patch(f"/api/v1/sessions/{session.id}", {"title": "  Plans for May "}, format="json")
    assert response.status_code == 200, response.content
    body = response.json()
    assert set(body) == {"id", "title", "model", "system_prompt", "current_leaf_id", "created_at", "updated_at"}
    assert body["title"] == "Plans for May" and body["system_prompt"] == "Be brief." and body["model"] == MODEL
    session.refresh_from_db()
    assert session.title == "Plans for May" and session.updated_at > before
    assert alice_api.get(f"/api/v1/sessions/{session.id}").json() == body

    prompt = "  Answer in French.\n"  # kept exactly, as on create
    body = alice_api.patch(f"/api/v1/sessions/{session.id}", {"system_prompt": prompt}, format="json").json()
    assert body["system_prompt"] == prompt and body["title"] == "Plans for May"
    # An empty title makes it untitled again; an empty body changes nothing.
    assert alice_api.patch(f"/api/v1/sessions/{session.id}", {"title": ""}, format="json").json()["title"] == ""
    session.refresh_from_db()
    unchanged = alice_api.patch(f"/api/v1/sessions/{session.id}", {}, format="json")
    assert unchanged.status_code == 200 and unchanged.json()["title"] == ""
    assert ChatSession.objects.get(pk=session.pk).updated_at == session.updated_at
    assert (session.title, session.system_prompt) == ("", prompt)


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        ('{"title": "' + "x" * 201 + '"}', "invalid_max_length"),
        ('{"title": null}', "invalid_null"),
        ('{"title": ["a"]}', "invalid"),
        ('{"title": "a\\u0000b"}', "invalid_text"),
        ('{"title": "a\\ud800b"}', "invalid_text"),
        ('{"system_prompt": "\\udfff"}', "invalid_text"),
        ('{"system_prompt": "nul \\u0000"}', "invalid_text"),
        ('["title"]', "invalid"),
        ('"title"', "invalid"),
        ('{"title": "x", "current_leaf_id": null}', "invalid_null"),
        ('{"title": "x", "current_leaf_id": "not-a-uuid"}', "invalid"),
        ('{"title": "x", "current_leaf_id": "00000000-0000-4000-8000-000000000000"}', "invalid_parent"),
        ("{not json", "parse_error"),
    ],
)
def test_patch_rejects_bad_bodies_and_changes_nothing(alice, alice_api, price, raw, code):
    session = ChatSession.objects.create(user=alice, model=MODEL, title="kept", system_prompt="also kept")
    response = alice_api.generic("PATCH", f"/api/v1/sessions/{session.id}", raw, content_type="application/json")
    assert response.status_code == 400, response.content
    assert response.json()["code"] == code and response.json()["detail"]
    session.refresh_from_db()
    assert (session.title, session.system_prompt) == ("kept", "also kept")


def test_patch_system_prompt_longer_than_a_message_is_refused(alice, alice_api, price, settings):
    session = ChatSession.objects.create(user=alice, model=MODEL)
    too_long = "x" * (settings.PANTHEON_MAX_MESSAGE_CHARS + 1)
    response = alice_api.patch(f"/api/v1/sessions/{session.id}", {"system_prompt": too_long}, format="json")
    assert response.status_code == 400 and response.json()["code"] == "invalid_max_length"


def test_put_is_not_allowed(alice, alice_api, price):
    session = ChatSession.objects.create(user=alice, model=MODEL)
    response = alice_api.put(f"/api/v1/sessions/{session.id}", {"title": "x"}, format="json")
    assert response.status_code == 405 and response.json()["code"] == "method_not_allowed"


@pytest.mark.parametrize("method", ["patch", "delete"])
def test_patch_and_delete_of_another_users_session_are_404(alice, bob_api, price, method):
    session = ChatSession.objects.create(user=alice, model=MODEL, title="alice's")
    make_turn(session)
    response = getattr(bob_api, method)(f"/api/v1/sessions/{session.id}", {"title": "mine now"}, format="json")
    assert response.status_code == 404
    missing = getattr(bob_api, method)(f"/api/v1/sessions/{uuid.uuid4()}", {"title": "x"}, format="json")
    assert response.json() == missing.json() == {"detail": "Not found.", "code": "not_found"}
    session.refresh_from_db()
    assert session.title == "alice's" and session.turns.count() == 1


def test_browser_session_patch_and_delete_need_the_csrf_token(alice, price):
    from rest_framework.test import APIClient

    session = ChatSession.objects.create(user=alice, model=MODEL, title="t")
    client = APIClient(enforce_csrf_checks=True)
    client.login(username="alice", password="pw")
    assert client.patch(f"/api/v1/sessions/{session.id}", {"title": "x"}, format="json").status_code == 403
    assert client.delete(f"/api/v1/sessions/{session.id}").status_code == 403
    session.refresh_from_db()
    assert session.title == "t"


@pytest.mark.usefixtures("fake_openrouter_settings")
def test_delete_removes_the_session_and_keeps_its_ledger_entries_and_usage(alice, alice_api, price,
                                                                            fake_openrouter):
    from billing_app.models import LedgerEntry, UsageRecord, Wallet
    from sessions_app.models import IdempotencyKey, LlmEvent

    session = ChatSession.objects.create(user=alice, model=MODEL, title="to go")
    kept = ChatSession.objects.create(user=alice, model=MODEL, title="stays")
    fake_openrouter.enqueue(fake_openrouter.completion("Hello", usage=(12, 7)))
    answered = alice_api.post(f"/api/v1/sessions/{session.id}/turns", {"content": "Hi"}, format="json",
                              HTTP_IDEMPOTENCY_KEY="k-1")
    assert answered.status_code == 201, answered.content
    turn_id = answered.json()["turn"]["id"]
    make_turn(kept)
    balance = Wallet.objects.get(user=alice).balance

    response = alice_api.delete(f"/api/v1/sessions/{session.id}")
    assert response.status_code == 204 and response.content == b""

    # Everything of the session answers 404 ...
    for path in (f"sessions/{session.id}", f"sessions/{session.id}/messages", f"sessions/{session.id}/turns",
                 f"turns/{turn_id}", f"turns/{turn_id}/events"):
        gone = alice_api.get(f"/api/v1/{path}")
        assert gone.status_code == 404 and gone.json()["code"] == "not_found", path
    assert alice_api.delete(f"/api/v1/sessions/{session.id}").status_code == 404
    assert [s["title"] for s in alice_api.get("/api/v1/sessions").json()["results"]] == ["stays"]
    assert not Turn.objects.filter(session_id=session.id).exists()
    assert not Message.objects.filter(session_id=session.id).exists()
    assert not LlmEvent.objects.filter(turn_id=turn_id).exists()
    assert not IdempotencyKey.objects.filter(turn_id=turn_id).exists()
    # ... but what it cost stays on the books: the debit, the usage record, the balance.
    debit = LedgerEntry.objects.get(turn_id=turn_id, kind="debit")
    assert debit.amount == Decimal("-0.026000")
    usage = UsageRecord.objects.get(turn_id=turn_id)
    assert str(usage.session_id) == str(session.id) and usage.cost == Decimal("0.026000")
    assert Wallet.objects.get(user=alice).balance == balance
    ledger = alice_api.get("/api/v1/wallet/ledger").json()["results"]
    assert any(entry["turn_id"] == turn_id for entry in ledger)
    assert alice_api.get(f"/api/v1/usage?session={session.id}").json()["count"] == 1
    # The other session is untouched.
    assert alice_api.get(f"/api/v1/sessions/{kept.id}/messages").json()["count"] == 2


def test_delete_while_a_turn_runs_is_409_and_works_once_it_ended(alice, alice_api, price):
    from billing_app.models import CreditHold
    from sessions_app.turns import TurnOutcome, close_turn
    from tests.sessions_app.helpers import begun_turn

    session = ChatSession.objects.create(user=alice, model=MODEL)
    prepared = begun_turn(alice, session)
    response = alice_api.delete(f"/api/v1/sessions/{session.id}")
    assert response.status_code == 409
    assert response.json()["code"] == "turn_running" and response.json()["detail"]
    assert Turn.objects.get(pk=prepared.turn_id).status == "running"
    assert CreditHold.objects.open().filter(turn_id=prepared.turn_id).exists()

    close_turn(prepared.turn_id, TurnOutcome(status="completed", content="done"))
    assert alice_api.delete(f"/api/v1/sessions/{session.id}").status_code == 204
    assert not ChatSession.objects.filter(pk=session.id).exists()
