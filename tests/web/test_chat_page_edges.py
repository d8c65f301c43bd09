"""End to end, in Chromium through a real uvicorn (see test_chat_page): the chat page's rough
edges of issue 13. Money at 2 places with the exact amount in a tooltip, full model names,
renaming and deleting sessions, the session list disabled while an answer streams, and a 402
message that says what the message needs and what is available; the login rate limit's page
and the admin's one-time key page. Screenshots go to /tmp/screens/ (looked at by hand).
"""

from __future__ import annotations

import re
from decimal import ROUND_CEILING, Decimal
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model
from playwright.sync_api import expect

from billing_app import services
from billing_app.models import Wallet
from sessions_app.models import ChatSession, Turn
from tests.web import test_chat_page as chat_page
from tests.web.test_chat_page import MODEL, expect_balance, log_in, orm, state_of, wait_for

pytestmark = pytest.mark.browser

fake_provider = chat_page.fake_provider
browser = chat_page.browser
page = chat_page.page

SCREENS = Path("/tmp/screens")
LONG_MODEL = "meta-llama/llama-3.3-70b-instruct:free"
LONGER_MODEL = "mistralai/mistral-small-3.2-24b-instruct-2506:free"
LONG_PROMPT = " ".join(f"word{i}" for i in range(50))  # about 6 s of answer at 0.1 s a word


def shot(page, name: str) -> None:
    SCREENS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENS / f"{name}.png"))


def price(model: str) -> None:
    services.set_price(model=model, prompt_per_mtok=Decimal("0.15"), completion_per_mtok=Decimal("0.6"))


def fits(locator) -> bool:
    """The element's text is not cut: nothing overflows it, and it lies inside the sidebar
    (or the chat header)."""
    return locator.evaluate("""el => {
        const box = el.getBoundingClientRect();
        const outer = el.closest('.sidebar, .chat-header').getBoundingClientRect();
        return el.scrollWidth <= el.clientWidth + 1 && box.right <= outer.right + 1 && box.width > 0;
    }""")


def session_items(page):
    return page.get_by_test_id("session-item")


def test_money_shows_two_places_with_the_exact_amount_in_a_tooltip(page, make_user):
    user = orm(make_user, "hana", "12.345678")
    orm(ChatSession.objects.create, user=user, model=MODEL)
    log_in(page, "hana")
    expect_balance(page, "12.345678")
    expect(page.get_by_test_id("balance")).to_have_text("12.34")  # rounded down: never more than there is
    shot(page, "money-two-places")

    page.get_by_test_id("composer").fill("Hello")
    page.get_by_test_id("send").click()
    expect(page.get_by_test_id("assistant-message").last).to_have_attribute("data-status", "completed")
    wallet = orm(Wallet.objects.get, user=user)
    assert wallet.balance < Decimal("12.345678")
    expect_balance(page, wallet.balance)


def test_long_model_names_are_shown_in_full(page, make_user):
    for model in (LONG_MODEL, LONGER_MODEL, "x/short"):
        orm(price, model)
    user = orm(make_user, "ivan", "10")
    log_in(page, "ivan")
    select = page.get_by_test_id("model-select")
    full = page.get_by_test_id("model-full")

    select.select_option(LONGER_MODEL)
    expect(select).to_have_attribute("title", LONGER_MODEL)
    expect(full).to_be_visible()
    expect(full).to_have_text(LONGER_MODEL)
    assert fits(full)
    select.select_option("x/short")
    expect(select).to_have_attribute("title", "x/short")
    expect(full).to_be_hidden()  # it fits in the select itself

    select.select_option(LONG_MODEL)
    expect(full).to_have_text(LONG_MODEL)
    page.get_by_test_id("new-session").click()
    expect(session_items(page)).to_have_count(1)
    assert orm(ChatSession.objects.get, user=user).model == LONG_MODEL
    listed = session_items(page).first.locator(".model-name")
    expect(listed).to_have_text(LONG_MODEL)
    assert fits(listed)
    header = page.get_by_test_id("session-model")
    expect(header).to_have_text(LONG_MODEL)
    assert fits(header)
    # Every option carries the whole name (the open list shows it; its tooltip says the prices).
    options = select.locator("option").evaluate_all("os => os.map(o => [o.textContent, o.title])")
    assert [LONG_MODEL, f"{LONG_MODEL}: 0.150000 credits per million prompt tokens, 0.600000 per million "
                        "answer tokens"] in [list(o) for o in options]
    shot(page, "model-names-full")


