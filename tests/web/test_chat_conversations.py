"""The chat page's conversation features (SPEC section 17, issue 18): regenerate, edit,
`‹ i/n ›` switches between siblings, the title the background task writes, search and
export, in Chromium through a real uvicorn (see test_chat_page for the conventions: the
`orm()` helper, the per-test browser).

Answers come from the loopback fake OpenRouter (tests/fake_openrouter.py), scripted so that
every answer is different ("Answer 3 to: ..."): a regenerated answer can then be told from
the one it sits beside. The title test runs a real `manage.py db_worker` beside the server,
pointed at the same database and the same fake OpenRouter, so the title the page shows is
the one the task wrote. Screenshots go to tests/artifacts/conv-*.png (looked at by hand).
"""

from __future__ import annotations

import json
import subprocess
import threading
from decimal import Decimal
from pathlib import Path

import pytest
from playwright.sync_api import expect

from billing_app.models import LedgerEntry, Wallet
from sessions_app.models import ChatSession, Message, Turn
from tests.conftest import MODEL, ROOT, subprocess_env
from tests.fake_openrouter import completion, sse_stream
from tests.web import test_chat_page as chat_page
from tests.web import test_markdown_render as markdown_render
from tests.web.test_chat_page import log_in, orm, wait_for
from tests.web.test_markdown_render import Watch, pieces_of, send

pytestmark = pytest.mark.browser

page = chat_page.page
TITLE_REQUEST = "Reply with a title"  # how sessions_app.titles asks (llm_gateway.fake knows it too)


@pytest.fixture
def browser(live_server_url, fake_openrouter_settings, price):
    """Chromium, with the turns answered by the loopback fake OpenRouter."""
    from playwright.sync_api import sync_playwright

    assert Path(chat_page.CHROMIUM).exists(), f"{chat_page.CHROMIUM} is missing: `apt-get install chromium`"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chat_page.CHROMIUM, args=chat_page.CHROMIUM_ARGS)
        yield browser
        browser.close()


class Answers:
    """Every streamed answer numbered and different: "Answer <n> to: <the last question>";
    a title request answered with `title`. `slow = True` makes the next answers long and slow
    (for a stop)."""

    def __init__(self, title: str = "A scripted title"):
        self.title = title
        self.slow = False
        self.count = 0
        self.lock = threading.Lock()

    def __call__(self, request):
        body = request.body if isinstance(request.body, dict) else {}
        messages = body.get("messages") or []
        if messages and messages[0].get("role") == "system" and str(messages[0].get("content")).startswith(
                TITLE_REQUEST):
            return completion(self.title, usage=(40, 5))
        question = next((m.get("content") for m in reversed(messages) if m.get("role") == "user"), "")
        with self.lock:
            self.count += 1
            number = self.count
        text = f"Answer {number} to: {question}"
        if self.slow:
            text += "".join(f" word{i}" for i in range(80))
            return sse_stream(pieces_of(text, 6), delay=0.08, usage=(20, 90))
        return sse_stream(pieces_of(text, 6), delay=0.01, usage=(20, 10))


@pytest.fixture
def answers(fake_openrouter_settings):
    scripted = Answers()
    fake_openrouter_settings.reply_with(scripted)
    yield scripted
    fake_openrouter_settings.reply_with(None)


def shot(page, name: str) -> None:
    markdown_render.shot(page, f"conv-{name}")


def settled(page) -> None:
    """The turn just written got its buttons (the page matched it to the server's branch)."""
    expect(page.get_by_test_id("regenerate").last).to_be_enabled()


def money_of(user) -> dict:
    """What the ledger says about a user: balance, debits by turn, chat and title turns."""
    wallet = Wallet.objects.get(user=user)
    debits = list(LedgerEntry.objects.filter(user=user, kind="debit").values_list("turn_id", "amount"))
    turns = list(Turn.objects.filter(user=user).values_list("id", "kind", "cost"))
    return {"balance": wallet.balance, "debits": debits, "turns": turns}


def assert_billed_once_per_answer(money: dict, answers: int) -> None:
    chat = [(turn_id, cost) for turn_id, kind, cost in money["turns"] if kind == "chat"]
    assert len(chat) == answers, money
    debited = {turn_id: amount for turn_id, amount in money["debits"]}
    assert len(debited) == len(money["debits"])  # one debit per turn
    for turn_id, cost in chat:
        assert cost > 0 and debited[turn_id] == -cost, money
    assert money["balance"] == Decimal("10") + sum(amount for _, amount in money["debits"])


