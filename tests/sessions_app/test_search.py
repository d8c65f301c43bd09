"""GET /api/v1/search (SPEC section 17): a user's own messages and session titles, newest
first, with snippets; full-text search on PostgreSQL (with its GIN indexes), a substring
on SQLite. Message trees are built with the ORM."""

from __future__ import annotations

import datetime

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from rest_framework.test import APIClient

from billing_app import services
from sessions_app import search
from sessions_app.models import ChatSession, Message, Turn
from tests.conftest import MODEL

POSTGRES = connection.vendor == "postgresql"
only_postgres = pytest.mark.skipif(not POSTGRES, reason="full-text search is PostgreSQL's")
only_sqlite = pytest.mark.skipif(POSTGRES, reason="the substring search is SQLite's")

T0 = timezone.now() - datetime.timedelta(days=1)
MS = datetime.timedelta(milliseconds=1)


def at(minutes: float) -> datetime.datetime:
    return T0 + datetime.timedelta(minutes=minutes)


def make_session(user, title: str = "", *, minutes: float = 0) -> ChatSession:
    return ChatSession.objects.create(user=user, title=title, model=MODEL, created_at=at(minutes),
                                      updated_at=at(minutes))


def _turn(session, when, cost) -> Turn:
    turn = Turn.objects.create(session=session, user=session.user, status="completed", model=session.model,
                               served_model=session.model, provider_model="p/m", prompt_tokens=3,
                               completion_tokens=4, cost=cost, created_at=when, finished_at=when + MS)
    if cost:
        services.settle(user_id=session.user_id, turn_id=turn.id, cost=cost)  # the ledger took what it cost
    return turn


def exchange(session, question: str, answer: str | None, *, parent: Message | None = None, minutes: float = 0,
             cost=0) -> tuple[Message, Message | None]:
    """A turn: the user's message (a child of `parent`) and its answer, the answer the
    session's current leaf. Returns (question, answer)."""
    when = at(minutes)
    turn = _turn(session, when, cost)
    asked = Message.objects.create(session=session, turn=turn, user=session.user, role="user", content=question,
                                   parent=parent, position=0, created_at=when)
    answered = None
    if answer is not None:
        answered = Message.objects.create(session=session, turn=turn, user=session.user, role="assistant",
                                          content=answer, parent=asked, position=1, created_at=when + MS)
    ChatSession.objects.filter(pk=session.pk).update(current_leaf=answered or asked)
    return asked, answered


def regenerate(session, question: Message, answer: str, *, minutes: float, cost=0) -> Message:
    """Another answer to `question` (a sibling of the earlier ones), made the current leaf."""
    when = at(minutes)
    turn = _turn(session, when, cost)
    answered = Message.objects.create(session=session, turn=turn, user=session.user, role="assistant",
                                      content=answer, parent=question, position=0, created_at=when)
    ChatSession.objects.filter(pk=session.pk).update(current_leaf=answered)
    return answered


def find(client, q: str, **params) -> dict:
    response = client.get("/api/v1/search", {"q": q, **params})
    assert response.status_code == 200, response.content[:300]
    return response.json()


# --- What is searched, and whose ----------------------------------------------------------

def test_a_hit_has_the_documented_fields(alice, alice_api):
    session = make_session(alice, "Trip planning")
    question, answer = exchange(session, "Where should we go?", "Lisbon has lovely tiles.")
    body = find(alice_api, "tiles")
    assert set(body) == {"count", "next", "previous", "results"}
    assert body["count"] == 1
    (result,) = body["results"]
    assert set(result) == {"session_id", "message_id", "title", "snippet", "created_at"}
    assert result["session_id"] == str(session.id) and result["message_id"] == str(answer.id)
    assert result["title"] == "Trip planning" and result["snippet"] == "Lisbon has lovely tiles."
    assert result["created_at"].startswith(answer.created_at.strftime("%Y-%m-%dT%H:%M"))


def test_user_and_assistant_messages_are_found_not_tool_or_system(alice, alice_api):
    session = make_session(alice)
    question, answer = exchange(session, "Tell me about walruses", "Walruses live in the Arctic.")
    turn = question.turn
    Message.objects.create(session=session, turn=turn, user=alice, role="tool", content="walruses file text",
                           position=2, created_at=at(1))
    Message.objects.create(session=session, turn=turn, user=alice, role="system", content="walruses system",
                           position=3, created_at=at(1))
    ids = {hit["message_id"] for hit in find(alice_api, "walruses")["results"]}
    assert ids == {str(question.id), str(answer.id)}


