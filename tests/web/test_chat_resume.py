"""End to end, in Chromium through a real uvicorn (see test_chat_page): the chat page keeps
an answer across a reload, stops a turn on the server, and retries a send that failed on the
network with the same Idempotency-Key, so it is run and billed once (SPEC sections 11, 12).
"""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest
from playwright.sync_api import expect

from billing_app.models import LedgerEntry, Wallet
from llm_gateway import FakeGateway
from sessions_app.models import ChatSession, Message, Turn
from tests.web import test_chat_page as chat_page
from tests.web.test_chat_page import MODEL, expect_balance, log_in, orm, state_of, wait_for, watch_answer

pytestmark = pytest.mark.browser

# The browser fixtures of test_chat_page (the fake provider at 0.1 s a word).
fake_provider = chat_page.fake_provider
browser = chat_page.browser
page = chat_page.page

SHOTS = Path("/tmp/shots")
LONG_PROMPT = " ".join(f"word{i}" for i in range(50))  # about 6 s of answer at 0.1 s a word


def shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"))


def api_json(page, path: str):
    response = page.request.get(f"/api/v1/{path}")
    assert response.ok, (path, response.status, response.text())
    return response.json()


def debits_of(turn_id) -> int:
    return LedgerEntry.objects.filter(turn_id=turn_id, kind=LedgerEntry.Kind.DEBIT).count()


def watch_requests(page, fragment: str) -> list:
    """Every request whose URL contains `fragment`, as the page sent it."""
    seen: list = []
    page.on("request", lambda request: seen.append(request) if fragment in request.url else None)
    return seen


def the_turn_and_answer(session) -> tuple[Turn, str]:
    """The session's one turn and its stored answer."""
    turn = Turn.objects.get(session=session)
    return turn, Message.objects.get(turn=turn, role="assistant").content


def test_a_reload_mid_answer_shows_it_so_far_and_continues_it_live(page, make_user):
    user = orm(make_user, "grace", "10")
    session = orm(ChatSession.objects.create, user=user, model=MODEL)
    posts = watch_requests(page, "/turns/stream")
    log_in(page, "grace")
    page.get_by_test_id("composer").fill(LONG_PROMPT)
    page.get_by_test_id("send").click()
    answer = page.get_by_test_id("assistant-message").last
    wait_for(lambda: state_of(answer)[1].count(" ") >= 4, what="a few words")
    before = state_of(answer)[1]
    turn_id = answer.get_attribute("data-turn-id")
    assert turn_id
    [post] = posts
    assert post.post_data_json == {"content": LONG_PROMPT, "resumable": True}
    assert post.headers.get("idempotency-key")

    events = watch_requests(page, f"/turns/{turn_id}/events")
    page.reload()
    page.wait_for_selector("#app[data-ready=true]")
    # The stored user message, then the answer followed live in one new bubble.
    expect(page.get_by_test_id("user-message")).to_have_text([LONG_PROMPT])
    answer = page.get_by_test_id("assistant-message")
    expect(answer).to_have_count(1)
    expect(answer).to_have_attribute("data-turn-id", turn_id)
    expect(page.get_by_test_id("stop")).to_be_enabled()
    expect(page.get_by_test_id("send")).to_be_disabled()

    final, partials = watch_answer(answer, on_partial=lambda n: n == 3 and shot(page, "resumed-mid-answer"))
    shot(page, "resumed-answer")

    # It went on growing after the reload, from the start, never showing anything twice.
    growing = [p for p in partials if p != final]
    assert len(growing) >= 2, partials
    assert all(final.startswith(p) for p in [before, *partials])
    assert len(events) == 1 and "last-event-id" not in events[0].headers

    turn = orm(Turn.objects.get, session=session)
    assert str(turn.pk) == turn_id and turn.status == "completed"
    messages = api_json(page, f"sessions/{session.pk}/messages")["results"]
    stored = [m["content"] for m in messages if m["role"] == "assistant"]
    assert stored == [final] == [FakeGateway.reply_for([{"role": "user", "content": LONG_PROMPT}])]
    assert orm(debits_of, turn.pk) == 1
    wallet = orm(Wallet.objects.get, user=user)
    assert wallet.balance == Decimal("10") - turn.cost
    expect_balance(page, wallet.balance)
    expect(page.get_by_test_id("error")).to_be_hidden()
    expect(page.get_by_test_id("send")).to_be_enabled()
    expect(page.get_by_test_id("stop")).to_be_disabled()
    assert len(posts) == 1  # the reload sent nothing again


