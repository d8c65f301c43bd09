"""The chat page renders assistant answers as safe Markdown (SPEC section 17, issue 18), in
Chromium through a real uvicorn (see test_chat_page), with answers scripted on the loopback
fake OpenRouter (tests/fake_openrouter.py): headings, lists, tables and highlighted code
with a copy button; hostile HTML from a model, a user or a title left inert; the streaming
renderer keeping finished blocks and highlighting a fence once it has closed; Enter, Shift+Enter
and Esc; what a screen reader is told; and the render cost of a 2000-word answer
(docs/chat-page.md). Screenshots go to tests/artifacts/ (looked at by hand).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from playwright.sync_api import expect

from sessions_app.models import ChatSession, Message, Turn
from tests.conftest import MODEL
from tests.web import test_chat_page as chat_page
from tests.web.test_chat_page import CHROMIUM, CHROMIUM_ARGS, log_in, orm, wait_for

pytestmark = pytest.mark.browser

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
page = chat_page.page


@pytest.fixture
def browser(live_server_url, fake_openrouter_settings, price):
    """Chromium, with the turns answered by the loopback fake OpenRouter (scripted per test)."""
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: `apt-get install chromium` (bin/test does it)"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


class Watch:
    """What must never happen on a page: a dialog (alert() ran), a CSP violation (something
    tried to run or load), or a request leaving for another host."""

    def __init__(self, page, base_url: str):
        self.dialogs: list[str] = []
        self.csp: list[str] = []
        self.outside: list[str] = []
        host = base_url.split("//", 1)[1]

        def on_dialog(dialog):
            self.dialogs.append(dialog.message)
            dialog.dismiss()

        page.on("dialog", on_dialog)
        page.on("console", lambda m: self.csp.append(m.text) if "Content Security Policy" in m.text else None)
        page.on("request", lambda r: self.outside.append(r.url)
                if r.url.startswith("http") and r.url.split("//", 1)[1].split("/", 1)[0] != host else None)
        # Violations as the page sees them (securitypolicyviolation), on every page loaded.
        page.add_init_script("""document.addEventListener('securitypolicyviolation', (e) => {
            console.error(`Content Security Policy violation: ${e.violatedDirective} ${e.blockedURI}`);
        });""")

    def assert_clean(self):
        assert not self.dialogs, f"a dialog opened: {self.dialogs}"
        assert not self.csp, f"CSP violations: {self.csp}"
        assert not self.outside, f"requests to other hosts: {self.outside}"


def pieces_of(text: str, size: int = 7) -> list[str]:
    """The answer cut into pieces of `size` characters, as a model streams it (a tag, a link
    or a fence is cut across pieces)."""
    return [text[i:i + size] for i in range(0, len(text), size)]


def open_session(page, user, **fields):
    session = orm(ChatSession.objects.create, user=user, model=MODEL, **fields)
    return session


def send(page, text: str):
    page.get_by_test_id("composer").fill(text)
    page.get_by_test_id("send").click()
    answer = page.get_by_test_id("assistant-message").last
    expect(answer).to_have_attribute("data-status", "completed", timeout=20_000)
    return answer


def shot(page, name: str, locator=None) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    (locator or page).screenshot(path=str(path))
    return path


# --- a Markdown answer -----------------------------------------------------------------

CODE = 'def greet(name):\n    """Say hello."""\n    return f"Hello, {name}!"\n'
MARKDOWN_ANSWER = f"""# A weekend in Lisbon

Here is **what to pack**, with a _short_ list and `inline code`:

