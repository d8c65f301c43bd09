"""Django's middleware without a thread hop per hook (core/middleware.py)."""

import pytest
from django.test import AsyncClient

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


@pytest.mark.django_db(transaction=True)
async def test_an_api_request_runs_every_middleware_hook_inline(alice, hops):
    from asgiref.sync import sync_to_async

    key = await sync_to_async(lambda: client_for(alice).raw_key)()
    response = await AsyncClient().get("/api/v1/wallet", headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200
    response = await AsyncClient().post("/api/v1/sessions/00000000-0000-0000-0000-000000000000/turns/stream",
                                        {"content": "hi"}, content_type="application/json",
                                        headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 404
    assert hops == []


@pytest.mark.django_db(transaction=True)
async def test_a_login_still_saves_its_session_in_a_thread(alice, hops):
    client = AsyncClient()
    page = await client.get("/accounts/login/")
    assert page.status_code == 200
    response = await client.post("/accounts/login/", {"username": "alice", "password": "pw",
                                                      "csrfmiddlewaretoken": page.cookies["csrftoken"].value})
    assert response.status_code == 302 and "sessionid" in response.cookies
    assert any("process_response" in name for name in hops)  # the session was saved
    assert any("process_view" in name for name in hops)  # the form's CSRF token was checked
