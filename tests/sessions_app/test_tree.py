"""The message tree (SPEC section 17): regenerate and edit as siblings, the context is the
ancestor chain, branch listing and switching, billing once per answer, the migration of a
linear history. Through a real server, the loopback fake recording what it was sent."""

from __future__ import annotations

import httpx
import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from billing_app.models import LedgerEntry, Wallet
from sessions_app.models import ChatSession, Message, Turn
from tests.fake_openrouter import completion, sse_stream
from tests.sessions_app.helpers import read_stream

pytestmark = pytest.mark.usefixtures("fake_openrouter_settings")


class Chat:
    def __init__(self, base: str, user, key: str, session: ChatSession, fake) -> None:
        self.base, self.user, self.key, self.session, self.fake = base, user, key, session, fake

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def turn(self, answer: str, **body) -> httpx.Response:
        self.fake.enqueue(completion(answer))
        response = httpx.post(f"{self.base}/api/v1/sessions/{self.session.id}/turns", json=body,
                              headers=self.headers, timeout=30)
        return response

    def sent(self) -> list[tuple[str, str]]:
        """The conversation the provider got in the last call: (role, content)."""
        return [(m["role"], m["content"]) for m in self.fake.chat_requests()[-1].body["messages"]]

    def messages(self, **params) -> list[dict]:
        response = httpx.get(f"{self.base}/api/v1/sessions/{self.session.id}/messages", params=params,
                             headers=self.headers)
        assert response.status_code == 200, response.text
        return response.json()["results"]

    def switch(self, message_id) -> httpx.Response:
        return httpx.patch(f"{self.base}/api/v1/sessions/{self.session.id}", json={"current_leaf_id": message_id},
                           headers=self.headers)


@pytest.fixture
def chat(live_server_url, alice, session_of, fake_openrouter):
    from accounts.models import ApiKey

    _, raw = ApiKey.issue(user=alice)
    return Chat(live_server_url, alice, raw, session_of(alice), fake_openrouter)


def _debits() -> int:
    return LedgerEntry.objects.filter(kind=LedgerEntry.Kind.DEBIT).count()


def test_turns_chain_and_the_branch_lists_root_to_leaf(chat):
    for i in range(3):
        assert chat.turn(f"answer {i}", content=f"question {i}").status_code == 201
    listed = chat.messages()
    assert [(m["role"], m["content"]) for m in listed] == [
        ("user", "question 0"), ("assistant", "answer 0"), ("user", "question 1"), ("assistant", "answer 1"),
        ("user", "question 2"), ("assistant", "answer 2")]
    assert listed[0]["parent_id"] is None
    assert all(b["parent_id"] == a["id"] for a, b in zip(listed, listed[1:], strict=False))
    assert all((m["sibling_index"], m["sibling_count"]) == (1, 1) for m in listed)
    chat.session.refresh_from_db()
    assert str(chat.session.current_leaf_id) == listed[-1]["id"]
    assert chat.sent() == [("user", "question 0"), ("assistant", "answer 0"), ("user", "question 1"),
                           ("assistant", "answer 1"), ("user", "question 2")]


def test_regenerate_answers_again_beside_the_old_answer_and_never_sees_it(chat):
    chat.turn("first answer", content="q1")
    chat.turn("old answer", content="q2")
    question = next(m for m in chat.messages() if m["content"] == "q2")
    debits = _debits()
    response = chat.turn("new answer", parent_id=question["id"])
    assert response.status_code == 201, response.text
    assert response.json()["message"]["content"] == "new answer"
    # The context is the chain up to the question: not the answer it replaces.
    assert chat.sent() == [("user", "q1"), ("assistant", "first answer"), ("user", "q2")]
    listed = chat.messages()
    assert [m["content"] for m in listed] == ["q1", "first answer", "q2", "new answer"]
    assert (listed[-1]["sibling_index"], listed[-1]["sibling_count"]) == (2, 2)
    assert listed[-1]["parent_id"] == question["id"]
    # Only the new answer was stored (no second copy of the question), and billed once.
    assert Message.objects.filter(content="q2").count() == 1
    assert _debits() == debits + 1
    regenerated = Turn.objects.get(pk=response.json()["turn"]["id"])
    assert regenerated.messages.count() == 1 and str(regenerated.reply_to_id) == question["id"]


