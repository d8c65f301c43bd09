import re
from decimal import Decimal

import pytest
from django.contrib.auth import get_user_model
from django.test import Client

from accounts.models import ApiKey, hash_key
from billing_app.models import LedgerEntry, Wallet


@pytest.fixture
def admin_client(db):
    get_user_model().objects.create_superuser("root", "root@example.com", "pw")
    client = Client()
    client.login(username="root", password="pw")
    return client


@pytest.mark.parametrize("path", [
    "accounts/apikey", "billing_app/wallet", "billing_app/ledgerentry", "billing_app/credithold",
    "billing_app/modelprice", "billing_app/usagerecord", "sessions_app/chatsession", "sessions_app/turn",
    "sessions_app/llmevent", "files_app/uploadedfile",
])
def test_admin_changelists_load(admin_client, alice, path):
    assert admin_client.get(f"/admin/{path}/").status_code == 200


def test_wallet_page_shows_its_ledger(admin_client, alice):
    wallet = Wallet.objects.get(user=alice)
    page = admin_client.get(f"/admin/billing_app/wallet/{wallet.pk}/change/").content.decode()
    assert "test credits" in page and "10.000000" in page


def test_grant_credits_action(admin_client, alice, bob):
    wallets = Wallet.objects.filter(user__in=[alice, bob])
    response = admin_client.post("/admin/billing_app/wallet/", {
        "action": "grant_credits", "_selected_action": [w.pk for w in wallets], "amount": "2.5", "note": "promo",
    }, follow=True)
    assert response.status_code == 200
    assert Wallet.objects.get(user=alice).balance == Decimal("12.5")
    assert Wallet.objects.get(user=bob).balance == Decimal("7.5")
    assert LedgerEntry.objects.filter(note="promo", kind="grant").count() == 2


def test_grant_credits_action_rejects_a_bad_amount(admin_client, alice):
    wallet = Wallet.objects.get(user=alice)
    response = admin_client.post("/admin/billing_app/wallet/", {
        "action": "grant_credits", "_selected_action": [wallet.pk], "amount": "-4"}, follow=True)
    assert "positive" in response.content.decode()
    assert Wallet.objects.get(user=alice).balance == Decimal("10")


def test_api_key_is_shown_once_on_creation_and_can_be_revoked(admin_client, alice):
    response = admin_client.post("/admin/accounts/apikey/add/", {"user": alice.pk, "name": "laptop"}, follow=True)
    page = response.content.decode()
    raw = re.search(r"(pk_[A-Za-z0-9_-]{40,})", page).group(1)
    key = ApiKey.objects.get(key_hash=hash_key(raw))
    assert key.user == alice and key.name == "laptop"
    listing = admin_client.get("/admin/accounts/apikey/").content.decode()
    assert raw not in listing  # never shown again
    admin_client.post("/admin/accounts/apikey/", {"action": "revoke", "_selected_action": [key.pk]})
    key.refresh_from_db()
    assert key.revoked_at is not None
