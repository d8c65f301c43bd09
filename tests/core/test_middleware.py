"""Django's middleware without a thread hop per hook (core/middleware.py)."""

import httpx
import pytest

from core import middleware
from tests.conftest import client_for


@pytest.fixture
def hops(monkeypatch):
    """The middleware hooks sent to a thread, by name: by core.middleware, or by Django's
    MiddlewareMixin (what every hook cost before)."""
    from django.utils import deprecation

    calls = []
    real = middleware.sync_to_async

    def counting(fn, **kwargs):
        calls.append(getattr(fn, "__qualname__", repr(fn)))
        return real(fn, **kwargs)

    monkeypatch.setattr(middleware, "sync_to_async", counting)
    monkeypatch.setattr(deprecation, "sync_to_async", counting)
    return calls


def test_an_api_request_runs_every_middleware_hook_inline(alice, live_server_url, hops):
    headers = {"Authorization": f"Bearer {client_for(alice).raw_key}"}
    with httpx.Client(base_url=live_server_url, headers=headers) as http:
        assert http.get("/api/v1/wallet").status_code == 200
        response = http.post("/api/v1/sessions/00000000-0000-0000-0000-000000000000/turns/stream",
                             json={"content": "hi"})
        assert response.status_code == 404
    assert hops == []


def test_a_login_still_saves_its_session_in_a_thread(alice, live_server_url, hops):
    with httpx.Client(base_url=live_server_url) as http:
        page = http.get("/accounts/login/")
        assert page.status_code == 200
        response = http.post("/accounts/login/", data={"username": "alice", "password": "pw",
                                                       "csrfmiddlewaretoken": http.cookies["csrftoken"]})
        assert response.status_code == 302 and "sessionid" in http.cookies
    assert any("process_response" in name for name in hops)  # the session was saved
    assert any("process_view" in name for name in hops)  # the form's CSRF token was checked
