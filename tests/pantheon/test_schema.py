"""Rules the database itself keeps."""

from decimal import Decimal

import pytest
from django.apps import apps
from django.db import IntegrityError, connection, transaction

from billing_app.models import LedgerEntry, Wallet

OWNED = [
    "accounts.ApiKey", "billing_app.Wallet", "billing_app.LedgerEntry", "billing_app.CreditHold",
    "billing_app.UsageRecord", "sessions_app.ChatSession", "sessions_app.Turn", "sessions_app.Message",
    "sessions_app.LlmEvent", "files_app.UploadedFile",
]


@pytest.mark.django_db
@pytest.mark.parametrize("label", OWNED)
def test_every_owned_table_is_indexed_on_its_user(label):
    model = apps.get_model(label)
    with connection.cursor() as cursor:
        constraints = connection.introspection.get_constraints(cursor, model._meta.db_table)
    leading = [c["columns"][0] for c in constraints.values() if c["index"] or c["unique"]]
    assert "user_id" in leading, f"{label} has no index starting with user_id: {constraints}"


def test_one_wallet_per_user(alice):
    with pytest.raises(IntegrityError), transaction.atomic():
        Wallet.objects.create(user=alice)


def test_ledger_amounts_cannot_be_null(alice):
    wallet = Wallet.objects.get(user=alice)
    with pytest.raises(IntegrityError), transaction.atomic():
        LedgerEntry.objects.create(wallet=wallet, user=alice, kind="grant", amount=None, balance_after=Decimal("1"))


def test_a_debit_cannot_be_positive(alice):
    wallet = Wallet.objects.get(user=alice)
    with pytest.raises(IntegrityError), transaction.atomic():
        LedgerEntry.objects.create(wallet=wallet, user=alice, kind="debit", amount=Decimal("1"),
                                   balance_after=Decimal("11"))
