import uuid

import pytest

from sessions_app.models import ChatSession, Message, Turn
from tests.conftest import MODEL


def make_turn(session, **fields) -> Turn:
    from django.utils import timezone

    now = timezone.now()
    turn = Turn.objects.create(session=session, user=session.user, status="completed", model=session.model,
                               provider_model="p/m", prompt_tokens=3, completion_tokens=4, created_at=now,
                               finished_at=now + timezone.timedelta(milliseconds=1), **fields)
    Message.objects.create(session=session, turn=turn, user=session.user, role="user", content="hi",
                           position=0, created_at=turn.created_at)
    Message.objects.create(session=session, turn=turn, user=session.user, role="assistant", content="hello",
                           position=1, created_at=turn.finished_at)
    return turn


def test_create_session_returns_its_fields(alice_api, price):
    response = alice_api.post("/api/v1/sessions", {"title": "Plans", "model": MODEL, "system_prompt": "Be brief."},
                              format="json")
    assert response.status_code == 201
    body = response.json()
    assert set(body) == {"id", "title", "model", "system_prompt", "created_at", "updated_at"}
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
    assert set(messages[0]) == {"id", "turn_id", "role", "content", "created_at"}
    assert messages[0]["turn_id"] == str(turn.id)

    turns = alice_api.get(f"/api/v1/sessions/{session.id}/turns").json()["results"]
    assert turns == [{
        "id": str(turn.id), "session_id": str(session.id), "status": "completed", "model": MODEL,
        "provider_model": "p/m",
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
