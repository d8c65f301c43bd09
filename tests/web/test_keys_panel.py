"""End to end, in Chromium through a real uvicorn (see test_chat_page): the chat page's keys
panel (SPEC section 16). A user makes a key with a budget and a rate limit on the page, sees
it once, uses it like a script would (httpx, as curl), and revokes it; nothing a user typed
ever runs as HTML. The page runs under a strict Content-Security-Policy (no inline script or
style) added in the test, and must not break it.
"""

from __future__ import annotations

import re
from decimal import Decimal

import httpx
import pytest
from playwright.sync_api import expect

from accounts.models import ApiKey
from billing_app import services
from sessions_app.models import Turn
from tests.web import test_chat_page as chat_page
from tests.web.test_chat_page import MODEL, log_in, orm

pytestmark = pytest.mark.browser

fake_provider = chat_page.fake_provider
browser = chat_page.browser
page = chat_page.page

STRICT_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
              "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
HOSTILE = "<img src=x onerror=alert(1)>"


def under_strict_csp(page) -> list[str]:
    """From now on the chat page (`/`) is served with STRICT_CSP; returns the list the page's
    CSP violations are collected in (Chromium reports each on the console)."""
    violations: list[str] = []

    def add_csp(route):
        response = route.fetch()
        route.fulfill(response=response, headers={**response.headers, "content-security-policy": STRICT_CSP})

    page.route(re.compile(r"^https?://[^/]+/(#.*)?$"), add_csp)
    page.on("console", lambda message: violations.append(message.text)
            if "Content Security Policy" in message.text else None)
    return violations


def open_panel(page):
    page.get_by_test_id("keys-open").click()
    panel = page.get_by_test_id("keys-panel")
    expect(panel).to_be_visible()
    expect(page.get_by_test_id("keys-loading")).to_be_hidden()
    return panel


def plain(amount: Decimal) -> str:
    """An amount as the panel shows it: no trailing zeros, at least 2 places ("0.05", "0.0031")."""
    whole, frac = f"{amount:.6f}".split(".")
    return f"{whole}.{frac.rstrip('0').ljust(2, '0')}"


def bearer(raw: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {raw}"}


def test_a_key_made_on_the_page_is_shown_once_works_with_its_limits_and_is_revoked(
        page, make_user, live_server_url, tmp_path):
    # Cheap enough that the key's budget of 0.05 affords a short answer, dear enough to show.
    orm(services.set_price, model=MODEL, prompt_per_mtok=Decimal("100"), completion_per_mtok=Decimal("200"))
    user = orm(make_user, "kim", "10")
    log_in(page, "kim")
    violations = under_strict_csp(page)
    page.reload()
    page.wait_for_selector("#app[data-ready=true]")
    page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=live_server_url)

    open_panel(page)
    expect(page.get_by_test_id("keys-empty")).to_be_visible()
    expect(page.get_by_test_id("new-key")).to_be_hidden()

    page.get_by_test_id("key-name").fill("nightly script")
    page.get_by_test_id("key-budget").fill("0.05")
    page.get_by_test_id("key-budget-period").select_option("day")
    page.get_by_test_id("key-rpm").fill("7")
    page.get_by_test_id("key-create").click()

    new_key = page.get_by_test_id("new-key")
    expect(new_key).to_be_visible()
    raw = new_key.text_content()
    assert raw.startswith("pk_") and len(raw) > 20, raw
    expect(page.get_by_test_id("keys-error")).to_be_hidden()
    page.screenshot(path=str(tmp_path / "keys-new-key-shown-once.png"))

    page.get_by_test_id("key-copy").click()
    expect(page.get_by_test_id("key-copied")).to_have_text("Copied.")
    assert page.evaluate("navigator.clipboard.readText()") == raw

    # Stored with its limits, as a hash only.
    key = orm(ApiKey.objects.get, user=user)
    assert (key.name, key.budget, key.budget_period, key.rpm) == ("nightly script", Decimal("0.05"), "day", 7)
    assert key.tpm is None and key.max_parallel is None and key.allowed_models is None and key.expires_at is None
    assert raw.startswith(key.prefix) and raw not in key.key_hash

    # The list shows it with its limits, and never the key itself.
    row = page.get_by_test_id("key-row")
    expect(row).to_have_count(1)
    expect(row).to_have_attribute("data-key-id", str(key.pk))
    expect(row.get_by_test_id("key-row-name")).to_have_text("nightly script")
    expect(row.get_by_test_id("key-row-prefix")).to_have_text(f"{key.prefix}…")
    expect(row.get_by_test_id("key-row-budget")).to_have_text("budget 0.05 per day")
    expect(row.get_by_test_id("key-row-rpm")).to_have_text("rpm 7")
    expect(row.get_by_test_id("key-row-tpm")).to_have_count(0)
    expect(row.get_by_test_id("key-row-spent")).to_have_text("Spent today: 0.00 of 0.05")
    expect(row.get_by_test_id("key-row-last-used")).to_have_text("Last used: never")
    assert raw not in row.text_content()
    # Not kept anywhere but on screen.
    stored = page.evaluate("JSON.stringify([Object.entries(localStorage), Object.entries(sessionStorage), "
                           "document.cookie, location.href])")
    assert raw not in stored
    assert all(raw not in cookie["value"] for cookie in page.context.cookies())

    # A script uses it (as curl would): a restricted key cannot manage keys, but it can chat.
    with httpx.Client(base_url=live_server_url, headers=bearer(raw), timeout=30) as script:
        refused = script.get("/api/v1/keys")
        assert refused.status_code == 403 and refused.json()["code"] == "restricted_key", refused.text
        session = script.post("/api/v1/sessions", json={"model": MODEL})
        assert session.status_code == 201, session.text
        turn = script.post(f"/api/v1/sessions/{session.json()['id']}/turns", json={"content": "Hello there"})
        assert turn.status_code == 201, turn.text
        assert turn.headers["x-ratelimit-limit-requests"] == "7"
    spent = orm(lambda: Turn.objects.get(api_key=key).cost)
    assert Decimal(0) < spent <= Decimal("0.05")

    # After a reload the key is gone from the page; the list shows what it spent and when it was used.
    page.reload()
    page.wait_for_selector("#app[data-ready=true]")
    assert raw not in page.content()
    open_panel(page)
    expect(new_key).to_be_hidden()
    expect(new_key).to_have_text("")
    row = page.get_by_test_id("key-row")
    expect(row).to_have_count(1)
    expect(row.get_by_test_id("key-row-spent")).to_have_text(f"Spent today: {plain(spent)} of 0.05")
    expect(row.get_by_test_id("key-row-spent")).to_have_attribute("title", re.compile(rf"^{spent:.6f} credits"))
    expect(row.get_by_test_id("key-row-last-used")).not_to_have_text("Last used: never")
    assert raw not in page.content()
    page.screenshot(path=str(tmp_path / "keys-panel-with-a-key.png"))

    # Revoking asks first: dismissed, nothing happens; accepted, the key stops working at once.
    questions: list[str] = []

    def answer(dialog, accept: bool):
        questions.append(dialog.message)
        dialog.accept() if accept else dialog.dismiss()

    page.once("dialog", lambda dialog: answer(dialog, False))
    row.get_by_test_id("key-revoke").click()
    expect(row).to_have_count(1)
    assert len(questions) == 1 and "nightly script" in questions[0] and key.prefix in questions[0]
    assert orm(lambda: ApiKey.objects.get(pk=key.pk).revoked_at) is None

    page.once("dialog", lambda dialog: answer(dialog, True))
    row.get_by_test_id("key-revoke").click()
    expect(page.get_by_test_id("key-row")).to_have_count(0)
    expect(page.get_by_test_id("keys-empty")).to_be_visible()
    expect(page.get_by_test_id("keys-error")).to_be_hidden()
    assert len(questions) == 2
    assert orm(lambda: ApiKey.objects.get(pk=key.pk).revoked_at) is not None
    gone = httpx.get(f"{live_server_url}/api/v1/wallet", headers=bearer(raw), timeout=10)
    assert gone.status_code == 401, gone.text

    # The panel closes (Escape too) and the chat is untouched.
    page.keyboard.press("Escape")
    expect(page.get_by_test_id("keys-panel")).to_be_hidden()
    expect(page.get_by_test_id("keys-open")).to_have_attribute("aria-expanded", "false")
    expect(page.get_by_test_id("error")).to_be_hidden()
    page.screenshot(path=str(tmp_path / "keys-panel-closed.png"))
    assert not violations, violations