def bubble(page, role: str, index: int):
    return page.locator(f".msg-{role}").nth(index)


def test_regenerate_then_switch_between_the_two_answers(page, make_user, answers):
    user = orm(make_user, "rita", "10")
    session = orm(ChatSession.objects.create, user=user, model=MODEL, title="Trees")
    log_in(page, "rita")
    first = send(page, "What is a tree?")
    expect(first).to_have_text("Answer 1 to: What is a tree?")
    settled(page)
    expect(page.get_by_test_id("sibling-pos")).to_have_count(0)  # one answer: no switch yet
    regenerate = page.get_by_test_id("regenerate")
    expect(regenerate).to_have_attribute("aria-label", "Regenerate this answer")

    full_renders = "async () => (await import('/static/web/markdown.js')).renderStats.fullRenders"
    before = page.evaluate(full_renders)
    regenerate.click()
    answer = page.get_by_test_id("assistant-message")
    expect(answer).to_have_count(1)  # the new answer takes the old one's place while it streams
    expect(answer).to_have_attribute("data-status", "completed", timeout=20_000)
    expect(answer).to_have_text("Answer 2 to: What is a tree?")
    position = page.get_by_test_id("sibling-pos")
    expect(position).to_have_text("2/2")
    expect(page.get_by_test_id("sibling-next")).to_be_disabled()  # the newest: no next
    expect(page.get_by_test_id("sibling-prev")).to_be_enabled()
    expect(page.get_by_test_id("sibling-prev")).to_have_attribute("aria-label", "Previous version of this answer")
    expect(page.get_by_test_id("user-message")).to_have_count(1)  # a regenerate stores no new question
    # The streamed answer got its buttons from the server's listing without being drawn again.
    assert page.evaluate(full_renders) == before
    shot(page, "regenerated")
    billed = orm(money_of, user)
    assert_billed_once_per_answer(billed, 2)
    assert answers.count == 2

    page.get_by_test_id("sibling-prev").click()
    expect(position).to_have_text("1/2")
    expect(answer).to_have_text("Answer 1 to: What is a tree?")
    expect(page.get_by_test_id("sibling-prev")).to_be_disabled()
    expect(page.get_by_test_id("sibling-next")).to_be_focused()  # the keyboard stays on the switch
    shot(page, "switched-to-first")
    stored = orm(lambda: ChatSession.objects.get(pk=session.pk).current_leaf_id)
    first_answer = orm(Message.objects.filter(session=session, role="assistant").order_by("created_at").first)
    assert stored == first_answer.id

    page.get_by_test_id("sibling-next").click()
    expect(position).to_have_text("2/2")
    expect(answer).to_have_text("Answer 2 to: What is a tree?")
    assert orm(money_of, user) == billed  # switching is free: no turn, no ledger entry
    assert answers.count == 2

    page.reload()
    page.wait_for_selector("#app[data-ready=true]")
    expect(page.get_by_test_id("sibling-pos")).to_have_text("2/2")
    expect(page.get_by_test_id("assistant-message")).to_have_text("Answer 2 to: What is a tree?")