def test_alice_never_finds_bobs_text(alice, bob, alice_api, bob_api):
    mine = make_session(alice, "Mine")
    exchange(mine, "zebra crossing rules", "Stop for pedestrians.")
    theirs = make_session(bob, "Zebra secrets")
    exchange(theirs, "my zebra password is hunter2", "Keep it safe.")
    # Alice's hits are hers only, whatever she types, even bob's exact words.
    results = find(alice_api, "zebra")["results"]
    assert results and {hit["session_id"] for hit in results} == {str(mine.id)}
    for q in ["my zebra password is hunter2", '"zebra password"', "hunter2", "Zebra secrets", "secrets", "password"]:
        body = find(alice_api, q)
        assert body["count"] == 0 and body["results"] == [], q
    # Bob finds his own.
    assert {hit["session_id"] for hit in find(bob_api, "hunter2")["results"]} == {str(theirs.id)}
    assert [hit["message_id"] for hit in find(bob_api, "secrets")["results"]] == [None]


def test_title_hits_have_no_message_id(alice, alice_api):
    session = make_session(alice, "Quarterly budget review", minutes=0)
    exchange(session, "What did we spend?", "About as planned.", minutes=1)
    (result,) = find(alice_api, "budget")["results"]
    assert result == {"session_id": str(session.id), "message_id": None, "title": "Quarterly budget review",
                      "snippet": "Quarterly budget review", "created_at": result["created_at"]}
    assert result["created_at"].startswith(session.created_at.strftime("%Y-%m-%dT%H:%M"))


def test_a_session_matching_in_title_and_messages_gives_both(alice, alice_api):
    session = make_session(alice, "Gardening", minutes=0)
    question, _ = exchange(session, "Any gardening tips?", "Water in the morning.", minutes=1)
    results = find(alice_api, "gardening")["results"]
    assert [hit["message_id"] for hit in results] == [str(question.id), None]
    assert {hit["title"] for hit in results} == {"Gardening"}


def test_every_branch_is_searched(alice, alice_api):
    session = make_session(alice)
    question, first = exchange(session, "Name a colour", "Vermilion, I think.", minutes=0)
    regenerate(session, question, "Cerulean.", minutes=1)  # now the current branch
    assert [hit["message_id"] for hit in find(alice_api, "vermilion")["results"]] == [str(first.id)]


def test_a_deleted_session_is_not_searched(alice, alice_api):
    session = make_session(alice, "Ephemeral musings")
    exchange(session, "ephemeral thoughts", "ephemeral answer")
    assert find(alice_api, "ephemeral")["count"] == 3
    assert alice_api.delete(f"/api/v1/sessions/{session.id}").status_code == 204
    assert find(alice_api, "ephemeral") == {"count": 0, "next": None, "previous": None, "results": []}


def test_an_untitled_session_is_not_a_title_hit(alice, alice_api):
    make_session(alice, "")
    assert find(alice_api, "untitled")["count"] == 0


# --- Order and pages ----------------------------------------------------------------------

def test_newest_first_messages_and_titles_together(alice, alice_api):
    old = make_session(alice, "Otters at dawn", minutes=0)
    _, a1 = exchange(old, "otters?", "Otters hold hands.", minutes=1)
    new = make_session(alice, "Otters again", minutes=5)
    q2, _ = exchange(new, "more otters", "They sleep floating.", minutes=6)
    order = [(hit["session_id"], hit["message_id"]) for hit in find(alice_api, "otters")["results"]]
    q1 = Message.objects.get(session=old, role="user")
    assert order == [(str(new.id), str(q2.id)), (str(new.id), None), (str(old.id), str(a1.id)),
                     (str(old.id), str(q1.id)), (str(old.id), None)]