def test_edit_makes_a_new_user_message_beside_the_old_one(chat):
    chat.turn("a1", content="q1")
    chat.turn("a2", content="q2")
    first_answer = next(m for m in chat.messages() if m["content"] == "a1")
    assert chat.turn("a2 edited", content="q2 edited", parent_id=first_answer["id"]).status_code == 201
    assert chat.sent() == [("user", "q1"), ("assistant", "a1"), ("user", "q2 edited")]
    listed = chat.messages()
    assert [m["content"] for m in listed] == ["q1", "a1", "q2 edited", "a2 edited"]
    assert (listed[2]["sibling_index"], listed[2]["sibling_count"]) == (2, 2)
    # The first message can be edited too: parent_id null starts a new root.
    assert chat.turn("fresh", content="a new start", parent_id=None).status_code == 201
    assert chat.sent() == [("user", "a new start")]
    listed = chat.messages()
    assert [m["content"] for m in listed] == ["a new start", "fresh"]
    assert (listed[0]["sibling_index"], listed[0]["sibling_count"]) == (2, 2)


def test_switching_branches_is_free_and_picks_the_newest_leaf_below(chat):
    chat.turn("a1", content="q1")
    chat.turn("a2", content="q2")
    q2 = next(m for m in chat.messages() if m["content"] == "q2")
    chat.turn("a2 again", parent_id=q2["id"])
    old_answer = next(m for m in chat.messages(all="true") if m["content"] == "a2")
    balance, debits = Wallet.objects.get(user=chat.user).balance, _debits()
    switched = chat.switch(old_answer["id"])
    assert switched.status_code == 200 and switched.json()["current_leaf_id"] == old_answer["id"]
    assert [m["content"] for m in chat.messages()] == ["q1", "a1", "q2", "a2"]
    assert chat.messages()[-1]["sibling_index"] == 1
    # A message that is not a leaf selects the most recently created leaf below it.
    q1 = next(m for m in chat.messages() if m["content"] == "q1")
    assert chat.switch(q1["id"]).status_code == 200
    assert chat.messages()[-1]["content"] == "a2 again"
    # The next turn continues from the current leaf.
    chat.switch(old_answer["id"])
    chat.turn("a3", content="q3")
    assert chat.sent()[-2:] == [("assistant", "a2"), ("user", "q3")]
    assert Wallet.objects.get(user=chat.user).balance < balance  # only the new turn cost
    assert _debits() == debits + 1
    assert len(chat.messages(all="true")) == 7


def test_regenerate_and_edit_on_the_stream_endpoint(chat):
    chat.turn("a1", content="q1")
    q1 = chat.messages()[0]
    chat.fake.enqueue(sse_stream(["stream", "ed again"]))
    response, events, _ = read_stream(chat.base, chat.session, chat.headers, {"parent_id": q1["id"]})
    assert response.status_code == 200 and events[-1][0] == "done"
    assert [m["content"] for m in chat.messages()] == ["q1", "streamed again"]
    assert chat.messages()[-1]["sibling_count"] == 2


@pytest.mark.parametrize("which", ["other_user", "other_session", "assistant_for_regenerate", "missing",
                                   "malformed"])
