"""core.sql: plain SQL for the hot path, and its pipelined transaction."""

import uuid
from decimal import Decimal

import pytest
from django.db import IntegrityError, connection

from billing_app.models import LedgerEntry, Wallet
from core import sql

pytestmark = pytest.mark.django_db(transaction=True)


def entry(wallet, turn_id, amount="-1"):
    return {"id": uuid.uuid4(), "wallet_id": wallet.pk, "user_id": wallet.user_id, "kind": "debit",
            "amount": Decimal(amount), "balance_after": Decimal(0), "turn_id": turn_id, "note": "",
            "created_at": wallet.created_at}


@pytest.fixture
def wallet(make_user):
    user = make_user("sql", "5")
    return Wallet.objects.get(user=user)


def test_a_transaction_commits_what_it_did(wallet):
    with sql.transaction():
        sql.insert(LedgerEntry, [entry(wallet, uuid.uuid4())])
        sql.update(Wallet, wallet.pk, {"held": Decimal("1.5")}, count=False)
    assert LedgerEntry.objects.filter(kind="debit").count() == 1
    assert Wallet.objects.get(pk=wallet.pk).held == Decimal("1.5")
    LedgerEntry.objects.filter(kind="debit").delete()
    Wallet.objects.filter(pk=wallet.pk).update(held=0)


def test_a_failure_rolls_back_everything_and_leaves_the_connection_usable(wallet):
    turn_id = uuid.uuid4()
    with pytest.raises(IntegrityError), sql.transaction():  # Django's error, not psycopg's
        sql.update(Wallet, wallet.pk, {"held": Decimal("2")}, count=False)
        sql.insert(LedgerEntry, [entry(wallet, turn_id)])
        sql.insert(LedgerEntry, [entry(wallet, turn_id)])  # a second debit for the turn
    assert Wallet.objects.get(pk=wallet.pk).held == 0
    assert not LedgerEntry.objects.filter(kind="debit").exists()
    assert connection.get_autocommit() and not connection.in_atomic_block


def test_an_exception_raised_inside_rolls_back(wallet):
    with pytest.raises(RuntimeError), sql.transaction():
        sql.update(Wallet, wallet.pk, {"held": Decimal("3")}, count=False)
        raise RuntimeError("refused")
    assert Wallet.objects.get(pk=wallet.pk).held == 0


def test_a_count_inside_a_transaction_is_the_real_one(wallet):
    # In PostgreSQL's pipeline mode a statement's count comes with its answer: a count asked
    # for is waited for, not -1 (which would read as "one row or more changed").
    with sql.transaction():
        sql.update(Wallet, wallet.pk, {"held": Decimal("1")}, count=False)
        assert sql.update(Wallet, wallet.pk, {"held": Decimal("2")}) == 1
        assert sql.execute(f"UPDATE {sql.table(Wallet)} SET held = %s WHERE id = %s AND held = %s",
                           [Decimal("3"), wallet.pk, Decimal("1")]) == 0
        sql.update(Wallet, wallet.pk, {"held": Decimal("0")}, count=False)
    assert Wallet.objects.get(pk=wallet.pk).held == 0


def test_a_nested_transaction_joins_the_outer_one(wallet):
    with pytest.raises(RuntimeError), sql.transaction():
        with sql.transaction():
            sql.update(Wallet, wallet.pk, {"held": Decimal("4")}, count=False)
        raise RuntimeError("the outer one fails")
    assert Wallet.objects.get(pk=wallet.pk).held == 0


def test_reads_come_back_as_python_values(wallet):
    row = sql.fetch_one(f"SELECT balance, created_at FROM {sql.table(Wallet)} WHERE id = %s", [wallet.pk])
    assert sql.as_money(row[0]) == Decimal("5.000000")
    assert sql.as_datetime(row[1]) == Wallet.objects.get(pk=wallet.pk).created_at
    assert sql.as_uuid(sql.value(LedgerEntry, "id", uuid.UUID(int=7))) == uuid.UUID(int=7)
