import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from accounts.models import ApiKey, hash_key

PROTECTED = ["/api/v1/models", "/api/v1/sessions", "/api/v1/wallet", "/api/v1/wallet/ledger", "/api/v1/usage"]


@pytest.mark.django_db
@pytest.mark.parametrize("path", PROTECTED)
def test_missing_key_is_401(path):
    response = APIClient().get(path)
    assert response.status_code == 401
    assert response.json()["code"] == "not_authenticated"
    assert response["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize("path", PROTECTED)
def test_wrong_key_is_401(alice, path):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION="Bearer pk_not-a-real-key")
    response = client.get(path)
    assert response.status_code == 401
    assert response.json() == {"detail": "Invalid or revoked API key.", "code": "authentication_failed"}


def test_revoked_key_is_401(alice_api):
    assert alice_api.get("/api/v1/wallet").status_code == 200
    ApiKey.objects.get(key_hash=hash_key(alice_api.raw_key)).revoke()
    assert alice_api.get("/api/v1/wallet").status_code == 401


def test_key_of_inactive_user_is_401(alice, alice_api):
    alice.is_active = False
    alice.save()
    assert alice_api.get("/api/v1/wallet").status_code == 401


def test_key_is_stored_hashed_and_last_use_recorded(alice):
    key, raw = ApiKey.issue(user=alice)
    assert raw.startswith("pk_") and len(raw) > 40
    assert key.key_hash == hash_key(raw) and raw not in key.key_hash
    assert key.last_used_at is None
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
    client.get("/api/v1/wallet")
    key.refresh_from_db()
    assert key.last_used_at is not None and key.last_used_at <= timezone.now()


def test_browser_session_login_works_for_the_api(alice):
    client = APIClient()
    assert client.login(username="alice", password="pw")
    assert client.get("/api/v1/wallet").status_code == 200


def test_session_auth_write_requires_csrf(alice, price):
    client = APIClient(enforce_csrf_checks=True)
    client.login(username="alice", password="pw")
    response = client.post("/api/v1/sessions", {"model": "test/model"}, format="json")
    assert response.status_code == 403