def test_sessions_are_renamed_and_deleted_from_the_page(page, make_user):
    user = orm(make_user, "judy", "10")
    older = orm(ChatSession.objects.create, user=user, model=MODEL, title="Older one")
    newer = orm(ChatSession.objects.create, user=user, model=MODEL, title="Trip plans")
    log_in(page, "judy")
    title = page.get_by_test_id("session-title")
    expect(title).to_have_text("Trip plans")

    # Rename: the title becomes a field; Enter saves it through PATCH /sessions/{id}.
    page.get_by_test_id("rename-session").click()
    field = page.get_by_test_id("rename-input")
    expect(field).to_be_focused()
    expect(field).to_have_value("Trip plans")
    shot(page, "rename-open")
    field.fill("Lisbon in May")
    field.press("Enter")
    expect(title).to_have_text("Lisbon in May")
    expect(field).to_be_hidden()
    expect(page.locator(f'[data-session-id="{newer.id}"] .session-name')).to_have_text("Lisbon in May")
    assert orm(ChatSession.objects.get, pk=newer.pk).title == "Lisbon in May"

    # Esc cancels; a title with markup is stored and shown as text, never run.
    page.get_by_test_id("rename-session").click()
    field.fill("never saved")
    field.press("Escape")
    expect(title).to_have_text("Lisbon in May")
    hostile = '<img src=x onerror="window.__pwned=1"><b>bold</b>'
    page.get_by_test_id("rename-session").click()
    field.fill(hostile)
    page.get_by_test_id("rename-save").click()
    expect(title).to_have_text(hostile)
    expect(page.locator(f'[data-session-id="{newer.id}"] .session-name')).to_have_text(hostile)
    assert page.locator(".sidebar img, .chat-header img, .sidebar b").count() == 0
    assert page.evaluate("window.__pwned") is None
    assert orm(ChatSession.objects.get, pk=newer.pk).title == hostile

    # Delete asks first; Cancel keeps the session.
    page.get_by_test_id("delete-session").click()
    confirm = page.get_by_test_id("delete-confirm")
    expect(confirm).to_be_visible()
    expect(confirm).to_contain_text(f"Delete “{hostile}” and all its messages? This cannot be undone.")
    shot(page, "delete-confirm")
    page.get_by_test_id("delete-no").click()
    expect(confirm).to_be_hidden()
    assert orm(ChatSession.objects.filter(pk=newer.pk).exists)

    # Confirmed: DELETE /sessions/{id}; the next session opens.
    page.get_by_test_id("delete-session").click()
    page.get_by_test_id("delete-yes").click()
    expect(session_items(page)).to_have_count(1)
    expect(title).to_have_text("Older one")
    expect(page.locator(f'[data-session-id="{older.id}"]')).to_have_attribute("aria-current", "true")
    assert not orm(ChatSession.objects.filter(pk=newer.pk).exists)
    expect(page.get_by_test_id("error")).to_be_hidden()
    assert page.url.endswith(f"#session={older.id}")

    # The last one: the page says there is none, and there is nothing to rename or delete.
    page.get_by_test_id("delete-session").click()
    page.get_by_test_id("delete-yes").click()
    expect(session_items(page)).to_have_count(0)
    expect(title).to_have_text("No session selected")
    expect(page.get_by_test_id("messages")).to_contain_text("No sessions yet")
    expect(page.get_by_test_id("rename-session")).to_be_disabled()
    expect(page.get_by_test_id("delete-session")).to_be_disabled()
    expect(page.get_by_test_id("composer")).to_be_disabled()
    assert not orm(ChatSession.objects.filter(user=user).exists)
    shot(page, "deleted-all")
    page.reload()
    page.wait_for_selector("#app[data-ready=true]")
    expect(session_items(page)).to_have_count(0)