def test_edit_a_message_makes_a_new_branch_with_its_answer(page, make_user, answers, fake_openrouter):
    user = orm(make_user, "edna", "10")
    session = orm(ChatSession.objects.create, user=user, model=MODEL, title="Edits")
    log_in(page, "edna")
    send(page, "First question")
    settled(page)
    send(page, "Second question")
    settled(page)

    second = bubble(page, "user", 1)
    second.get_by_test_id("edit").click()
    field = second.get_by_test_id("edit-input")
    expect(field).to_be_focused()
    expect(field).to_have_value("Second question")
    field.fill("Second question, edited")
    shot(page, "editing")
    second.get_by_test_id("edit-save").click()
    answer = page.get_by_test_id("assistant-message").last
    expect(answer).to_have_attribute("data-status", "completed", timeout=20_000)
    expect(page.get_by_test_id("user-message")).to_have_text(["First question", "Second question, edited"])
    expect(page.get_by_test_id("assistant-message")).to_have_text([
        "Answer 1 to: First question", "Answer 3 to: Second question, edited"])
    position = bubble(page, "user", 1).get_by_test_id("sibling-pos")
    expect(position).to_have_text("2/2")
    expect(bubble(page, "user", 0).get_by_test_id("sibling-pos")).to_have_count(0)
    shot(page, "edited")
    # The edit continued from the first answer: the replaced message was not in its context.
    context = [m["content"] for m in fake_openrouter.chat_requests()[-1].body["messages"]]
    assert context == ["First question", "Answer 1 to: First question", "Second question, edited"]

    bubble(page, "user", 1).get_by_test_id("sibling-prev").click()
    expect(position).to_have_text("1/2")
    expect(page.get_by_test_id("user-message")).to_have_text(["First question", "Second question"])
    expect(page.get_by_test_id("assistant-message").last).to_have_text("Answer 2 to: Second question")
    bubble(page, "user", 1).get_by_test_id("sibling-next").click()
    expect(position).to_have_text("2/2")
    expect(page.get_by_test_id("user-message").last).to_have_text("Second question, edited")

    # The first message too: its parent is null, sent as such (a new root).
    first = bubble(page, "user", 0)
    first.get_by_test_id("edit").click()
    first.get_by_test_id("edit-input").fill("A new start")
    first.get_by_test_id("edit-input").press("Enter")  # Enter saves, as in the composer
    expect(page.get_by_test_id("assistant-message").last).to_have_text("Answer 4 to: A new start", timeout=20_000)
    expect(page.get_by_test_id("user-message")).to_have_text(["A new start"])
    expect(bubble(page, "user", 0).get_by_test_id("sibling-pos")).to_have_text("2/2")
    roots = orm(lambda: list(Message.objects.filter(session=session, parent__isnull=True)
                             .order_by("created_at").values_list("content", flat=True)))
    assert roots == ["First question", "A new start"]
    assert_billed_once_per_answer(orm(money_of, user), 4)

    # Esc in the editor cancels the edit (and only that).
    first = bubble(page, "user", 0)
    first.get_by_test_id("edit").click()
    first.get_by_test_id("edit-input").fill("Never sent")
    first.get_by_test_id("edit-input").press("Escape")
    expect(first.get_by_test_id("edit-input")).to_have_count(0)
    expect(page.get_by_test_id("user-message")).to_have_text(["A new start"])
    expect(first.get_by_test_id("edit")).to_be_focused()
    assert answers.count == 4


def test_a_refused_edit_or_regenerate_puts_the_branch_back(page, make_user, answers):
    from billing_app import services

    user = orm(make_user, "rhea", "10")
    orm(ChatSession.objects.create, user=user, model=MODEL, title="Refusals")
    log_in(page, "rhea")
    send(page, "A cheap question")
    settled(page)
    # The model becomes far too dear for the wallet: the next turn is a 402 before anything is stored.
    orm(services.set_price, model=MODEL, prompt_per_mtok=Decimal("900000000"), completion_per_mtok=Decimal("1"))
    billed = orm(money_of, user)

    page.get_by_test_id("regenerate").click()
    expect(page.get_by_test_id("error")).to_contain_text("Not enough credits")
    expect(page.get_by_test_id("assistant-message")).to_have_text(["Answer 1 to: A cheap question"])
    expect(page.get_by_test_id("regenerate")).to_be_enabled()

    page.get_by_test_id("edit").click()
    page.get_by_test_id("edit-input").fill("A dear question")
    page.get_by_test_id("edit-save").click()
    expect(page.get_by_test_id("error")).to_contain_text("Not enough credits")
    # The old branch is back, and the edit is not lost: the field holds the new text.
    expect(page.get_by_test_id("assistant-message")).to_have_text(["Answer 1 to: A cheap question"])
    expect(page.get_by_test_id("edit-input")).to_have_value("A dear question")
    expect(page.get_by_test_id("edit-input")).to_be_focused()
    shot(page, "refused-edit")
    page.get_by_test_id("edit-cancel").click()
    expect(page.get_by_test_id("user-message")).to_have_text(["A cheap question"])
    assert orm(money_of, user) == billed and answers.count == 1