def test_what_a_user_types_is_shown_as_text_and_api_errors_plainly(page, make_user, tmp_path):
    user = orm(make_user, "lou", "10")
    log_in(page, "lou")
    violations = under_strict_csp(page)
    page.reload()
    page.wait_for_selector("#app[data-ready=true]")
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    panel = open_panel(page)
    error = page.get_by_test_id("keys-error")

    # An unknown model (a hostile one) is refused with 400: its name shows as text.
    page.get_by_test_id("key-name").fill("hostile")
    page.get_by_test_id("key-models").fill(f"{MODEL}, {HOSTILE}")
    page.get_by_test_id("key-create").click()
    expect(error).to_be_visible()
    expect(error).to_contain_text(HOSTILE)
    expect(error).to_contain_text("unknown_model")
    expect(error).to_contain_text("The key was not created")
    assert panel.locator("img").count() == 0
    page.screenshot(path=str(tmp_path / "keys-unknown-model-refused.png"))
    expect(page.get_by_test_id("new-key-box")).to_be_hidden()
    expect(page.get_by_test_id("key-row")).to_have_count(0)
    expect(page.get_by_test_id("key-models")).to_have_value(f"{MODEL}, {HOSTILE}")  # kept, to fix it

    # A budget that is not a number: the server's message, plainly.
    page.get_by_test_id("key-models").fill("")
    page.get_by_test_id("key-budget").fill("lots")
    page.get_by_test_id("key-create").click()
    expect(error).to_contain_text("budget")
    expect(error).to_contain_text("(invalid)")
    assert orm(ApiKey.objects.filter(user=user).count) == 0

    # A hostile name and model list are kept and listed as text.
    page.get_by_test_id("key-budget").fill("")
    page.get_by_test_id("key-name").fill(HOSTILE)
    page.get_by_test_id("key-models").fill(MODEL)
    page.get_by_test_id("key-create").click()
    expect(page.get_by_test_id("new-key")).to_be_visible()
    expect(error).to_be_hidden()
    row = page.get_by_test_id("key-row")
    expect(row).to_have_count(1)
    expect(row.get_by_test_id("key-row-name")).to_have_text(HOSTILE)
    expect(row.get_by_test_id("key-row-models")).to_have_text(f"models: {MODEL}")
    assert panel.locator("img").count() == 0

    # "I have copied it" drops the key from the page.
    page.get_by_test_id("new-key-done").click()
    expect(page.get_by_test_id("new-key-box")).to_be_hidden()
    expect(page.get_by_test_id("new-key")).to_have_text("")

    page.wait_for_timeout(300)  # an onerror would have fired by now
    assert dialogs == []
    assert not violations, violations
