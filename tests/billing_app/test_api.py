import uuid
from decimal import Decimal

from billing_app import services
from billing_app.models import UsageRecord
from tests.conftest import MODEL


def test_models_lists_the_priced_catalogue(alice_api, price):
    assert alice_api.get("/api/v1/models").json() == [
        {"model": MODEL, "prompt_price_per_mtok": "1000.000000", "completion_price_per_mtok": "2000.000000"}
    ]


def test_wallet_fields(alice, alice_api, price):
    services.hold(user_id=alice.pk, turn_id=(turn_id := uuid.uuid4()), model=MODEL, prompt_tokens=10, max_tokens=100)
    assert alice_api.get("/api/v1/wallet").json() == {
        "balance": "10.000000", "held": "0.210000", "available": "9.790000", "enforcement": True,
    }
    services.settle(user_id=alice.pk, turn_id=turn_id, cost=Decimal("0.1"))
    assert alice_api.get("/api/v1/wallet").json()["held"] == "0.000000"


def test_wallet_of_a_user_without_one_is_zero(make_user):
    from tests.conftest import client_for

    body = client_for(make_user("nobody")).get("/api/v1/wallet").json()
    assert body == {"balance": "0.000000", "held": "0.000000", "available": "0.000000", "enforcement": True}


def test_ledger_newest_first_with_fields(alice, alice_api, bob):
    services.grant(user_id=alice.pk, amount=Decimal("1.5"), note="second")
    page = alice_api.get("/api/v1/wallet/ledger").json()
    assert page["count"] == 2  # bob's grant is not there
    newest, oldest = page["results"]
    assert set(newest) == {"id", "kind", "amount", "balance_after", "turn_id", "note", "created_at"}
    assert (newest["kind"], newest["amount"], newest["balance_after"], newest["note"]) == (
        "grant", "1.500000", "11.500000", "second")
    assert oldest["balance_after"] == "10.000000" and newest["turn_id"] is None


def test_usage_page_and_session_filter(alice, alice_api, bob):
    s1, s2 = uuid.uuid4(), uuid.uuid4()
    for session_id in (s1, s1, s2):
        UsageRecord.objects.create(user=alice, session_id=session_id, turn_id=uuid.uuid4(), model=MODEL,
                                   prompt_tokens=1, completion_tokens=2, total_tokens=3, cost=Decimal("0.000005"))
    UsageRecord.objects.create(user=bob, session_id=s1, turn_id=uuid.uuid4(), model=MODEL,
                               prompt_tokens=1, completion_tokens=2, total_tokens=3, cost=Decimal("1"))
    assert alice_api.get("/api/v1/usage").json()["count"] == 3
    filtered = alice_api.get(f"/api/v1/usage?session={s1}").json()
    assert filtered["count"] == 2
    assert set(filtered["results"][0]) == {"id", "session_id", "turn_id", "key_id", "model", "provider_model",
                                           "prompt_tokens",
                                           "completion_tokens", "total_tokens", "estimated", "reconciled", "cost",
                                           "created_at"}
    assert filtered["results"][0]["cost"] == "0.000005"
    bad = alice_api.get("/api/v1/usage?session=not-a-uuid")
    assert bad.status_code == 400 and bad.json()["code"] == "invalid_session"


def test_page_out_of_range_is_404_with_code(alice_api):
    response = alice_api.get("/api/v1/wallet/ledger?page=99")
    assert response.status_code == 404 and response.json()["code"] == "not_found"