def test_the_session_list_is_disabled_while_an_answer_streams(page, make_user):
    user = orm(make_user, "kim", "10")
    other = orm(ChatSession.objects.create, user=user, model=MODEL, title="Other session")
    failing = orm(ChatSession.objects.create, user=user, model="fake/error-mid", title="Failing session")
    current = orm(ChatSession.objects.create, user=user, model=MODEL, title="Current session")
    log_in(page, "kim")
    items = session_items(page)
    locked = page.get_by_test_id("sessions-locked")
    expect(items).to_have_count(3)
    expect(locked).to_be_hidden()

    def expect_locked(is_locked: bool) -> None:
        for i in range(3):
            (expect(items.nth(i)).to_be_disabled if is_locked else expect(items.nth(i)).to_be_enabled)()
        for hook in ("new-session", "model-select", "delete-session"):
            target = page.get_by_test_id(hook)
            (expect(target).to_be_disabled if is_locked else expect(target).to_be_enabled)()
        (expect(locked).to_be_visible if is_locked else expect(locked).to_be_hidden)()

    page.get_by_test_id("composer").fill(LONG_PROMPT)
    page.get_by_test_id("send").click()
    answer = page.get_by_test_id("assistant-message").last
    wait_for(lambda: state_of(answer)[1].count(" ") >= 3, what="a few words")
    expect_locked(True)
    expect(locked).to_contain_text("Other sessions can be opened when it is finished or stopped.")
    expect(page.get_by_test_id("session-list")).to_have_attribute("aria-disabled", "true")
    expect(page.get_by_test_id("rename-session")).to_be_enabled()  # renaming does not disturb the answer
    shot(page, "list-disabled-while-streaming")
    page.locator(f'[data-session-id="{other.id}"]').click(force=True)  # a disabled button: nothing happens
    expect(page.get_by_test_id("session-title")).to_have_text("Current session")

    # done: unlocked again.
    expect(answer).to_have_attribute("data-status", "completed", timeout=20_000)
    expect_locked(False)
    expect(page.get_by_test_id("session-list")).to_have_attribute("aria-disabled", "false")

    # Stop: unlocked once the turn ended.
    page.get_by_test_id("composer").fill(LONG_PROMPT)
    page.get_by_test_id("send").click()
    answer = page.get_by_test_id("assistant-message").last
    wait_for(lambda: state_of(answer)[1].count(" ") >= 2, what="a few words")
    expect_locked(True)
    page.get_by_test_id("stop").click()
    expect(answer).to_have_attribute("data-status", "cancelled")
    expect_locked(False)
    wait_for(lambda: not orm(Turn.objects.filter(session=current, status="running").exists), what="the close")

    # error (the provider fails mid-answer): unlocked too.
    page.locator(f'[data-session-id="{failing.id}"]').click()
    expect(page.get_by_test_id("session-title")).to_have_text("Failing session")
    page.get_by_test_id("composer").fill("Hello there, model")
    page.get_by_test_id("send").click()
    expect(page.get_by_test_id("error")).to_contain_text("failed while answering")
    expect_locked(False)
    page.locator(f'[data-session-id="{other.id}"]').click()
    expect(page.get_by_test_id("session-title")).to_have_text("Other session")


NOT_ENOUGH = re.compile(r"^Not enough credits for this message\. It needs (\d+\.\d\d) credits and (\d+\.\d\d) are "
                        r"available\. Ask an administrator to grant you credits\.$")


def test_the_402_message_says_what_the_message_needs_and_what_is_available(page, make_user):
    user = orm(make_user, "leo", "0.030000")
    orm(ChatSession.objects.create, user=user, model=MODEL)
    log_in(page, "leo")
    page.get_by_test_id("composer").fill("Hello there")
    page.get_by_test_id("send").click()
    error = page.get_by_test_id("error")
    expect(error).to_be_visible()
    text = error.text_content()
    match = NOT_ENOUGH.match(text)
    assert match, text
    assert "(" not in text and ")" not in text
    # The exact amounts are the tooltip; the text rounds what is needed up, what is there down.
    exact = re.fullmatch(r"Exact amounts: needs (\d+\.\d{6}), available (\d+\.\d{6}) credits",
                         error.get_attribute("title"))
    assert exact, error.get_attribute("title")
    exact_needed, exact_available = Decimal(exact[1]), Decimal(exact[2])
    # The fixture's price: 1000 per million prompt tokens, 2000 per million output tokens; at
    # least 16 output tokens (0.032) and the prompt: more than the 0.03 there is.
    assert exact_available == Decimal("0.03") and exact_needed > Decimal("0.032")
    assert Decimal(match[1]) == exact_needed.quantize(Decimal("0.01"), rounding=ROUND_CEILING)
    assert Decimal(match[2]) == Decimal("0.03")
    expect(page.get_by_test_id("composer")).to_have_value("Hello there")
    shot(page, "402-message")
    assert not orm(Turn.objects.filter(user=user).exists)


def test_the_402_message_of_an_empty_wallet(page, make_user):
    user = orm(make_user, "mia")  # never granted anything
    orm(ChatSession.objects.create, user=user, model=MODEL)
    log_in(page, "mia")
    expect_balance(page, "0")
    page.get_by_test_id("composer").fill("Hello")
    page.get_by_test_id("send").click()
    error = page.get_by_test_id("error")
    # The 402 body's `needed` and `available` fields (not only its text) give the amounts.
    expect(error).to_have_text(re.compile(r"^Not enough credits for this message\. It needs \d+\.\d\d credits and "
                                          r"0\.00 are available\. Ask an administrator to grant you credits\.$"))
    expect(error).to_have_attribute("title", re.compile(r"^Exact amounts: needs \d+\.\d{6}, available 0\.000000 "
                                                        r"credits$"))


