"""End to end: the chat page in Debian's headless Chromium, driven by Playwright, against the
real app under uvicorn with the offline fake provider.

Chromium comes from Debian's `chromium` package (bin/test installs it when it is missing);
Playwright never downloads a browser here. Sync Playwright API, in plain (non-async) tests.

While the sync API is active, its event loop counts as running in this thread, so Django
refuses ORM calls here (SynchronousOnlyOperation). The tests therefore touch the database
through `orm()`, on a worker thread, and start the browser per test, after the database
fixtures and stopped before their teardown (which flushes the database).
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from decimal import ROUND_FLOOR, Decimal
from pathlib import Path

import pytest
from django.db import connections
from playwright.sync_api import expect, sync_playwright

from billing_app import services
from billing_app.models import Wallet
from llm_gateway import FakeGateway
from sessions_app.models import ChatSession, Message, Turn

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-quic", "--no-first-run"]
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
MODEL = "fake/echo"
CHUNK_DELAY = 0.1


def orm(fn, *args, **kwargs):
    """Run a database call on a worker thread (see the module docstring) and return its result."""

    def call():
        try:
            return fn(*args, **kwargs)
        finally:
            connections.close_all()

    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(call).result(timeout=30)


@pytest.fixture
def fake_provider(settings, transactional_db):
    """The offline fake model, slow enough (0.1 s per word) that a stream can be watched."""
    settings.PANTHEON_LLM_PROVIDER = "fake"
    settings.PANTHEON_FAKE_CHUNK_DELAY_SECONDS = CHUNK_DELAY
    settings.PANTHEON_DEFAULT_MODEL = MODEL
    for model in (MODEL, "fake/error", "fake/error-mid"):
        services.set_price(model=model, prompt_per_mtok=Decimal("1000"), completion_per_mtok=Decimal("2000"))


@pytest.fixture
def browser(live_server_url, fake_provider):
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: `apt-get install chromium` (bin/test does it)"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, live_server_url):
    context = browser.new_context(base_url=live_server_url, viewport={"width": 1100, "height": 750})
    context.set_default_timeout(10_000)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def log_in(page, username: str) -> None:
    page.goto("/")
    assert page.url.endswith("/accounts/login/?next=/")  # the page needs a login
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill("pw")
    page.get_by_test_id("login-submit").click()
    page.wait_for_selector("#app[data-ready=true]")


def shown_money(value: Decimal | str) -> str:
    """An amount as the page shows it: 2 places, rounded down (what the wallet has)."""
    return f"{Decimal(value).quantize(Decimal('0.01'), rounding=ROUND_FLOOR):.2f}"


def expect_balance(page, value: Decimal | str) -> None:
    """The balance shows at 2 places, with the exact amount (6 places) in its tooltip."""
    exact = f"{Decimal(value):.6f}"
    balance = page.get_by_test_id("balance")
    expect(balance).to_have_attribute("data-exact", exact)
    expect(balance).to_have_text(shown_money(value))
    expect(balance).to_have_attribute("title", f"{exact} credits")


def state_of(locator) -> tuple[str, str]:
    """(data-status, text) of an assistant message, read at one instant."""
    status, text = locator.evaluate("el => [el.dataset.status, el.textContent]")
    return status, text


def watch_answer(answer, *, on_partial=None, timeout: float = 20.0) -> tuple[str, list[str]]:
    """Watch an assistant message until it is completed: (its final text, the distinct
    partial texts seen on the way). `on_partial(n)` is called with the count of partials
    each time a new one shows (a test takes its screenshot there)."""
    partials: list[str] = []
    deadline = time.monotonic() + timeout
    while True:
        status, text = state_of(answer)
        if status == "completed":
            return text, partials
        assert status in {"pending", "streaming"}, (status, text)
        if text and text not in partials:
            partials.append(text)
            if on_partial is not None:
                on_partial(len(partials))
        assert time.monotonic() < deadline, "the answer never completed"
        time.sleep(0.02)


def wait_for(predicate, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_answer_streams_live_and_matches_what_was_stored(page, make_user):
    user = orm(make_user, "carol", "10")
    log_in(page, "carol")
    expect_balance(page, "10")

    page.get_by_test_id("model-select").select_option(MODEL)
    page.get_by_test_id("new-session").click()
    item = page.get_by_test_id("session-item")
    expect(item).to_have_count(1)
    expect(item).to_have_attribute("aria-current", "true")
    session = orm(ChatSession.objects.get, user=user)
    assert session.model == MODEL
    expect(page.get_by_test_id("fake-label")).to_be_visible()

    prompt = "Tell me, in a few words, how streaming works"
    page.get_by_test_id("composer").fill(prompt)
    page.get_by_test_id("send").click()
    answer = page.get_by_test_id("assistant-message").last
    expect(page.get_by_test_id("stop")).to_be_enabled()

    def screenshot(count: int) -> None:
        if count == 2:
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "chat-mid-stream.png"))

    final, partials = watch_answer(answer, on_partial=screenshot)

    # The whole text may show just before `done` (sent after the turn is stored); before
    # that, at least two shorter states must have been seen.
    growing = [p for p in partials if p != final]
    assert len(growing) >= 2, partials
    assert all(final.startswith(p) for p in partials)
    assert [len(p) for p in partials] == sorted(len(p) for p in partials)  # it only grows

    turn = orm(Turn.objects.get, session=session)
    stored = orm(Message.objects.get, turn=turn, role="assistant").content
    assert turn.status == "completed" and turn.streamed
    assert final == stored == FakeGateway.reply_for([{"role": "user", "content": prompt}])
    wallet = orm(Wallet.objects.get, user=user)
    assert wallet.balance < Decimal("10")
    expect_balance(page, wallet.balance)
    expect(page.get_by_test_id("error")).to_be_hidden()
    expect(page.get_by_test_id("user-message").last).to_have_text(prompt)
    expect(page.get_by_test_id("send")).to_be_enabled()
    expect(page.get_by_test_id("stop")).to_be_disabled()

    # The history, loaded from the API, shows the same exchange after a reload.
    page.reload()
    page.wait_for_selector("#app[data-ready=true]")
    expect(page.get_by_test_id("assistant-message")).to_have_text(stored)
    expect(page.get_by_test_id("user-message")).to_have_text(prompt)
    expect_balance(page, wallet.balance)


def test_a_user_without_enough_credits_sees_the_402_message(page, make_user):
    user = orm(make_user, "dave", "0.000010")
    orm(ChatSession.objects.create, user=user, model=MODEL)
    log_in(page, "dave")
    expect_balance(page, "0.000010")
    expect(page.get_by_test_id("balance")).to_have_text("0.00")
    page.get_by_test_id("composer").fill("Hello there")
    page.get_by_test_id("send").click()

    error = page.get_by_test_id("error")
    expect(error).to_be_visible()
    expect(error).to_contain_text("Not enough credits")
    expect(page.get_by_test_id("assistant-message")).to_have_count(0)
    expect(page.get_by_test_id("composer")).to_have_value("Hello there")  # given back, not lost
    expect(page.get_by_test_id("send")).to_be_enabled()
    assert not orm(Turn.objects.filter(user=user).exists)


def test_stop_ends_the_stream_and_the_turn_is_stored_cancelled(page, make_user):
    user = orm(make_user, "erin", "10")
    session = orm(ChatSession.objects.create, user=user, model=MODEL)
    log_in(page, "erin")
    prompt = " ".join(f"word{i}" for i in range(60))  # about 7 s of answer at 0.1 s a word
    page.get_by_test_id("composer").fill(prompt)
    page.get_by_test_id("send").click()
    answer = page.get_by_test_id("assistant-message").last
    wait_for(lambda: state_of(answer)[1].count(" ") >= 2, what="a few words")
    page.get_by_test_id("stop").click()

    expect(answer).to_have_attribute("data-status", "cancelled")
    shown = answer.text_content()
    turn = wait_for(lambda: orm(Turn.objects.filter(session=session).exclude(status="running").first),
                    what="the cancelled turn")
    assert turn.status == "cancelled"
    stored = orm(Message.objects.get, turn=turn, role="assistant").content
    full = FakeGateway.reply_for([{"role": "user", "content": prompt}])
    assert shown and stored.startswith(shown) and len(stored) < len(full)
    expect(page.get_by_test_id("send")).to_be_enabled()
    expect(page.get_by_test_id("stop")).to_be_disabled()
    expect(page.get_by_test_id("error")).to_be_hidden()
    # The page refreshes the balance once the server has stored and billed the cancelled turn.
    expect_balance(page, orm(Wallet.objects.get, user=user).balance)


def test_upstream_errors_before_and_during_the_stream_are_shown(page, make_user):
    user = orm(make_user, "frank", "10")
    at_once = orm(ChatSession.objects.create, user=user, model="fake/error")
    mid = orm(ChatSession.objects.create, user=user, model="fake/error-mid")
    log_in(page, "frank")
    error = page.get_by_test_id("error")

    # The newest session (fake/error-mid) is selected first: the stream starts, then fails.
    expect(page.locator(f'[data-session-id="{mid.id}"]')).to_have_attribute("aria-current", "true")
    page.get_by_test_id("composer").fill("Hello there, model")
    page.get_by_test_id("send").click()
    expect(error).to_contain_text("failed while answering")
    answer = page.get_by_test_id("assistant-message").last
    expect(answer).to_have_attribute("data-status", "failed")
    turn = orm(Turn.objects.get, session=mid)
    assert turn.status == "failed"
    assert answer.text_content() == orm(Message.objects.get, turn=turn, role="assistant").content != ""

    # fake/error fails before the stream: a JSON 502.
    page.locator(f'[data-session-id="{at_once.id}"]').click()
    expect(page.get_by_test_id("session-model")).to_have_text("fake/error")
    expect(error).to_be_hidden()
    page.get_by_test_id("composer").fill("Hello again")
    page.get_by_test_id("send").click()
    expect(error).to_contain_text("model provider failed before answering")
    assert orm(Turn.objects.get, session=at_once).status == "failed"
    expect(page.get_by_test_id("send")).to_be_enabled()


PARSER_CASES = [
    # (pieces fed one after another, expected [event, data, id] list)
    (["event: chunk\r\nid: 1\r\ndata: {\"delta\": \"a\"}\r\n\r\n"], [["chunk", '{"delta": "a"}', "1"]]),
    (["data: x\r", "\ndata: y\r", "\r"], [["message", "x\ny", ""]]),  # CR|LF split across reads
    (["data: a\rdata: b\r\r"], [["message", "a\nb", ""]]),  # bare CR line endings
    (["\ufeffdata: bom\n\n"], [["message", "bom", ""]]),
    ([": ping\n\n", "data: after comment\n\n"], [["message", "after comment", ""]]),
    (["data\n\n"], [["message", "", ""]]),  # a field without a colon has an empty value
    (["event: lonely\n\n", "data: typed?\n\n"], [["message", "typed?", ""]]),  # no data: no event
    (["data:no-space\n\n", "data:  two\n\n"], [["message", "no-space", ""], ["message", " two", ""]]),
    (["id: 5\ndata: a\n\n", "id: x\u0000y\ndata: b\n\n"], [["message", "a", "5"], ["message", "b", "5"]]),
    (["retry: 10\nfoo: bar\ndata: c\n\n"], [["message", "c", ""]]),
    (["data: complete\n\ndata: incomplete at the end"], [["message", "complete", ""]]),
]

STREAM = ('event: start\r\ndata: {"turn_id": "t"}\r\nid: 1\r\n\r\n: ping\r\n\r\n'
          'event: chunk\ndata: {"delta": "H\\u00e9"}\nid: 2\n\n'
          'event: chunk\rdata: {"delta": "llo"}\rid: 3\r\r'
          'event: done\ndata: {"balance": "1.000000"}\nid: 4\n\n')


def test_the_page_sse_parser_follows_the_spec(browser, live_server_url):
    page = browser.new_page(base_url=live_server_url)
    try:
        page.goto("/accounts/login/")
        run = """async ([cases, stream]) => {
            const { SSEParser } = await import('/static/web/sse.js');
            const parse = (pieces) => {
                const out = [];
                const parser = new SSEParser((e) => out.push([e.event, e.data, e.id]));
                for (const piece of pieces) parser.feed(piece);
                return out;
            };
            const results = cases.map(([pieces]) => parse(pieces));
            // The same stream cut at every position, and fed one character at a time.
            const whole = parse([stream]);
            const splits = [];
            for (let i = 0; i <= stream.length; i++) splits.push(parse([stream.slice(0, i), stream.slice(i)]));
            const chars = parse([...stream]);
            return { results, whole, splits, chars };
        }"""
        got = page.evaluate(run, [[[pieces, []] for pieces, _ in PARSER_CASES], STREAM])
    finally:
        page.close()
    for (pieces, expected), result in zip(PARSER_CASES, got["results"], strict=True):
        assert result == expected, pieces
    assert [(e, json.loads(d), i) for e, d, i in got["whole"]] == [
        ("start", {"turn_id": "t"}, "1"), ("chunk", {"delta": "Hé"}, "2"),
        ("chunk", {"delta": "llo"}, "3"), ("done", {"balance": "1.000000"}, "4")]
    assert all(split == got["whole"] for split in got["splits"])
    assert got["chars"] == got["whole"]
