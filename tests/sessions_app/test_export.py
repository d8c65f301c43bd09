"""GET /api/v1/sessions/{id}/export?format=md|json (SPEC section 17): Markdown of the
current branch, JSON of the whole tree with every turn's usage and cost, as a download."""

from __future__ import annotations

import json
import uuid
from decimal import Decimal

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from rest_framework.test import APIClient

from sessions_app import export
from sessions_app.models import ChatSession, Message, Turn
from tests.sessions_app.test_search import at, exchange, make_session, regenerate


@pytest.fixture
def tree(alice):
    """Owls and bats: u1 -> a1 -> u2 -> a3 (the current branch), and a2, a regenerated
    sibling of a1. Each answer cost something, debited in the ledger."""
    session = make_session(alice, "Owls & bats: a night out!")
    u1, a1 = exchange(session, "Tell me about owls", "Owls are birds of prey.", minutes=0, cost=Decimal("0.000120"))
    a2 = regenerate(session, u1, "SIBLING: owls are secretly cats.", minutes=1, cost=Decimal("0.000080"))
    u2, a3 = exchange(session, "And bats?", "Bats are **mammals**.\n\n```\nflight()\n```", parent=a1, minutes=2,
                      cost=Decimal("0.000200"))
    session.refresh_from_db()
    return {"session": session, "u1": u1, "a1": a1, "a2": a2, "u2": u2, "a3": a3}


def get_export(client, session, **params):
    return client.get(f"/api/v1/sessions/{session.id}/export", params)


def test_markdown_is_the_current_branch(alice_api, tree):
    response = get_export(alice_api, tree["session"], format="md")
    assert response.status_code == 200
    assert response["Content-Type"] == "text/markdown; charset=utf-8"
    text = response.content.decode()
    assert text == ("# Owls & bats: a night out!\n\n"
                    "**User**\n\nTell me about owls\n\n"
                    "**Assistant**\n\nOwls are birds of prey.\n\n"
                    "**User**\n\nAnd bats?\n\n"
                    "**Assistant**\n\nBats are **mammals**.\n\n```\nflight()\n```\n")
    assert "SIBLING" not in text


def test_markdown_is_the_default_format(alice_api, tree):
    response = get_export(alice_api, tree["session"])
    assert response.status_code == 200 and response.content.decode().startswith("# Owls & bats")
    assert response["Content-Disposition"] == 'attachment; filename="pantheon-owls-bats-a-night-out.md"'


def test_markdown_follows_a_switch_of_branch(alice_api, tree):
    ChatSession.objects.filter(pk=tree["session"].pk).update(current_leaf=tree["a2"])
    text = get_export(alice_api, tree["session"], format="md").content.decode()
    assert "SIBLING: owls are secretly cats." in text
    assert "Owls are birds of prey." not in text and "bats?" not in text


def test_json_is_the_whole_tree_with_turns(alice_api, tree):
    response = get_export(alice_api, tree["session"], format="json")
    assert response.status_code == 200 and response["Content-Type"] == "application/json"
    assert response["Content-Disposition"] == 'attachment; filename="pantheon-owls-bats-a-night-out.json"'
    body = json.loads(response.content)
    assert set(body) == {"session", "messages", "turns", "exported_at"}
    session = tree["session"]
    assert body["session"]["id"] == str(session.id) and body["session"]["title"] == session.title
    assert body["session"]["current_leaf_id"] == str(tree["a3"].id)
    messages = {m["id"]: m for m in body["messages"]}
    assert len(body["messages"]) == 5
    for message in body["messages"]:
        assert set(message) == {"id", "parent_id", "turn_id", "role", "content", "tool_calls", "tool_call_id",
                                "created_at"}
    parent = {name: messages[str(tree[name].id)]["parent_id"] for name in ["u1", "a1", "a2", "u2", "a3"]}
    assert parent == {"u1": None, "a1": str(tree["u1"].id), "a2": str(tree["u1"].id), "u2": str(tree["a1"].id),
                      "a3": str(tree["u2"].id)}
    assert messages[str(tree["a2"].id)]["content"] == "SIBLING: owls are secretly cats."
    assert [m["id"] for m in body["messages"]][:3] == [str(tree["u1"].id), str(tree["a1"].id), str(tree["a2"].id)]
    turns = body["turns"]
    assert [t["cost"] for t in turns] == ["0.000120", "0.000080", "0.000200"]
    for turn, message in zip(turns, ["a1", "a2", "a3"], strict=True):
        assert turn["id"] == str(tree[message].turn_id)
        assert {"id", "status", "model", "served_model", "usage", "cost", "kind"} <= set(turn)
        assert turn["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7, "estimated": False,
                                 "reconciled": False}
        assert turn["status"] == "completed" and turn["kind"] == "chat"