def test_a_locked_login_shows_a_clear_429_page(page, make_user, settings):
    settings.PANTHEON_LOGIN_FAILURES_PER_USER = 3
    orm(make_user, "nina", "1")
    page.goto("/accounts/login/")
    for _ in range(3):
        page.get_by_label("Username").fill("nina")
        page.get_by_label("Password").fill("wrong")
        with page.expect_response(lambda r: r.url.endswith("/accounts/login/") and r.request.method == "POST") as r:
            page.get_by_test_id("login-submit").click()
        assert r.value.status == 200
        expect(page.get_by_test_id("login-error")).to_contain_text("correct username and password")
    page.get_by_label("Username").fill("nina")
    page.get_by_label("Password").fill("pw")
    with page.expect_response(lambda r: r.url.endswith("/accounts/login/") and r.request.method == "POST") as r:
        page.get_by_test_id("login-submit").click()
    assert r.value.status == 429 and int(r.value.headers["retry-after"]) > 800
    expect(page.get_by_test_id("login-error")).to_have_text(
        "Too many failed login attempts for this username. Please wait 15 minutes and try again.")
    shot(page, "login-429")


def test_the_admin_shows_a_new_key_once_and_no_cookie_carries_it(page, make_user):
    orm(get_user_model().objects.create_superuser, "root", "root@example.com", "pw")
    orm(make_user, "olga", "1")
    page.goto("/admin/login/")
    page.get_by_label("Username").fill("root")
    page.get_by_label("Password").fill("pw")
    page.get_by_role("button", name="Log in").click()
    page.goto("/admin/accounts/apikey/add/")
    page.get_by_label("User").select_option(label="olga")
    page.get_by_label("Name").fill("laptop")
    with page.expect_response(lambda r: r.url.endswith("/apikey/add/") and r.request.method == "POST") as r:
        page.get_by_role("button", name="Save", exact=True).click()
    assert r.value.status == 200
    raw = page.get_by_test_id("new-api-key").text_content()
    assert raw.startswith("pk_") and len(raw) > 40
    assert all(raw not in (cookie["value"] or "") for cookie in page.context.cookies())
    assert raw not in (r.value.headers.get("set-cookie") or "")
    shot(page, "admin-new-key")
    page.goto("/admin/accounts/apikey/")
    assert raw not in page.content()


MONEY_CASES = [
    # (value, direction, shown)
    ("10.000000", "down", "10.00"), ("9.999986", "down", "9.99"), ("9.999986", "up", "10.00"),
    ("0.000010", "down", "0.00"), ("0.000010", "up", "0.01"), ("0.010000", "up", "0.01"),
    ("12.345678", "down", "12.34"), ("-0.000001", "down", "-0.01"), ("-0.000001", "up", "0.00"),
    ("-1.500000", "down", "-1.50"), ("123456789.123456", "down", "123456789.12"), ("7", "down", "7.00"),
    ("0.5", "up", "0.50"), ("not money", "down", "not money"),
]
CREDIT_CASES = [
    ("This turn needs 0.041200 credits (its prompt and 16 output tokens); 0.030000 are available.", None,
     "Not enough credits for this message. It needs 0.05 credits and 0.03 are available. "
     "Ask an administrator to grant you credits."),
    ("Your wallet has no available credits (0.000000).", None,
     "Not enough credits for this message. Your wallet has 0.00 credits available. "
     "Ask an administrator to grant you credits."),
    ("Your wallet has no available credits.", "1.234567",
     "Not enough credits for this message. Your wallet has 1.23 credits available. "
     "Ask an administrator to grant you credits."),
    ("", None, "Not enough credits for this message. Ask an administrator to grant you credits."),
]


def test_the_page_money_module(browser, live_server_url):
    page = browser.new_page(base_url=live_server_url)
    try:
        page.goto("/accounts/login/")
        got = page.evaluate("""async ([money, credits]) => {
            const m = await import('/static/web/money.js');
            return [money.map(([v, d]) => m.money(v, d)), credits.map(([d, a]) => m.notEnoughCredits(d, a))];
        }""", [[[v, d] for v, d, _ in MONEY_CASES], [[d, a] for d, a, _ in CREDIT_CASES]])
    finally:
        page.close()
    assert got[0] == [shown for _, _, shown in MONEY_CASES]
    assert got[1] == [text for _, _, text in CREDIT_CASES]
