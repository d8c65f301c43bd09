"""The Content-Security-Policy (django-csp, web/csp.py, CONTENT_SECURITY_POLICY in
pantheon/settings.py; docs/chat-page.md): on every page, no inline script on the chat page,
and Chromium reports no violation while the chat page, the keys panel, /api/docs/ (Swagger
UI) and the admin are used as people use them.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from django.conf import settings
from django.contrib.auth import get_user_model
from playwright.sync_api import expect

from sessions_app.models import ChatSession
from tests.conftest import MODEL
from tests.web import test_markdown_render as rendered
from tests.web.test_chat_page import log_in, orm

ROOT = Path(__file__).resolve().parents[2]
POLICY = {
    "default-src": ["'self'"],
    "script-src": ["'self'"],
    "style-src": ["'self'"],
    "img-src": ["'self'", "data:"],
    "connect-src": ["'self'"],
    "object-src": ["'none'"],
    "base-uri": ["'none'"],
    "frame-ancestors": ["'none'"],
    "form-action": ["'self'"],
}


def directives(header: str) -> dict[str, list[str]]:
    out = {}
    for part in header.split(";"):
        name, *values = part.split()
        out[name] = values
    return out


def test_the_chat_page_has_the_strict_policy(client, make_user):
    client.force_login(make_user("carol", "1"))
    response = client.get("/")
    assert response.status_code == 200
    policy = directives(response["Content-Security-Policy"])
    assert policy == POLICY
    assert "'unsafe-inline'" not in policy["script-src"] and "'unsafe-eval'" not in policy["script-src"]
    assert not any(value.startswith("'nonce-") for values in policy.values() for value in values)


@pytest.mark.parametrize("path", ["/accounts/login/", "/api/docs/", "/api/v1/wallet", "/healthz", "/api/schema/"])
def test_every_response_has_the_policy(client, db, path):
    response = client.get(path)
    assert directives(response["Content-Security-Policy"]) == POLICY, path


def test_the_admin_gets_a_nonce_for_its_own_tags_only(admin_client):
    response = admin_client.get("/admin/billing_app/usagerecord/report/")
    assert response.status_code == 200
    policy = directives(response["Content-Security-Policy"])
    nonce = [v for v in policy["style-src"] if v.startswith("'nonce-")]
    assert len(nonce) == 1 and policy["script-src"] == ["'self'", *nonce]
    assert f'<style nonce="{nonce[0][7:-1]}">' in response.content.decode()  # the report's own style
    assert "'unsafe-inline'" not in response["Content-Security-Policy"]
    # Another request, another nonce.
    again = directives(admin_client.get("/admin/")["Content-Security-Policy"])
    assert again["style-src"] != policy["style-src"]


def test_the_middleware_runs_its_hooks_inline():
    from core.middleware import InlineHooks
    from web.csp import CSPMiddleware

    assert "web.csp.CSPMiddleware" in settings.MIDDLEWARE and "csp" in settings.INSTALLED_APPS
    assert issubclass(CSPMiddleware, InlineHooks)


INLINE = [
    (re.compile(r"<script(?![^>]*\bsrc=)[^>]*>", re.I), "an inline <script>"),
    (re.compile(r"\sstyle\s*=", re.I), "a style= attribute"),
    (re.compile(r"<style\b", re.I), "a <style> element"),
    (re.compile(r"\son[a-z]+\s*=", re.I), "an event-handler attribute"),
    (re.compile(r"javascript:", re.I), "a javascript: URL"),
]


def test_the_web_templates_have_no_inline_script_or_style():
    for template in sorted((ROOT / "web" / "templates").rglob("*.html")):
        text = template.read_text()
        for pattern, what in INLINE:
            assert not pattern.search(text), f"{template.relative_to(ROOT)} has {what}"


def test_the_vendored_libraries_match_their_versions_file():
    """Nobody edited a vendored file by hand: each has the sha256 that bin/refresh-vendor
    recorded (web/static/web/vendor/VERSIONS), and each library's licence travels with it."""
    import hashlib

    vendor = ROOT / "web" / "static" / "web" / "vendor"
    lines = (vendor / "VERSIONS").read_text().splitlines()
    files = [line.split() for line in lines if line.startswith("file ")]
    packages = [line.split()[1] for line in lines if line.startswith("package ")]
    assert [p.rsplit("@", 1)[0] for p in packages] == ["markdown-it", "dompurify", "@highlightjs/cdn-assets"]
    assert all(re.fullmatch(r".+@\d+\.\d+\.\d+", p) for p in packages)  # pinned, not ranges
    for _, name, sha256, _source in files:
        assert hashlib.sha256((vendor / name).read_bytes()).hexdigest() == sha256, name
    names = {name for _, name, _, _ in files}
    assert {"markdown-it.min.js", "purify.es.js", "highlight.min.js", "highlight-github.min.css",
            "markdown-it.LICENSE", "dompurify.LICENSE", "highlight.js.LICENSE"} <= names