def test_esc_stops_a_regenerated_answer(page, make_user, answers):
    user = orm(make_user, "stella", "10")
    session = orm(ChatSession.objects.create, user=user, model=MODEL, title="Stops")
    log_in(page, "stella")
    send(page, "Tell me a long story")
    settled(page)
    answers.slow = True
    page.get_by_test_id("regenerate").click()
    answer = page.get_by_test_id("assistant-message")
    wait_for(lambda: "word3" in (answer.text_content() or ""), what="a few words of the new answer")
    expect(page.get_by_test_id("regenerate")).to_have_count(0)  # its bubble has no buttons while it streams
    expect(page.get_by_test_id("edit")).to_be_disabled()
    shot(page, "regenerating")
    page.keyboard.press("Escape")
    expect(answer).to_have_attribute("data-status", "cancelled")
    turn = wait_for(lambda: orm(Turn.objects.filter(session=session, status="cancelled").first), what="the stop")
    stored = orm(Message.objects.get, turn=turn, role="assistant").content
    assert stored.startswith("Answer 2 to: Tell me a long story") and "word79" not in stored
    # The stopped answer is a version like any other.
    expect(page.get_by_test_id("sibling-pos")).to_have_text("2/2")
    expect(page.get_by_test_id("edit")).to_be_enabled()
    assert_billed_once_per_answer(orm(money_of, user), 2)


def test_search_finds_a_message_of_another_session_and_opens_it(page, make_user, answers):
    user = orm(make_user, "sam", "10")
    older = orm(ChatSession.objects.create, user=user, model=MODEL, title="Island animals")
    orm(ChatSession.objects.create, user=user, model=MODEL, title="Something else")
    log_in(page, "sam")
    page.locator(f'.session-item[data-session-id="{older.id}"]').click()
    send(page, "Where do quokkas live?")
    settled(page)
    page.get_by_test_id("session-item").first.click()  # the newer session
    expect(page.get_by_test_id("session-title")).to_have_text("Something else")
    send(page, "Unrelated question")

    box = page.get_by_test_id("search")
    expect(page.get_by_label("Search your conversations")).to_have_attribute("type", "search")
    box.fill("quokka")
    results = page.get_by_test_id("search-result")
    expect(results).to_have_count(2)  # the question and its answer, newest first
    expect(results.locator(".search-title")).to_have_text(["Island animals", "Island animals"])
    expect(results.locator(".search-snippet")).to_have_text([
        "Answer 1 to: Where do quokkas live?", "Where do quokkas live?"])
    shot(page, "search")

    results.nth(1).click()
    expect(page.get_by_test_id("session-title")).to_have_text("Island animals")
    expect(page.locator(f'.session-item[data-session-id="{older.id}"]')).to_have_attribute("aria-current", "true")
    expect(page.get_by_test_id("user-message")).to_have_text(["Where do quokkas live?"])
    expect(page.locator(".msg.found")).to_have_count(1)
    shot(page, "search-opened")
    assert page.evaluate("location.hash") == f"#session={older.id}"

    box.fill("")
    expect(results).to_have_count(0)  # an empty box clears the results
    box.fill("no such words anywhere")
    expect(page.get_by_test_id("search-status")).to_have_text("No matches.")
    expect(results).to_have_count(0)


def test_export_downloads_the_conversation_as_markdown_and_json(page, make_user, answers):
    user = orm(make_user, "ezra", "10")
    session = orm(ChatSession.objects.create, user=user, model=MODEL, title="Export me")
    log_in(page, "ezra")
    send(page, "What is exported?")
    settled(page)
    page.get_by_test_id("regenerate").click()
    expect(page.get_by_test_id("sibling-pos")).to_have_text("2/2", timeout=20_000)
    links = page.get_by_test_id("export")
    expect(links).to_have_count(2)
    expect(links).to_have_text(["Export Markdown", "Export JSON"])

    with page.expect_download() as download_info:
        links.nth(0).click()
    download = download_info.value
    assert download.suggested_filename == "pantheon-export-me.md"
    text = Path(download.path()).read_text()
    assert text.startswith("# Export me\n")
    assert "**User**\n\nWhat is exported?" in text
    assert "Answer 2 to: What is exported?" in text  # the branch shown...
    assert "Answer 1 to" not in text  # ...and only it

    with page.expect_download() as download_info:
        links.nth(1).click()
    download = download_info.value
    assert download.suggested_filename == "pantheon-export-me.json"
    tree = json.loads(Path(download.path()).read_text())
    assert tree["session"]["id"] == str(session.id)
    assert [(m["role"], m["content"]) for m in tree["messages"]] == [
        ("user", "What is exported?"), ("assistant", "Answer 1 to: What is exported?"),
        ("assistant", "Answer 2 to: What is exported?")]
    assert len(tree["turns"]) == 2


