"""The chat page's Django side, without a browser: login, logout, the page, static files."""

import httpx
import pytest
from django.conf import settings

from pantheon.asgi import application

HOOKS = ["composer", "send", "stop", "balance", "error", "session-list", "new-session", "model-select", "keys-open",
         "keys-panel", "key-form"]


def test_anonymous_user_is_redirected_to_login(client, db):
    response = client.get("/")
    assert response.status_code == 302
    assert response["Location"] == "/accounts/login/?next=/"


def test_login_page_renders_a_form(client, db):
    response = client.get("/accounts/login/?next=/")
    assert response.status_code == 200
    body = response.content.decode()
    assert 'name="username"' in body and 'name="password"' in body and 'name="csrfmiddlewaretoken"' in body
    assert 'name="next" value="/"' in body


def test_page_renders_for_a_logged_in_user_with_the_test_hooks(client, make_user):
    client.force_login(make_user("carol", "1"))
    response = client.get("/")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/html")
    body = response.content.decode()
    for hook in HOOKS:
        assert f'data-testid="{hook}"' in body, hook
    assert "/static/web/chat.js" in body and 'type="module"' in body
    assert "/static/web/chat.css" in body
    assert f'data-default-model="{settings.PANTHEON_DEFAULT_MODEL}"' in body
    assert "carol" in body
    # The script reads the CSRF token from this cookie for its X-CSRFToken header.
    assert settings.CSRF_COOKIE_NAME in response.cookies
    assert not settings.CSRF_COOKIE_HTTPONLY


def test_page_answers_get_only(client, make_user):
    client.force_login(make_user("carol"))
    assert client.post("/").status_code == 405


def test_login_with_the_form_then_logout(make_user):
    from django.test import Client

    make_user("carol", "1")
    browser = Client(enforce_csrf_checks=True)
    page = browser.get("/accounts/login/")
    token = page.cookies[settings.CSRF_COOKIE_NAME].value
    response = browser.post("/accounts/login/", {"username": "carol", "password": "pw", "next": "/",
                                                 "csrfmiddlewaretoken": token})
    assert response.status_code == 302 and response["Location"] == "/"
    assert browser.get("/").status_code == 200
    # A logged-in user who opens the login page goes to the chat.
    assert browser.get("/accounts/login/")["Location"] == "/"

    token = browser.cookies[settings.CSRF_COOKIE_NAME].value  # rotated at login
    assert browser.get("/accounts/logout/").status_code == 405  # logout is a POST form
    response = browser.post("/accounts/logout/", {"csrfmiddlewaretoken": token})
    assert response.status_code == 302 and response["Location"] == settings.LOGOUT_REDIRECT_URL
    assert browser.get("/")["Location"] == "/accounts/login/?next=/"


def test_login_with_a_wrong_password_shows_an_error(client, make_user):
    make_user("carol")
    response = client.post("/accounts/login/", {"username": "carol", "password": "nope"})
    assert response.status_code == 200
    assert 'data-testid="login-error"' in response.content.decode()
    assert "_auth_user_id" not in client.session


def test_asgi_application_serves_static_files_and_hands_the_rest_to_django():
    from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler
    from django.core.handlers.asgi import ASGIHandler

    from core.asgi import Lifespan
    from files_app.asgi import UploadSizeLimit
    from web.asgi import ContentTypeGuard

    assert isinstance(application, Lifespan)
    assert isinstance(application.app, UploadSizeLimit)
    assert isinstance(application.app.app, ContentTypeGuard)
    static = application.app.app.app.app
    assert isinstance(static, ASGIStaticFilesHandler)
    assert static.base_url.path == "/static/"
    assert type(static.application) is ASGIHandler


def test_the_served_app_refuses_an_oversized_upload_before_reading_it(live_server_url, alice, settings):
    from tests.conftest import client_for

    settings.PANTHEON_MAX_UPLOAD_BYTES = 1000
    key = client_for(alice).raw_key
    response = httpx.post(live_server_url + "/api/v1/files", headers={"Authorization": f"Bearer {key}"},
                          files={"file": ("big.txt", b"x" * 2_000_000, "text/plain")}, timeout=10)
    assert response.status_code == 413 and response.json()["code"] == "file_too_large"


@pytest.mark.parametrize(("path", "content_type"), [
    ("/static/web/chat.js", "text/javascript"),
    ("/static/web/sse.js", "text/javascript"),
    ("/static/web/money.js", "text/javascript"),
    ("/static/web/chat.css", "text/css"),
])
def test_static_files_are_served_by_the_asgi_app(live_server_url, path, content_type):
    response = httpx.get(live_server_url + path, timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith(content_type)
    assert response.content
    assert "last-modified" in response.headers


def test_static_misses_and_the_api_are_untouched(live_server_url):
    assert httpx.get(live_server_url + "/static/web/missing.js", timeout=10).status_code == 404
    # Dot segments sent encoded (httpx would resolve plain ones) stay inside the static folders.
    for path in ("/static/%2e%2e/pantheon/settings.py", "/static/web/%2e%2e/%2e%2e/views.py",
                 "/static/%2e%2e/%2e%2e/manage.py"):
        assert httpx.get(live_server_url + path, timeout=10).status_code == 400, path
    health = httpx.get(live_server_url + "/healthz", timeout=10)
    assert health.status_code == 200 and health.json()["database"] == "ok"
    api = httpx.get(live_server_url + "/api/v1/wallet", timeout=10)
    assert api.status_code == 401 and api.json()["code"] == "not_authenticated"
