"""The API key admin (billing_app.admin.ApiKeyAdmin): the limits shown and edited, what each
key spent this period and its turns; made with limits (the key shown once), revoked."""

import re
import uuid
from decimal import Decimal

from django.contrib import admin

from accounts.models import ApiKey, hash_key
from billing_app.models import UsageRecord
from sessions_app.models import ChatSession, Turn
from tests.conftest import MODEL


def test_the_api_key_admin_is_registered_once():
    assert type(admin.site._registry[ApiKey]).__module__ == "billing_app.admin"


def test_create_with_limits_shows_the_key_once(admin_client, alice, price):
    response = admin_client.post("/admin/accounts/apikey/add/", {
        "user": alice.pk, "name": "capped", "rpm": "4", "tpm": "", "max_parallel": "1", "budget": "2.5",
        "budget_period": "day", "allowed_models": f"{MODEL}, {MODEL}", "expires_at_0": "", "expires_at_1": ""})
    assert response.status_code == 200, response.content.decode()[:2000]
    raw = re.search(r'data-testid="new-api-key"[^>]*>(pk_[A-Za-z0-9_-]{40,})<', response.content.decode()).group(1)
    key = ApiKey.objects.get(key_hash=hash_key(raw))
    assert (key.user, key.name, key.rpm, key.tpm, key.max_parallel, key.budget, key.budget_period,
            key.allowed_models, key.expires_at) == (alice, "capped", 4, None, 1, Decimal("2.5"), "day", [MODEL], None)
    assert ApiKey.objects.count() == 1


def test_an_invalid_limit_is_a_form_error(admin_client, alice, price):
    for data in [{"budget": "2"}, {"budget_period": "week"}, {"allowed_models": "no/such-model"}, {"rpm": "0"}]:
        response = admin_client.post("/admin/accounts/apikey/add/", {"user": alice.pk, "name": "bad", **data})
        assert response.status_code == 200 and "errornote" in response.content.decode(), data
        assert 'data-testid="new-api-key"' not in response.content.decode()
    assert not ApiKey.objects.exists()


def test_the_limits_are_edited_and_the_spend_and_turns_shown(admin_client, alice, price):
    key = ApiKey.issue(user=alice, name="script")[0]
    UsageRecord.objects.create(user=alice, session_id=uuid.uuid4(), turn_id=uuid.uuid4(), api_key_id=key.pk,
                               model=MODEL, prompt_tokens=1, completion_tokens=1, total_tokens=2,
                               cost=Decimal("0.123456"))
    session = ChatSession.objects.create(user=alice, model=MODEL)
    for _ in range(3):
        Turn.objects.create(session=session, user=alice, api_key=key, model=MODEL, status=Turn.Status.COMPLETED)
    page = admin_client.get(f"/admin/accounts/apikey/{key.pk}/change/").content.decode()
    assert "0.123456" in page and "today (UTC)" in page
    assert re.search(r"turns.*?<div class=\"readonly\">3</div>", page, re.S)
    assert key.key_hash not in page
    response = admin_client.post(f"/admin/accounts/apikey/{key.pk}/change/", {
        "name": "script v2", "rpm": "10", "tpm": "", "max_parallel": "", "budget": "1", "budget_period": "month",
        "allowed_models": "", "expires_at_0": "", "expires_at_1": ""})
    assert response.status_code == 302, response.content.decode()[:3000]
    key.refresh_from_db()
    assert (key.name, key.rpm, key.budget, key.budget_period, key.allowed_models, key.user) == (
        "script v2", 10, Decimal("1"), "month", None, alice)
    listing = admin_client.get("/admin/accounts/apikey/").content.decode()
    assert "10 rpm" in listing and "1.000000/month" in listing and "0.123456 (month)" in listing
    assert key.key_hash not in listing
    # Sorting by spend and by turns works.
    assert admin_client.get("/admin/accounts/apikey/?o=9").status_code == 200
    assert admin_client.get("/admin/accounts/apikey/?o=10").status_code == 200


def test_an_edit_does_not_undo_a_revoke(admin_client, alice):
    key = ApiKey.issue(user=alice, name="script")[0]
    form = {"name": "renamed", "rpm": "", "tpm": "", "max_parallel": "", "budget": "", "budget_period": "",
            "allowed_models": "", "expires_at_0": "", "expires_at_1": ""}
    ApiKey.objects.filter(pk=key.pk).update(revoked_at="2026-12-01T00:00:00Z")
    admin_client.post(f"/admin/accounts/apikey/{key.pk}/change/", form)
    key.refresh_from_db()
    assert key.name == "renamed" and key.revoked_at is not None


def test_the_revoke_action_on_the_annotated_changelist(admin_client, alice):
    keys = [ApiKey.issue(user=alice)[0] for _ in range(2)]
    UsageRecord.objects.create(user=alice, session_id=uuid.uuid4(), turn_id=uuid.uuid4(), api_key_id=keys[0].pk,
                               model=MODEL, prompt_tokens=1, completion_tokens=1, total_tokens=2, cost=Decimal("1"))
    response = admin_client.post("/admin/accounts/apikey/", {"action": "revoke",
                                                             "_selected_action": [k.pk for k in keys]}, follow=True)
    assert "Revoked 2 key(s)." in response.content.decode()
    assert ApiKey.objects.filter(revoked_at__isnull=True).count() == 0