@pytest.fixture
def task_worker(live_server_url, fake_openrouter_settings, tmp_path):
    """A real `manage.py db_worker` beside the server, on the test database, asking the same
    fake OpenRouter (for the title). Stopped before the database is flushed."""
    python = ROOT / ".venv" / "bin" / "python"
    env = subprocess_env(PANTHEON_LLM_PROVIDER="openrouter", OPENROUTER_BASE_URL=fake_openrouter_settings.base_url,
                         OPENROUTER_API_KEY="test-key")
    log_path = tmp_path / "db_worker.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [str(python), "manage.py", "db_worker", "--no-startup-delay", "--no-reload", "--interval", "0.2",
             "-v", "2"], cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        try:
            yield log_path
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


def test_the_title_written_by_the_background_task_appears(page, make_user, answers, task_worker):
    answers.title = "Quokkas of Rottnest Island"
    user = orm(make_user, "tia", "10")
    session = orm(ChatSession.objects.create, user=user, model=MODEL)
    log_in(page, "tia")
    header = page.get_by_test_id("session-title")
    item = page.get_by_test_id("session-item").locator(".session-name")
    expect(header).to_contain_text("Session of")  # untitled
    send(page, "Tell me about the quokkas of Rottnest Island")
    # The task runs on the worker after the turn closed; the page polls the session meanwhile.
    expect(header).to_have_text("Quokkas of Rottnest Island", timeout=16_000)
    expect(item).to_have_text("Quokkas of Rottnest Island")
    shot(page, "title")
    assert orm(lambda: ChatSession.objects.get(pk=session.pk).title) == "Quokkas of Rottnest Island", \
        task_worker.read_text()
    title_turn = orm(Turn.objects.get, session=session, kind="title")
    assert title_turn.status == "completed"
    note = orm(lambda: LedgerEntry.objects.get(turn_id=title_turn.id, kind="debit").note)
    assert "title" in note
    page.reload()
    page.wait_for_selector("#app[data-ready=true]")
    expect(header).to_have_text("Quokkas of Rottnest Island")


HOSTILE_TITLE = "<img src=x onerror=alert(1)>"
HOSTILE_MESSAGE = "quokka <img src=x onerror=alert(2)> <script>alert(3)</script>"


def test_a_hostile_title_and_snippet_are_shown_as_text(page, make_user, answers, live_server_url):
    watch = Watch(page, live_server_url)
    user = orm(make_user, "mal", "10")
    orm(ChatSession.objects.create, user=user, model=MODEL, title=HOSTILE_TITLE)
    log_in(page, "mal")
    expect(page.get_by_test_id("session-title")).to_have_text(HOSTILE_TITLE)
    send(page, HOSTILE_MESSAGE)
    settled(page)
    page.get_by_test_id("search").fill("quokka")
    results = page.get_by_test_id("search-result")
    expect(results).to_have_count(2)
    expect(results.locator(".search-title")).to_have_text([HOSTILE_TITLE, HOSTILE_TITLE])
    expect(results.locator(".search-snippet")).to_have_text([f"Answer 1 to: {HOSTILE_MESSAGE}", HOSTILE_MESSAGE])
    assert page.locator("[data-testid=search-results] *:not(li, button, span)").count() == 0
    shot(page, "hostile-search")
    results.first.click()
    expect(page.get_by_test_id("session-title")).to_have_text(HOSTILE_TITLE)
    for where in ("session-title", "session-item", "search-results"):
        assert page.get_by_test_id(where).locator("img, script").count() == 0
    assert page.evaluate("""() => [...document.querySelectorAll('*')].filter((el) =>
        [...el.attributes].some((a) => a.name.startsWith('on'))).length""") == 0
    assert page.locator("img").count() == 0
    watch.assert_clean()
