import datetime
import re
import uuid
from decimal import Decimal

import pytest
from django.contrib import admin
from django.utils import timezone

from accounts.models import ApiKey, hash_key
from billing_app.admin import LedgerEntryInline
from billing_app.models import CreditHold, LedgerEntry, UsageRecord, Wallet
from sessions_app.admin import MessageInline, TurnInline
from sessions_app.models import LlmEvent, Turn


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
    # Shown in the answer to the POST itself: no redirect, so no message (and no cookie) carries it.
    response = admin_client.post("/admin/accounts/apikey/add/", {"user": alice.pk, "name": "laptop"})
    assert response.status_code == 200
    page = response.content.decode()
    raw = re.search(r'data-testid="new-api-key"[^>]*>(pk_[A-Za-z0-9_-]{40,})<', page).group(1)
    key = ApiKey.objects.get(key_hash=hash_key(raw))
    assert key.user == alice and key.name == "laptop"
    assert "no-store" in response["Cache-Control"]
    for cookie in response.cookies.values():
        assert raw not in cookie.value and key.prefix not in cookie.value, cookie.key
    assert "messages" not in response.cookies
    assert raw not in str(dict(admin_client.session))  # nor the server-side session
    listing = admin_client.get("/admin/accounts/apikey/")
    assert raw not in listing.content.decode()  # never shown again
    assert all(raw not in cookie.value for cookie in listing.cookies.values())
    assert all(raw not in cookie.value for cookie in admin_client.cookies.values())
    admin_client.post("/admin/accounts/apikey/", {"action": "revoke", "_selected_action": [key.pk]})
    key.refresh_from_db()
    assert key.revoked_at is not None


def _registered_with_a_time():
    """Every ModelAdmin whose model records when its rows were created."""
    return [pytest.param(model, model_admin, id=model.__name__) for model, model_admin in admin.site._registry.items()
            if any(f.name == "created_at" for f in model._meta.get_fields())]


@pytest.mark.parametrize("model, model_admin", _registered_with_a_time())
def test_every_changelist_with_a_time_is_newest_first(rf, model, model_admin):
    ordering = model_admin.get_ordering(rf.get("/admin/"))
    assert ordering and ordering[0] == "-created_at", f"{model.__name__}: {ordering}"


def test_inlines_are_newest_first_and_a_turn_reads_in_conversation_order():
    for inline in (LedgerEntryInline, TurnInline):
        assert inline.ordering[0] == "-created_at", inline
    assert MessageInline.ordering == ["created_at", "position"]


def _order_in(page: str, *needles: str) -> list[int]:
    return [page.index(n) for n in needles]


def test_ledger_and_turn_changelists_list_the_newest_first(admin_client, alice, session_of):
    wallet = Wallet.objects.get(user=alice)
    now = timezone.now()
    # UUIDs chosen so that id order is the opposite of time order.
    LedgerEntry.objects.create(id="ffffffff-0000-4000-8000-000000000000", wallet=wallet, user=alice, kind="adjustment",
                               amount=Decimal("0"), balance_after=wallet.balance, note="older entry",
                               created_at=now - datetime.timedelta(days=2))
    LedgerEntry.objects.create(id="00000000-0000-4000-8000-000000000000", wallet=wallet, user=alice, kind="adjustment",
                               amount=Decimal("0"), balance_after=wallet.balance, note="newer entry",
                               created_at=now + datetime.timedelta(minutes=1))
    page = admin_client.get("/admin/billing_app/ledgerentry/").content.decode()
    newer, older, grant = _order_in(page, "newer entry", "older entry", "test credits")
    assert newer < grant < older

    session = session_of(alice)
    Turn.objects.create(id="ffffffff-0000-4000-8000-000000000001", session=session, user=alice, model="old/model",
                        status="completed", created_at=now - datetime.timedelta(days=1))
    Turn.objects.create(id="00000000-0000-4000-8000-000000000001", session=session, user=alice, model="new/model",
                        status="completed", created_at=now, reconciliation="unreconciled")
    page = admin_client.get("/admin/sessions_app/turn/").content.decode()
    new, old = _order_in(page, "new/model", "old/model")
    assert new < old
    filtered = admin_client.get("/admin/sessions_app/turn/", {"reconciliation__exact": "unreconciled"})
    assert [t.model for t in filtered.context["cl"].result_list] == ["new/model"]


@pytest.mark.open_holds_ok
def test_wallet_shows_held_and_available_and_cannot_be_deleted(admin_client, alice):
    wallet = Wallet.objects.get(user=alice)
    CreditHold.objects.create(wallet=wallet, user=alice, turn_id=uuid.uuid4(), model="m", amount=Decimal("3.25"),
                              max_tokens=100)
    Wallet.objects.filter(pk=wallet.pk).update(held=Decimal("3.25"))

    listing = admin_client.get("/admin/billing_app/wallet/").content.decode()
    for column in ("column-balance", "column-held", "column-available"):
        assert column in listing
    assert "10.000000" in listing and "3.250000" in listing and "6.750000" in listing
    assert 'value="delete_selected"' not in listing and 'value="grant_credits"' in listing

    page = admin_client.get(f"/admin/billing_app/wallet/{wallet.pk}/change/").content.decode()
    assert "field-held" in page and "field-available" in page and "6.750000" in page
    assert "deletelink" not in page
    assert admin_client.post(f"/admin/billing_app/wallet/{wallet.pk}/delete/").status_code == 403
    assert Wallet.objects.filter(pk=wallet.pk).exists()


def test_usage_and_llm_event_admin_show_the_provider_record(admin_client):
    usage = admin.site._registry[UsageRecord]
    assert {"reconciled", "provider_cost"} <= set(usage.list_display) and "reconciled" in usage.list_filter
    events = admin.site._registry[LlmEvent]
    assert "provider_cost" in events.list_display and "generation_id" in events.search_fields
    assert not events.has_change_permission(None)
    turns = admin.site._registry[Turn]
    assert "reconciliation" in turns.list_display and "reconciliation" in turns.list_filter
    assert "By reconciliation" in admin_client.get("/admin/sessions_app/turn/").content.decode()