def test_results_are_pages(alice, alice_api):
    session = make_session(alice)
    expected = []
    for i in range(7):
        question, _ = exchange(session, f"pelican number {i}", "noted", minutes=i)
        expected.append(str(question.id))
    expected.reverse()
    first = find(alice_api, "pelican", page_size=3)
    assert first["count"] == 7 and first["previous"] is None and "page=2" in first["next"]
    seen = [hit["message_id"] for hit in first["results"]]
    seen += [hit["message_id"] for hit in find(alice_api, "pelican", page_size=3, page=2)["results"]]
    last = find(alice_api, "pelican", page_size=3, page=3)
    assert last["next"] is None and len(last["results"]) == 1
    seen += [hit["message_id"] for hit in last["results"]]
    assert seen == expected
    beyond = alice_api.get("/api/v1/search", {"q": "pelican", "page_size": 3, "page": 4})
    assert beyond.status_code == 404 and beyond.json()["code"] == "not_found"


def test_the_query_count_does_not_grow_with_the_page(alice, alice_api):
    session = make_session(alice, "Lemur notes")
    exchange(session, "lemur", "lemur facts")

    def count_queries() -> int:
        with CaptureQueriesContext(connection) as queries:
            find(alice_api, "lemur")
        return len(queries)

    count_queries()  # once before counting: whatever a first request does once
    few = count_queries()
    for i in range(30):
        other = make_session(alice, f"Lemur {i}", minutes=i)
        exchange(other, f"lemur question {i}", f"a lemur answer {i}", minutes=i)
    assert find(alice_api, "lemur")["count"] == 3 + 30 * 3
    assert count_queries() == few


# --- Snippets -----------------------------------------------------------------------------

def test_the_snippet_is_short_and_around_the_match(alice, alice_api):
    session = make_session(alice)
    before = "Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 40
    after = " Sed do eiusmod tempor incididunt ut labore et dolore magna aliqua." * 40
    exchange(session, before + "the hidden narwhal sleeps here." + after, "ok")
    (result,) = find(alice_api, "narwhal")["results"]
    snippet = result["snippet"]
    assert len(snippet) <= 300 and "narwhal" in snippet
    assert snippet.startswith("…") and snippet.endswith("…")
    assert "<" not in snippet and "\n" not in snippet


def test_the_snippet_keeps_markup_as_plain_text_and_whole_characters(alice, alice_api):
    session = make_session(alice)
    text = "🦀" * 400 + " <b>crab</b> & <script>alert(1)</script> " + "é" * 400
    exchange(session, text, "ok")
    (result,) = find(alice_api, "crab")["results"]
    snippet = result["snippet"]
    assert len(snippet) <= 300 and "<b>crab</b>" in snippet  # as stored: no markup added, none taken away
    assert set(snippet) <= set(text) | {"…"}  # only whole characters of the text


@pytest.mark.parametrize("where", ["start", "middle", "end"])
def test_snippet_function_bounds(where):
    filler = "word " * 200
    text = {"start": "needle " + filler, "middle": filler + "needle " + filler, "end": filler + "needle"}[where]
    for words in (False, True):
        snippet = search.snippet(text, "needle", words=words)
        assert len(snippet) <= search.SNIPPET_CHARS and "needle" in snippet
        assert snippet.startswith("…") == (where != "start")
        assert snippet.endswith("…") == (where != "end")


def test_snippet_function_edges():
    assert search.snippet("  short\n\ntext  ", "short", words=False) == "short text"
    assert search.snippet("x" * 1000, "absent", words=True) == "x" * 298 + "…"  # no match: the start
    long_match = "y" * 500
    assert len(search.snippet("a " * 100 + long_match + " b" * 100, long_match, words=False)) <= 300
    # A stemmed match is placed by a prefix of the word: `planning` is found for `plans`.
    text = "z " * 300 + "planning ahead" + " z" * 300
    assert "planning" in search.snippet(text, "plans", words=True)
    # Negated words and `or` are not what is looked for.
    assert search.query_terms('-cats or "big dogs" birds', words=True)[:3] == ['-cats or "big dogs" birds',
                                                                               "big dogs", "birds"]


# --- Refusals ------------------------------------------------------------------------------

@pytest.mark.parametrize(("params", "code"), [
    ({}, "invalid_required"),
    ({"q": ""}, "invalid_blank"),
    ({"q": "   "}, "invalid_blank"),
    ({"q": "x" * 201}, "invalid_max_length"),
    ({"q": "nul\x00byte"}, "invalid_text"),
])
def test_a_bad_query_is_a_400(alice_api, params, code):
    response = alice_api.get("/api/v1/search", params)
    assert response.status_code == 400
    assert response.json()["code"] == code and response.json()["detail"]