def test_stop_cancels_the_turn_on_the_server_and_keeps_the_partial_answer(page, make_user):
    user = orm(make_user, "heidi", "10")
    session = orm(ChatSession.objects.create, user=user, model=MODEL)
    cancels = watch_requests(page, "/cancel")
    failed: list[str] = []
    page.on("requestfailed", lambda request: failed.append(request.url))
    log_in(page, "heidi")
    page.get_by_test_id("composer").fill(LONG_PROMPT)
    page.get_by_test_id("send").click()
    answer = page.get_by_test_id("assistant-message").last
    wait_for(lambda: state_of(answer)[1].count(" ") >= 3, what="a few words")
    turn_id = answer.get_attribute("data-turn-id")
    page.get_by_test_id("stop").click()

    expect(answer).to_have_attribute("data-status", "cancelled")
    expect(page.get_by_text("Stopped. The partial answer was saved.")).to_be_visible()
    shot(page, "stopped-answer")
    [cancel] = cancels
    assert cancel.method == "POST" and cancel.url.endswith(f"/api/v1/turns/{turn_id}/cancel")
    assert cancel.headers.get("x-csrftoken")
    assert failed == []  # the stream ended with the server's `done`, not by dropping the connection

    turn = api_json(page, f"turns/{turn_id}")
    assert turn["status"] == "cancelled" and turn["session_id"] == str(session.pk)
    shown = answer.text_content()
    stored = orm(Message.objects.get, turn_id=turn_id, role="assistant").content
    full = FakeGateway.reply_for([{"role": "user", "content": LONG_PROMPT}])
    assert shown == stored and 0 < len(stored) < len(full)
    assert orm(debits_of, turn_id) == 1
    expect_balance(page, orm(Wallet.objects.get, user=user).balance)
    expect(page.get_by_test_id("send")).to_be_enabled()
    expect(page.get_by_test_id("stop")).to_be_disabled()
    expect(page.get_by_test_id("error")).to_be_hidden()

    # After a reload the stopped answer is history, with its note.
    page.reload()
    page.wait_for_selector("#app[data-ready=true]")
    answer = page.get_by_test_id("assistant-message")
    expect(answer).to_have_text(stored)
    expect(answer).to_have_attribute("data-status", "cancelled")
    expect(page.get_by_test_id("stop")).to_be_disabled()


@pytest.mark.parametrize("reached_server", [True, False], ids=["after-the-server-ran-it", "before-the-server"])
def test_a_send_that_failed_on_the_network_is_retried_with_the_same_key(page, make_user, reached_server):
    user = orm(make_user, "ivan", "10")
    session = orm(ChatSession.objects.create, user=user, model=MODEL)
    prompt = "Say something short"
    keys: list[str | None] = []

    def flaky(route):
        keys.append(route.request.headers.get("idempotency-key"))
        if len(keys) > 1:
            route.continue_()
            return
        if reached_server:
            route.fetch()  # the server runs the whole turn; the page never hears of it
        route.abort("connectionreset")

    page.route("**/turns/stream", flaky)
    log_in(page, "ivan")
    page.get_by_test_id("composer").fill(prompt)
    page.get_by_test_id("send").click()
    answer = page.get_by_test_id("assistant-message").last
    expect(answer).to_have_attribute("data-status", "completed", timeout=20_000)

    assert len(keys) == 2 and keys[0] and keys[0] == keys[1]
    turn, stored = orm(the_turn_and_answer, session)  # exactly one turn
    assert answer.text_content() == stored == FakeGateway.reply_for([{"role": "user", "content": prompt}])
    assert answer.get_attribute("data-turn-id") == str(turn.pk)
    assert orm(debits_of, turn.pk) == 1
    expect(page.get_by_test_id("error")).to_be_hidden()
    expect(page.get_by_test_id("user-message")).to_have_count(1)
    # A new send gets a new key.
    page.get_by_test_id("composer").fill("And again")
    page.get_by_test_id("send").click()
    expect(page.get_by_test_id("assistant-message").last).to_have_attribute("data-status", "completed")
    assert len(keys) == 3 and keys[2] and keys[2] != keys[0]
    assert orm(Turn.objects.filter(session=session).count) == 2


def cut_stream(route, keep: int) -> str:
    """Fulfil `route` with the stream the server sends, cut after its first `keep` events (as
    if the connection closed there); returns the text of the chunks kept."""
    response = route.fetch()
    frames = response.text().replace("\r\n", "\n").split("\n\n")
    events = [f for f in frames if f.strip() and not f.startswith(":")][:keep]  # not the heartbeats
    kept = "".join(json.loads(line[6:]).get("delta", "") for f in events
                   for line in f.split("\n") if line.startswith("data: "))
    route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body="\n\n".join(events) + "\n\n")
    return kept


def test_a_stream_dropped_after_start_is_resumed_from_the_last_event(page, make_user):
    user = orm(make_user, "judy", "10")
    session = orm(ChatSession.objects.create, user=user, model=MODEL)
    prompt = "Tell me about resuming a stream that dropped twice"
    kept: list[str] = []
    resumes: list = []

    def post_cut_after_two_chunks(route):
        kept.append(cut_stream(route, 3))  # start (id 1), chunks 2 and 3

    def events_cut_once(route):
        resumes.append(route.request.headers.get("last-event-id"))
        if len(resumes) == 1:
            kept.append(cut_stream(route, 2))  # chunks 4 and 5
        else:
            route.continue_()

    page.route("**/turns/stream", post_cut_after_two_chunks)
    page.route("**/events", events_cut_once)
    log_in(page, "judy")
    page.get_by_test_id("composer").fill(prompt)
    page.get_by_test_id("send").click()
    answer = page.get_by_test_id("assistant-message").last
    expect(answer).to_have_attribute("data-status", "completed", timeout=20_000)

    turn, stored = orm(the_turn_and_answer, session)
    assert answer.text_content() == stored and stored.startswith("".join(kept)) and len(kept[1]) > 0
    assert resumes == ["3", "5"]  # each reconnect asks for what came after the last event it had
    assert orm(Turn.objects.filter(session=session).count) == 1
    assert orm(debits_of, turn.pk) == 1
    expect(page.get_by_test_id("error")).to_be_hidden()