def test_json_lists_title_turns_too(alice, alice_api, tree):
    session = tree["session"]
    Turn.objects.create(session=session, user=alice, status="completed", kind="title", model=session.model,
                        created_at=at(3), finished_at=at(3))
    kinds = [turn["kind"] for turn in json.loads(get_export(alice_api, session, format="json").content)["turns"]]
    assert kinds == ["chat", "chat", "chat", "title"]


@pytest.mark.parametrize("fmt", ["xml", "MD", "", "markdown", "json,md"])
def test_another_format_is_a_400(alice_api, tree, fmt):
    response = get_export(alice_api, tree["session"], format=fmt)
    assert response.status_code == 400
    assert response.json()["code"] == "invalid_format" and response.json()["detail"]


def test_the_format_parameter_is_the_views_not_drfs(alice_api, tree):
    # DRF would take ?format= as its renderer switch (a 404 for `md`), and answer a 406 to an
    # Accept it cannot render: neither here.
    for accept in ["text/markdown", "application/xml", "*/*"]:
        response = alice_api.get(f"/api/v1/sessions/{tree['session'].id}/export", {"format": "md"},
                                 HTTP_ACCEPT=accept)
        assert response.status_code == 200, accept
    refused = alice_api.get(f"/api/v1/sessions/{tree['session'].id}/export", {"format": "pdf"},
                            HTTP_ACCEPT="text/markdown")
    assert refused.status_code == 400 and refused["Content-Type"] == "application/json"


def test_another_users_session_is_a_404(bob_api, tree):
    for fmt in ["md", "json"]:
        response = get_export(bob_api, tree["session"], format=fmt)
        assert response.status_code == 404 and response.json()["code"] == "not_found"
    missing = bob_api.get(f"/api/v1/sessions/{uuid.uuid4()}/export")
    assert missing.status_code == 404 and missing.json()["code"] == "not_found"


def test_export_needs_credentials(tree):
    response = APIClient().get(f"/api/v1/sessions/{tree['session'].id}/export")
    assert response.status_code == 401 and response.json()["code"] == "not_authenticated"
    assert response["WWW-Authenticate"].startswith("Bearer")


def test_a_deleted_session_is_a_404(alice_api, tree):
    assert alice_api.delete(f"/api/v1/sessions/{tree['session'].id}").status_code == 204
    assert get_export(alice_api, tree["session"]).status_code == 404


# --- File names --------------------------------------------------------------------------

@pytest.mark.parametrize(("title", "name"), [
    ('Quote " and \\ backslash; rm -rf / <script>', "pantheon-quote-and-backslash-rm-rf-script"),
    ("../../etc/passwd", "pantheon-etcpasswd"),
    ("Ünïcödé café", "pantheon-unicode-cafe"),
    ("x" * 200, "pantheon-" + "x" * 60),
])
def test_file_names_are_safe(alice, title, name):
    session = make_session(alice, title)
    assert export.filename(session, "md") == f"{name}.md"


@pytest.mark.parametrize("title", ["", "日本語のタイトル", "!!!", "  "])
def test_a_title_with_nothing_usable_names_the_file_by_id(alice, alice_api, title):
    session = make_session(alice, title)
    response = get_export(alice_api, session, format="json")
    assert response["Content-Disposition"] == f'attachment; filename="pantheon-{session.id}.json"'