def test_a_parent_that_is_not_this_session_s_is_invalid_and_stores_nothing(chat, which, make_user, session_of):
    chat.turn("a1", content="q1")
    mine = chat.messages()
    if which == "other_user":
        bob = make_user("bob2", "5")
        other = session_of(bob)
        turn = Turn.objects.create(session=other, user=bob, status="completed", model=other.model)
        parent = str(Message.objects.create(session=other, turn=turn, user=bob, role="user", content="bob's",
                                            position=0).id)
    elif which == "other_session":
        other = session_of(chat.user)
        turn = Turn.objects.create(session=other, user=chat.user, status="completed", model=other.model)
        parent = str(Message.objects.create(session=other, turn=turn, user=chat.user, role="user", content="x",
                                            position=0).id)
    elif which == "assistant_for_regenerate":
        parent = mine[1]["id"]
    elif which == "missing":
        parent = "00000000-0000-4000-8000-000000000000"
    else:
        parent = "not-a-uuid"
    before = (Turn.objects.count(), Message.objects.count(), _debits())
    body = {"parent_id": parent} if which == "assistant_for_regenerate" else {"parent_id": parent, "content": "x"}
    for path in ("turns", "turns/stream"):
        response = httpx.post(f"{chat.base}/api/v1/sessions/{chat.session.id}/{path}", json=body,
                              headers=chat.headers, timeout=30)
        assert response.status_code == 400 and response.json()["code"] == "invalid_parent", response.text
    assert (Turn.objects.count(), Message.objects.count(), _debits()) == before
    switched = chat.switch(parent)
    if which == "assistant_for_regenerate":
        assert switched.status_code == 200  # a message of the session: a fine place to switch to
    else:
        assert switched.status_code == 400
        assert switched.json()["code"] == ("invalid" if which == "malformed" else "invalid_parent")


def test_listing_a_branch_costs_the_same_queries_whatever_its_length(alice, alice_api, session_of):
    from tests.sessions_app.test_sessions_api import make_turn

    short, long = session_of(alice), session_of(alice)
    for _ in range(2):
        make_turn(short)
    for _ in range(25):
        make_turn(long)
    counts = []
    alice_api.get("/api/v1/sessions")  # the key's last_used_at is written once, here
    for session in (short, long):
        with CaptureQueriesContext(connection) as queries:
            listed = alice_api.get(f"/api/v1/sessions/{session.id}/messages?page_size=100").json()
        counts.append(len(queries))
        assert listed["count"] == (4 if session is short else 50)
    assert counts[0] == counts[1], counts


@pytest.mark.django_db(transaction=True)
def test_the_migration_turns_a_linear_history_into_a_chain(django_db_blocker):
    """Back to before the tree, a history written the old way, then forward: no message lost,
    each one's parent the one before it, the session's leaf its last, each turn its question."""
    from django.db.migrations.executor import MigrationExecutor

    before, after = ("sessions_app", "0007_turn_api_key"), ("sessions_app", "0008_message_tree")
    executor = MigrationExecutor(connection)
    executor.migrate([before])
    old = executor.loader.project_state([before]).apps
    User = old.get_model("auth", "User")
    Session, OldTurn, OldMessage = (old.get_model("sessions_app", name) for name in ("ChatSession", "Turn",
                                                                                      "Message"))
    user = User.objects.create(username="history")
    session = Session.objects.create(user=user, model="m")
    from django.utils import timezone

    start = timezone.now()
    ids = []
    for i in range(3):
        turn = OldTurn.objects.create(session=session, user=user, status="completed", model="m",
                                      created_at=start + timezone.timedelta(seconds=i))
        for position, role in enumerate(("user", "assistant")):
            ids.append(OldMessage.objects.create(session=session, turn=turn, user=user, role=role,
                                                 content=f"{role} {i}", position=position,
                                                 created_at=start + timezone.timedelta(seconds=i)).id)
    executor = MigrationExecutor(connection)
    executor.migrate([after])
    executor = MigrationExecutor(connection)
    executor.migrate(executor.loader.graph.leaf_nodes())  # everything after it too
    messages = list(Message.objects.filter(session_id=session.id).order_by("created_at", "position"))
    assert [m.id for m in messages] == ids
    assert messages[0].parent_id is None
    assert all(b.parent_id == a.id for a, b in zip(messages, messages[1:], strict=False))
    assert ChatSession.objects.get(pk=session.id).current_leaf_id == ids[-1]
    for turn in Turn.objects.filter(session_id=session.id):
        assert turn.reply_to.role == "user" and turn.reply_to.turn_id == turn.id