def test_two_hundred_characters_are_accepted(alice_api):
    assert find(alice_api, "x" * 200)["count"] == 0


def test_search_needs_credentials(db):
    response = APIClient().get("/api/v1/search", {"q": "anything"})
    assert response.status_code == 401 and response.json()["code"] == "not_authenticated"
    bad = APIClient(HTTP_AUTHORIZATION="Bearer nope").get("/api/v1/search", {"q": "anything"})
    assert bad.status_code == 401


def test_odd_queries_never_fail(alice, alice_api):
    exchange(make_session(alice), "100% sure (really) & 'quoted' a_b", "yes")
    for q in ["%", "_", "'", '"', "\\", "&|!:*", "-", "or", "(", ")", "a:*", "the", "<>", "' OR 1=1 --"]:
        body = find(alice_api, q)
        assert body["count"] >= 0, q


# --- The two implementations ------------------------------------------------------------------

@only_sqlite
def test_sqlite_is_a_case_insensitive_substring(alice, alice_api):
    exchange(make_session(alice, "Mixed CASE Title"), "Hedgehogs are Prickly", "indeed")
    assert find(alice_api, "HOGS ARE prick")["count"] == 1
    assert find(alice_api, "case ti")["results"][0]["message_id"] is None
    assert find(alice_api, "100%")["count"] == 0  # LIKE's wildcards are escaped


@only_postgres
def test_postgres_full_text_stems_phrases_and_negations(alice, alice_api):
    session = make_session(alice)
    _, planned = exchange(session, "first", "We are planning the launch carefully.", minutes=0)
    _, other = exchange(session, "second", "The launch was delayed by rain.", minutes=1)
    assert [hit["message_id"] for hit in find(alice_api, "plans")["results"]] == [str(planned.id)]
    assert find(alice_api, "launch")["count"] == 2
    assert [hit["message_id"] for hit in find(alice_api, "launch -rain")["results"]] == [str(planned.id)]
    assert [hit["message_id"] for hit in find(alice_api, '"delayed by rain"')["results"]] == [str(other.id)]
    assert find(alice_api, '"rain delayed"')["count"] == 0
    assert find(alice_api, "rain or carefully")["count"] == 2


@only_postgres
@pytest.mark.parametrize(("model", "column", "index"), [(Message, "content", "message_content_search_idx"),
                                                         (ChatSession, "title", "session_title_search_idx")])
def test_postgres_uses_the_gin_indexes(db, model, column, index):
    with connection.cursor() as cursor:
        constraints = connection.introspection.get_constraints(cursor, model._meta.db_table)
    assert constraints[index]["type"] == "gin"
    with connection.cursor() as cursor:
        cursor.execute("SET LOCAL enable_seqscan = off")
    plan = search.matching(model.objects.all(), column, "needle").explain()
    assert index in plan, plan


def _search_indexes() -> set[str]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT indexname FROM pg_indexes WHERE indexname IN (%s, %s)",
                       ["message_content_search_idx", "session_title_search_idx"])
        return {row[0] for row in cursor.fetchall()}


@only_postgres
@pytest.mark.parametrize("transactional", [True, False], ids=["concurrently", "in-a-transaction"])
def test_the_index_migration_reverses_and_applies_again(request, transactional):
    """Unapplied, the indexes are gone; applied again (CONCURRENTLY outside a transaction,
    plainly inside one), they are back, valid."""
    from django.db.migrations.executor import MigrationExecutor

    request.getfixturevalue("transactional_db" if transactional else "db")
    executor = MigrationExecutor(connection)
    leaves = executor.loader.graph.leaf_nodes()
    executor.migrate([("sessions_app", "0008_message_tree")])
    assert _search_indexes() == set()
    executor = MigrationExecutor(connection)
    executor.migrate(leaves)
    assert _search_indexes() == {"message_content_search_idx", "session_title_search_idx"}
    with connection.cursor() as cursor:
        cursor.execute("SELECT bool_and(i.indisvalid) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                       "WHERE c.relname LIKE %s", ["%_search_idx"])
        assert cursor.fetchone()[0] is True