- a passport
- sunscreen
- [the tram map](https://example.com/tram "Tram 28")

| Day | City | Km |
|-----|:----:|---:|
| 1 | Lisbon | 0 |
| 2 | Sintra | 28 |

```python
{CODE}```

> Pastéis de nata are best warm.
"""


def expect_rendered_markdown(answer) -> None:
    expect(answer.locator("h1")).to_have_text("A weekend in Lisbon")
    expect(answer.locator("p strong")).to_have_text("what to pack")
    expect(answer.locator("p em")).to_have_text("short")
    expect(answer.locator("p > code")).to_have_text("inline code")
    expect(answer.locator("ul > li")).to_have_text(["a passport", "sunscreen", "the tram map"])
    link = answer.locator("ul a")
    expect(link).to_have_attribute("href", "https://example.com/tram")
    expect(link).to_have_attribute("title", "Tram 28")
    expect(link).to_have_attribute("target", "_blank")
    expect(link).to_have_attribute("rel", "noopener noreferrer")
    expect(answer.locator("table thead th")).to_have_text(["Day", "City", "Km"])
    expect(answer.locator("table tbody tr")).to_have_count(2)
    expect(answer.locator("table tbody tr").nth(1).locator("td")).to_have_text(["2", "Sintra", "28"])
    expect(answer.locator("table th").nth(1)).to_have_class("align-center")  # a class: no inline style
    expect(answer.locator("table td").nth(2)).to_have_class("align-right")
    code = answer.locator("pre > code")
    expect(code).to_have_count(1)
    expect(code).to_have_class(re.compile(r"\blanguage-python\b.*\bhljs\b|\bhljs\b.*\blanguage-python\b"))
    expect(code.locator("span.hljs-keyword").first).to_have_text("def")
    expect(code.locator("span.hljs-string").first).to_be_visible()
    assert code.text_content() == CODE
    expect(answer.locator(".code-lang")).to_have_text("python")
    expect(answer.locator("blockquote")).to_have_text("Pastéis de nata are best warm.")
    assert answer.locator("[style]").count() == 0


def test_a_markdown_answer_renders_with_highlighted_code_and_a_copy_button(page, make_user, fake_openrouter,
                                                                          live_server_url):
    watch = Watch(page, live_server_url)
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    user = orm(make_user, "ana", "10")
    session = open_session(page, user, title="Trip")
    fake_openrouter.enqueue(fake_openrouter.sse_stream(pieces_of(MARKDOWN_ANSWER, 4), delay=0.05))
    log_in(page, "ana")
    page.get_by_test_id("composer").fill("Plan a weekend in Lisbon")
    page.get_by_test_id("send").click()
    answer = page.get_by_test_id("assistant-message").last
    # Rendered while it streams: the heading and the list are elements before the end, and
    # the code block is plain text (no highlight, no copy button) while its fence is open.
    wait_for(lambda: answer.evaluate("el => el.dataset.status === 'streaming' && !!el.querySelector('h1')"),
             what="the heading, mid-stream")
    open_fence = wait_for(lambda: answer.evaluate("""el => {
        const code = el.querySelector('pre code');
        return el.dataset.status === 'streaming' && code && code.textContent.includes('return')
            && [code.className, code.querySelectorAll('span').length, el.querySelectorAll('.code-copy').length];
    }"""), what="the open fence, mid-stream")
    assert open_fence == ["language-python code-open", 0, 0]
    shot(page, "markdown-mid-stream")
    expect(answer).to_have_attribute("data-status", "completed", timeout=20_000)
    expect_rendered_markdown(answer)
    stored = orm(Message.objects.get, turn__session=session, role="assistant").content
    assert stored == MARKDOWN_ANSWER

    copy = answer.get_by_test_id("code-copy")
    expect(copy).to_have_count(1)
    expect(copy).to_have_accessible_name("Copy code")
    copy.click()
    expect(copy).to_have_attribute("data-state", "copied")
    expect(copy).to_have_accessible_name("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == CODE
    shot(page, "markdown-answer")

    # The history (a reload) renders the stored answer the same way.
    page.reload()
    page.wait_for_selector("#app[data-ready=true]")
    answer = page.get_by_test_id("assistant-message")
    expect_rendered_markdown(answer)
    expect(page.get_by_test_id("user-message")).to_have_text("Plan a weekend in Lisbon")
    watch.assert_clean()


# --- hostile answers, messages and titles ------------------------------------------------

HOSTILE_ANSWER = """Hostile answer, every line must stay inert.

<script>alert(1)</script>
<img src=x onerror=alert(1)>
<svg onload=alert(1)><circle r=5></circle></svg>
[x](javascript:alert(1)) and [X](JaVaScRiPt:alert(1)) and [sp]( javascript:alert(1)) and [e](&#106;avascript:alert(1))
[y](data:text/html,<script>alert(1)</script>) and [v](vbscript:msgbox(1))
<iframe src="https://example.com/"></iframe>
<a href="javascript:alert(1)">raw link</a> <b onmouseover=alert(1)>bold?</b>
[quoted](https://example.com/q "a \\" onmouseover=alert(1) x=\\" <b>html</b> 'single'")
![pixel](https://tracker.example/pixel.png) ![js](javascript:alert(1)) ![data](data:image/png;base64,iVBORw0KGgo=)
<style>body { display: none }</style>
<form action="https://evil.example/"><input name=q><button>go</button></form>
<object data="x.swf"></object><embed src="x.swf">
<details open ontoggle=alert(1)>details</details>
<math><mi xlink:href="javascript:alert(1)">m</mi></math>
<https://example.com/auto> and https://example.org/bare and javascript:alert(1)

```html
<script>alert(1)</script><img src=x onerror=alert(1)>
```

```"><img src=x onerror=alert(1)>
fence with a hostile info string
```

`<img src=x onerror=alert(1)>` inline.
"""

# Everything under #messages and the sidebar: no element that runs or loads anything, no
# event-handler attribute, no link but http(s)/mailto, no style attribute.
INERT_CHECK = """(root) => {
    const bad = [];
    for (const el of root.querySelectorAll('*')) {
        for (const attr of el.attributes) {
            if (attr.name.toLowerCase().startsWith('on')) bad.push(`${el.tagName} ${attr.name}`);
            if (attr.name === 'style') bad.push(`${el.tagName} style`);
            if (['href', 'src', 'action', 'xlink:href', 'formaction', 'data'].includes(attr.name)) {
                const value = attr.value.replace(/\\s+/g, '').toLowerCase();
                if (!/^(https?:|mailto:)/.test(value)) bad.push(`${el.tagName} ${attr.name}=${attr.value}`);
            }
        }
        const tag = el.tagName.toLowerCase();
        if (['script', 'iframe', 'object', 'embed', 'form', 'input', 'style', 'svg', 'math', 'img', 'link',
             'meta', 'base', 'details', 'frame', 'video', 'audio', 'source'].includes(tag)) bad.push(tag);
    }
    return bad;
}"""


def expect_inert(page) -> None:
    for selector in ("#messages", "#session-list", "#session-title"):
        bad = page.locator(selector).evaluate(INERT_CHECK)
        assert bad == [], (selector, bad)
    # The whole document: nothing has an event-handler attribute, no javascript:/data: link.
    assert page.evaluate("""() => [...document.querySelectorAll('*')].filter(
        el => [...el.attributes].some(a => a.name.toLowerCase().startsWith('on'))).length""") == 0
    assert page.locator("a[href^='javascript:' i], a[href^='data:' i], a[href^='vbscript:' i]").count() == 0
    assert page.locator("#messages iframe, #messages script, #messages img, #messages svg").count() == 0
    assert page.evaluate("window.__pwned") is None


def expect_hostile_answer_as_text(answer) -> None:
    text = answer.text_content()
    # Raw HTML is shown as the text it is (markdown-it's html: false)...
    for shown in ("<script>alert(1)</script>", "<img src=x onerror=alert(1)>", "<svg onload=alert(1)>",
                  '<iframe src="https://example.com/"></iframe>', "<style>body { display: none }</style>",
                  "[x](javascript:alert(1))", "[y](data:text/html,<script>alert(1)</script>)"):
        assert shown in text, shown
    # ... links to anything but the web or mail stay text, links to the web are safe links,
    links = answer.locator("a").evaluate_all(
        "as => as.map(a => [a.getAttribute('href'), a.getAttribute('target'), a.getAttribute('rel'), "
        "a.getAttribute('title'), a.textContent, [...a.attributes].map(x => x.name).sort().join(' ')])")
    for href, target, rel, _title, _text, attrs in links:
        assert re.match(r"^(https?:|mailto:)", href), href
        assert target == "_blank" and rel == "noopener noreferrer", (href, target, rel)
        assert attrs in {"href rel target", "href rel target title", "class href rel target",
                         "class href rel target title"}, attrs
    hrefs = [link[0] for link in links]
    assert {"https://example.com/q", "https://example.com/auto", "https://example.org/bare"} <= set(hrefs)
    quoted = next(link for link in links if link[0] == "https://example.com/q")
    assert quoted[3] == "a \" onmouseover=alert(1) x=\" <b>html</b> 'single'"  # a title, as text
    # ... an image is never loaded: it is a link to it (a web one), or text.
    pixel = next(link for link in links if link[0] == "https://tracker.example/pixel.png")
    assert pixel[4] == "Image: pixel"
    # HTML inside code is code.
    codes = answer.locator("pre code").all_text_contents()
    assert "<script>alert(1)</script><img src=x onerror=alert(1)>\n" in codes
    assert answer.locator("p > code").first.text_content() == "<img src=x onerror=alert(1)>"


def test_a_hostile_answer_renders_inert(page, make_user, fake_openrouter, live_server_url):
    watch = Watch(page, live_server_url)
    user = orm(make_user, "eve", "10")
    session = open_session(page, user, title="Hostile")
    fake_openrouter.enqueue(fake_openrouter.sse_stream(pieces_of(HOSTILE_ANSWER, 5), delay=0.005))
    log_in(page, "eve")
    answer = send(page, "Say something nasty")
    assert orm(Message.objects.get, turn__session=session, role="assistant").content == HOSTILE_ANSWER
    expect_hostile_answer_as_text(answer)
    expect_inert(page)
    page.set_viewport_size({"width": 1100, "height": 1250})  # the whole answer in the picture
    shot(page, "hostile-answer")
    # Clicking around does not run anything either.
    for link in answer.locator("a").all()[:3]:
        link.hover()
    answer.locator("p").first.click()

    page.reload()
    page.wait_for_selector("#app[data-ready=true]")
    answer = page.get_by_test_id("assistant-message")
    expect_hostile_answer_as_text(answer)
    expect_inert(page)
    watch.assert_clean()


def test_hostile_text_in_a_user_message_and_a_title_is_shown_as_text(page, make_user, fake_openrouter,
                                                                     live_server_url):
    watch = Watch(page, live_server_url)
    user = orm(make_user, "mallory", "10")
    title = '<img src=x onerror=alert(1)><script>alert(2)</script> **not bold** [x](javascript:alert(3))'
    open_session(page, user, title=title)
    log_in(page, "mallory")
    expect(page.get_by_test_id("session-title")).to_have_text(title)
    expect(page.get_by_test_id("session-item").locator(".session-name")).to_have_text(title)

    message = '<svg onload=alert(1)></svg> <b>bold?</b> **stars** `code` [x](javascript:alert(1))\n# not a heading'
    fake_openrouter.enqueue(fake_openrouter.sse_stream(["Fine."]))
    send(page, message)
    shown = page.get_by_test_id("user-message")
    assert shown.text_content() == message  # exactly as typed: text, never Markdown or HTML
    assert shown.evaluate("el => el.children.length") == 0
    expect_inert(page)
    page.reload()
    page.wait_for_selector("#app[data-ready=true]")
    assert page.get_by_test_id("user-message").text_content() == message
    expect(page.get_by_test_id("session-title")).to_have_text(title)
    expect_inert(page)
    watch.assert_clean()


# --- the streaming renderer, driven directly ---------------------------------------------

STREAM_CHECK = """async () => {
    const { MarkdownStream, renderMarkdown } = await import('/static/web/markdown.js');
    const box = document.createElement('div');
    document.body.append(box);
    const stream = new MarkdownStream(box);
    const step = (piece) => { stream.append(piece); stream.renderNow(); };
    const view = () => ({
        html: box.innerHTML,
        code: box.querySelector('pre code') ? box.querySelector('pre code').className : null,
        spans: box.querySelectorAll('pre code span').length,
        copies: box.querySelectorAll('.code-copy').length,
    });
    const seen = {};
    step('Intro paragraph with **bold**.\\n\\n');
    step('```js\\nconst a = 1;\\n');
    seen.open = view();
    const intro = box.querySelector('p');
    step('let b = 2;\\n``');
    seen.stillOpen = view();
    step('`');
    seen.closingLineNotComplete = view();
    step('\\n');
    seen.closed = view();
    const code = box.querySelector('.code-block');
    step('After the code.\\n\\n- one\\n- tw');
    seen.after = view();
    seen.introKept = box.querySelector('p') === intro;
    seen.codeKept = box.querySelector('.code-block') === code;
    stream.finish();
    seen.final = box.innerHTML;
    const whole = document.createElement('div');
    whole.append(renderMarkdown(stream.text));
    seen.whole = whole.innerHTML;
    return seen;
}"""

# A document with every kind of block, cut at every few characters: streamed and rendered
# at each piece, it must end exactly as the whole text rendered at once.
EQUIVALENCE_CHECK = """async ([text, sizes]) => {
    const { MarkdownStream, renderMarkdown } = await import('/static/web/markdown.js');
    const whole = document.createElement('div');
    whole.append(renderMarkdown(text));
    const results = [];
    for (const size of sizes) {
        const box = document.createElement('div');
        const stream = new MarkdownStream(box);
        for (let i = 0; i < text.length; i += size) { stream.append(text.slice(i, i + size)); stream.renderNow(); }
        stream.finish();
        results.push(box.innerHTML === whole.innerHTML ? 'same' : box.innerHTML);
    }
    return { results, whole: whole.innerHTML };
}"""

MIXED_DOCUMENT = """Setext heading
==============

A paragraph that goes on
over two lines, with a [link](https://example.com) and www.example.org.

* item one
* item two

  still item two

1. first
2. second

> quoted
> lines
lazy continuation

---

~~~
tilde fence
~~~

    indented code

| a | b |
|---|---|
| 1 | 2 |

Text with a reference [ref][1] and <not html>.

```
unclosed at the end
"""


def test_the_stream_keeps_finished_blocks_and_highlights_a_fence_once_closed(browser, live_server_url):
    page = browser.new_page(base_url=live_server_url)
    try:
        page.goto("/accounts/login/")
        seen = page.evaluate(STREAM_CHECK)
        got = page.evaluate(EQUIVALENCE_CHECK, [MIXED_DOCUMENT + "```\n\n[1]: https://example.com/ref\n",
                                                [1, 2, 3, 7, 16, 64]])
        unclosed = page.evaluate(EQUIVALENCE_CHECK, [MIXED_DOCUMENT, [1, 5]])
    finally:
        page.close()
    # An open fence: plain escaped text, no highlight, no copy button.
    assert seen["open"]["code"] == "language-js code-open" and seen["open"]["spans"] == 0
    assert seen["open"]["copies"] == 0
    assert seen["stillOpen"]["code"] == "language-js code-open"
    assert seen["closingLineNotComplete"]["code"] == "language-js code-open"
    # Closed (its closing line complete): highlighted, with its copy button.
    assert seen["closed"]["code"] == "language-js hljs" and seen["closed"]["spans"] > 0
    assert seen["closed"]["copies"] == 1
    # Finished blocks are rendered once and kept (the same nodes), the open one re-rendered.
    assert seen["introKept"] and seen["codeKept"]
    assert "<li>tw</li>" in seen["after"]["html"]
    assert seen["final"] == seen["whole"]
    assert got["results"] == ["same"] * 6, got
    assert 'href="https://example.com/ref"' in got["whole"]  # a reference defined after its use
    assert unclosed["results"] == ["same", "same"]
    assert "unclosed at the end" in unclosed["whole"] and 'class="language-' not in unclosed["whole"]


SANITIZE_CHECK = """async (text) => {
    const { renderMarkdown } = await import('/static/web/markdown.js');
    const box = document.createElement('div');
    box.append(renderMarkdown(text));
    return box.innerHTML;
}"""


def test_the_sanitizer_keeps_only_what_markdown_makes(browser, live_server_url):
    page = browser.new_page(base_url=live_server_url)
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    try:
        page.goto("/accounts/login/")
        html = page.evaluate(SANITIZE_CHECK, HOSTILE_ANSWER)
        page.wait_for_timeout(300)  # an onerror would have fired by now
        elements = page.evaluate("""(html) => { const t = document.createElement('template'); t.innerHTML = html;
            return [...t.content.querySelectorAll('*')].map(e => [e.tagName.toLowerCase(),
                Object.fromEntries([...e.attributes].map(a => [a.name, a.value]))]); }""", html)
    finally:
        page.close()
    assert not dialogs
    # Only the elements markdown-it makes (and the copy button's bar), only their attributes.
    assert {tag for tag, _ in elements} <= {"p", "a", "br", "code", "pre", "span", "div", "button"}
    allowed = {"a": {"href", "title", "target", "rel", "class"}, "code": {"class"}, "span": {"class"},
               "div": {"class"}, "button": {"type", "class", "data-testid", "aria-label"}}
    for tag, attrs in elements:
        assert set(attrs) <= allowed.get(tag, set()), (tag, attrs)
        if tag == "a":
            assert re.match(r"^(https?:|mailto:)", attrs["href"]), attrs
        for name, value in attrs.items():
            if name == "class":
                assert all(re.match(r"^(hljs|language-|code-|md-image|[a-z]+_+$)", c) for c in value.split()), value


# --- keyboard and screen readers ---------------------------------------------------------

ANNOUNCEMENTS = """() => {
    window.__said = [];
    const status = document.getElementById('answer-status');
    new MutationObserver(() => { if (status.textContent) window.__said.push(status.textContent); })
        .observe(status, { childList: true, characterData: true, subtree: true });
}"""


def test_enter_shift_enter_esc_and_what_a_screen_reader_hears(page, make_user, fake_openrouter, live_server_url):
    watch = Watch(page, live_server_url)
    user = orm(make_user, "kai", "10")
    session = open_session(page, user)
    log_in(page, "kai")
    status = page.get_by_test_id("answer-status")
    expect(status).to_have_attribute("aria-live", "polite")
    expect(status).to_have_attribute("role", "status")
    assert page.get_by_test_id("messages").get_attribute("aria-live") is None  # not read piece by piece
    page.evaluate(ANNOUNCEMENTS)

    # Shift+Enter is a new line; Enter sends the whole text.
    fake_openrouter.enqueue(fake_openrouter.sse_stream(pieces_of("A **short** answer, in pieces.", 3), delay=0.05))
    composer = page.get_by_test_id("composer")
    composer.click()
    composer.type("first line")
    composer.press("Shift+Enter")
    composer.type("second line")
    expect(composer).to_have_value("first line\nsecond line")
    expect(page.get_by_test_id("user-message")).to_have_count(0)
    composer.press("Enter")
    expect(page.get_by_test_id("user-message")).to_have_text("first line\nsecond line")
    expect(composer).to_have_value("")
    answer = page.get_by_test_id("assistant-message").last
    wait_for(lambda: answer.get_attribute("data-status") == "streaming", what="the stream")
    assert answer.get_attribute("aria-busy") == "true"
    expect(answer).to_have_attribute("data-status", "completed")
    assert answer.get_attribute("aria-busy") is None
    expect(answer.locator("strong")).to_have_text("short")
    assert page.evaluate("window.__said") == ["Answer started.", "Answer finished."]  # not per piece
    assert chat_request_contents(fake_openrouter)[-1] == "first line\nsecond line"

    # Esc stops the answer being written, through POST /turns/{id}/cancel.
    cancels: list = []
    page.on("request", lambda r: cancels.append(r) if r.url.endswith("/cancel") else None)
    fake_openrouter.enqueue(fake_openrouter.slow_stream(400, delay=0.05))
    composer.fill("A long one, please")
    composer.press("Enter")
    answer = page.get_by_test_id("assistant-message").last
    wait_for(lambda: (answer.text_content() or "").count("w") >= 5, what="a few words")
    # Esc in the keys panel closes the panel, and the answer goes on.
    page.get_by_test_id("keys-open").click()
    page.get_by_test_id("key-name").press("Escape")
    expect(page.get_by_test_id("keys-panel")).to_be_hidden()
    assert answer.get_attribute("data-status") == "streaming" and not cancels
    composer.press("Escape")
    expect(answer).to_have_attribute("data-status", "cancelled")
    turn_id = answer.get_attribute("data-turn-id")
    assert [r.method for r in cancels] == ["POST"] and cancels[0].url.endswith(f"/api/v1/turns/{turn_id}/cancel")
    turn = wait_for(lambda: orm(Turn.objects.filter(pk=turn_id).exclude(status="running").first), what="the turn")
    assert turn.status == "cancelled" and turn.session_id == session.pk
    assert page.evaluate("window.__said")[-2:] == ["Answer started.", "Answer stopped."]
    expect(page.get_by_test_id("send")).to_be_enabled()
    watch.assert_clean()


def chat_request_contents(fake_openrouter) -> list[str]:
    """The last user message of every chat completion the fake OpenRouter was sent."""
    out = []
    for request in fake_openrouter.chat_requests():
        users = [m for m in request.body["messages"] if m["role"] == "user"]
        out.append(users[-1]["content"] if users else "")
    return out


# --- the render cost of a long answer ----------------------------------------------------

def long_answer(words: int = 2000) -> str:
    """A Markdown answer of about `words` words, shaped like a model's: headings, paragraphs,
    lists, a table and code blocks."""
    parts: list[str] = []
    count = 0
    section = 0
    while count < words:
        section += 1
        parts.append(f"## Section {section}: streaming notes\n")
        sentence = ("The renderer keeps every finished block and re-renders only the one still open, "
                    "so each frame costs about the same however long the answer already is.")
        parts.append(" ".join([sentence] * 3) + "\n")
        parts.append("- first point with `code` and **bold** text\n- second point with a [link](https://example.com)\n"
                     "- third point that runs on for a little while longer\n")
        if section % 3 == 0:
            parts.append("| n | square | note |\n|---|---:|---|\n" + "".join(
                f"| {i} | {i * i} | row {i} |\n" for i in range(1, 6)))
        if section % 2 == 0:
            parts.append("```python\n" + "".join(f"def f{i}(x):\n    return x * {i}  # step {i}\n"
                                               for i in range(6)) + "```\n")
        text = "\n".join(parts)
        count = len(text.split())
    return "\n".join(parts)


def test_a_2000_word_answer_streams_without_reparsing_it_all(page, make_user, fake_openrouter, live_server_url):
    user = orm(make_user, "perf", "100")
    open_session(page, user)
    text = long_answer()
    words = text.split(" ")
    pieces = [("" if i == 0 else " ") + " ".join(words[i:i + 3]) for i in range(0, len(words), 3)]
    assert "".join(pieces) == text
    fake_openrouter.enqueue(fake_openrouter.sse_stream(pieces, delay=0.004, usage=(50, len(pieces))))
    log_in(page, "perf")
    page.evaluate("""async () => { const m = await import('/static/web/markdown.js');
        Object.assign(m.renderStats, { renders: 0, ms: 0, maxMs: 0, fullRenders: 0, frozenBlocks: 0, samples: [] });
        // Tasks of 50 ms or more on the page's main thread (layout and paint included).
        window.__longTasks = [];
        new PerformanceObserver((list) => window.__longTasks.push(...list.getEntries().map((e) => e.duration)))
            .observe({ type: 'longtask' });
    }""")
    started = time.monotonic()
    answer = send(page, "Write a long answer")
    elapsed = time.monotonic() - started
    stats = page.evaluate("async () => ({ ...(await import('/static/web/markdown.js')).renderStats })")
    long_tasks = page.evaluate("window.__longTasks")
    # What re-parsing the whole answer on every piece would cost: each prefix rendered whole.
    naive = page.evaluate("""async ([pieces, every]) => {
        const { renderMarkdown } = await import('/static/web/markdown.js');
        let text = '', ms = 0, sampled = 0;
        for (let i = 0; i < pieces.length; i++) {
            text += pieces[i];
            if (i % every) continue;
            const started = performance.now();
            const box = document.createElement('div');
            box.append(renderMarkdown(text));
            ms += performance.now() - started;
            sampled++;
        }
        const started = performance.now();
        renderMarkdown(text);
        return { estimatedMs: ms * pieces.length / sampled, wholeOnceMs: performance.now() - started };
    }""", [pieces, 10])
    figure = {"words": len(text.split()), "characters": len(text), "pieces": len(pieces),
              "stream_seconds": round(elapsed, 2), "renders": stats["renders"],
              "render_ms_total": round(stats["ms"], 1), "render_ms_max": round(stats["maxMs"], 2),
              "render_ms_mean": round(stats["ms"] / max(stats["renders"], 1), 2),
              "frozen_blocks": stats["frozenBlocks"],
              "naive_every_piece_ms_estimated": round(naive["estimatedMs"], 1),
              "whole_answer_once_ms": round(naive["wholeOnceMs"], 2),
              "long_tasks": len(long_tasks), "long_tasks_ms_max": round(max(long_tasks, default=0), 1)}
    samples = sorted(stats["samples"])
    figure["render_ms_median"] = round(samples[len(samples) // 2], 2)
    figure["render_ms_p90"] = round(samples[int(len(samples) * 0.9)], 2)
    # The cost of a render does not grow with the answer: the last third costs no more than the first.
    third = len(stats["samples"]) // 3
    figure["render_ms_mean_first_third"] = round(sum(stats["samples"][:third]) / third, 2)
    figure["render_ms_mean_last_third"] = round(sum(stats["samples"][-third:]) / third, 2)
    print("markdown render:", figure)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "markdown-render.json").write_text(json.dumps(figure, indent=2) + "\n")
    assert figure["words"] >= 2000
    expect(answer.locator("h2")).to_have_count(text.count("## Section"))
    assert answer.locator("pre code.hljs").count() == text.count("```python")
    # At most one render per frame (and per 50 ms), far fewer than the pieces; each one small.
    assert stats["renders"] < len(pieces)
    assert stats["fullRenders"] == 0  # the whole answer was never parsed again
    assert stats["maxMs"] < 250, figure  # loose: CI machines are slower; the flat profile below is the point
    assert stats["ms"] < naive["estimatedMs"], figure
    assert figure["render_ms_mean_last_third"] < max(3 * figure["render_ms_mean_first_third"], 10), figure