# --- in Chromium: no violation on normal use ------------------------------------------

browser = rendered.browser
page = rendered.page


@pytest.mark.browser
def test_no_violation_on_the_chat_page_the_keys_panel_the_api_docs_and_the_admin(page, make_user, fake_openrouter,
                                                                                 live_server_url):
    watch = rendered.Watch(page, live_server_url)
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    user = orm(make_user, "csp", "10")
    orm(ChatSession.objects.create, user=user, model=MODEL, title="CSP")
    headers: list[str] = []
    page.on("response", lambda r: headers.append(r.headers.get("content-security-policy", ""))
            if r.url.rstrip("/") == live_server_url else None)

    # The chat page: an answer with code, its copy button, the keys panel and a new key.
    fake_openrouter.enqueue(fake_openrouter.sse_stream(rendered.pieces_of(rendered.MARKDOWN_ANSWER), delay=0.005))
    log_in(page, "csp")
    answer = rendered.send(page, "Plan a weekend in Lisbon")
    rendered.expect_rendered_markdown(answer)
    answer.get_by_test_id("code-copy").click()
    expect(answer.get_by_test_id("code-copy")).to_have_attribute("data-state", "copied")
    page.get_by_test_id("keys-open").click()
    page.get_by_test_id("key-name").fill("script")
    page.get_by_test_id("key-create").click()
    expect(page.get_by_test_id("new-key")).to_have_text(re.compile(r"^pk_"))
    page.get_by_test_id("keys-close").click()
    assert headers and all(directives(h) == POLICY for h in headers), headers

    # /api/docs/: Swagger UI from the static files renders and expands an operation.
    page.goto("/api/docs/")
    expect(page.locator(".swagger-ui .info .title")).to_contain_text("Pantheon")
    operation = page.locator(".opblock").first
    operation.locator(".opblock-summary").click()
    expect(operation.locator(".opblock-body")).to_be_visible()
    page.get_by_role("button", name="Authorize").first.click()
    expect(page.locator(".modal-ux")).to_be_visible()

    # The admin: its login, index, a changelist, an add form and the usage report.
    orm(get_user_model().objects.create_superuser, "root", "root@example.com", "pw")
    page.goto("/admin/login/")
    page.get_by_label("Username").fill("root")
    page.get_by_label("Password").fill("pw")
    page.get_by_role("button", name="Log in").click()
    expect(page.locator("#site-name")).to_be_visible()
    for path in ("/admin/", "/admin/sessions_app/chatsession/", "/admin/auth/user/add/",
                 "/admin/billing_app/usagerecord/report/"):
        response = page.goto(path)
        assert response.status == 200, path
    # The admin's own stylesheet applied (not blocked): its header has the admin's colours.
    assert page.locator("#header").evaluate("el => getComputedStyle(el).display") == "flex"
    assert page.locator(".usage-report .summary").evaluate("el => getComputedStyle(el).display") == "flex"
    watch.assert_clean()