def test_an_untitled_empty_session_exports(alice, alice_api):
    session = make_session(alice, "")
    assert get_export(alice_api, session).content.decode() == "# Untitled session\n"
    body = json.loads(get_export(alice_api, session, format="json").content)
    assert body["messages"] == [] and body["turns"] == [] and body["session"]["current_leaf_id"] is None


def test_a_title_with_newlines_is_one_heading(alice, alice_api):
    session = make_session(alice, "Line one\nLine two")
    assert get_export(alice_api, session).content.decode() == "# Line one Line two\n"


# --- Branch edge cases ----------------------------------------------------------------------

def test_without_a_current_leaf_the_newest_message_ends_the_branch(alice, alice_api, tree):
    ChatSession.objects.filter(pk=tree["session"].pk).update(current_leaf=None)
    session = ChatSession.objects.get(pk=tree["session"].pk)
    assert [m.id for m in export.current_branch(session)] == [tree[n].id for n in ["u1", "a1", "u2", "a3"]]
    # The same branch as the messages listing shows: one walk for both.
    listed = alice_api.get(f"/api/v1/sessions/{session.id}/messages").json()["results"]
    assert [m["id"] for m in listed] == [str(tree[n].id) for n in ["u1", "a1", "u2", "a3"]]


def test_the_branch_costs_the_same_queries_whatever_the_tree(alice, alice_api, tree):
    def count(fmt: str) -> int:
        with CaptureQueriesContext(connection) as queries:
            assert get_export(alice_api, tree["session"], format=fmt).status_code == 200
        return len(queries)

    count("md")
    before = {fmt: count(fmt) for fmt in ["md", "json"]}
    parent = tree["a3"]
    for i in range(20):
        asked, parent = exchange(tree["session"], f"more {i}", f"answer {i}", parent=parent, minutes=10 + i)
        regenerate(tree["session"], asked, f"alternative {i}", minutes=10.5 + i)
    ChatSession.objects.filter(pk=tree["session"].pk).update(current_leaf=parent)
    assert {fmt: count(fmt) for fmt in ["md", "json"]} == before
    text = get_export(alice_api, tree["session"]).content.decode()
    assert "answer 19" in text and "alternative" not in text


def test_tool_rounds_are_one_line_each(alice, alice_api):
    session = make_session(alice, "Files")
    asked, _ = exchange(session, "What is in notes.txt?", None, minutes=0)
    turn = asked.turn
    call = Message.objects.create(session=session, turn=turn, user=alice, role="assistant", content="",
                                  tool_calls=[{"id": "call_1", "type": "function",
                                               "function": {"name": "file_read", "arguments": "{}"}}],
                                  parent=asked, position=1, created_at=at(0.1))
    result = Message.objects.create(session=session, turn=turn, user=alice, role="tool", tool_call_id="call_1",
                                    content="SECRET FILE CONTENTS", parent=call, position=2, created_at=at(0.2))
    answer = Message.objects.create(session=session, turn=turn, user=alice, role="assistant",
                                    content="It lists groceries.", parent=result, position=3, created_at=at(0.3))
    ChatSession.objects.filter(pk=session.pk).update(current_leaf=answer)
    text = get_export(alice_api, session).content.decode()
    assert text == ("# Files\n\n**User**\n\nWhat is in notes.txt?\n\n"
                    "*Tool `file_read` answered (20 characters; left out).*\n\n"
                    "**Assistant**\n\nIt lists groceries.\n")
    body = json.loads(get_export(alice_api, session, format="json").content)
    tool = next(m for m in body["messages"] if m["role"] == "tool")
    assert tool["content"] == "SECRET FILE CONTENTS" and tool["tool_call_id"] == "call_1"
    assert next(m for m in body["messages"] if m["tool_calls"])["tool_calls"][0]["function"]["name"] == "file_read"
