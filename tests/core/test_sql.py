"""core.sql: plain SQL for the hot path, and its pipelined transaction."""

import uuid
from decimal import Decimal

import pytest
from django.db import DataError, IntegrityError, ProgrammingError, connection
from django.test.utils import CaptureQueriesContext

from billing_app.models import LedgerEntry, Wallet
from core import sql
from tests.conftest import prepared_statements

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


def test_a_row_fetched_later_is_read_after_the_commit_and_reflects_the_transaction(wallet):
    change = f"UPDATE {sql.table(Wallet)} SET held = held + 1 WHERE id = %s RETURNING held"
    with sql.transaction():
        first = sql.fetch_later(change, [wallet.pk])
        second = sql.fetch_later(change, [wallet.pk])  # each its own cursor: both rows kept
        sql.update(Wallet, wallet.pk, {"balance": Decimal("4")}, count=False)
    assert (sql.as_money(first()[0]), sql.as_money(second()[0])) == (Decimal(1), Decimal(2))
    read = sql.fetch_later(f"SELECT balance FROM {sql.table(Wallet)} WHERE id = %s", [wallet.pk])  # at once
    assert sql.as_money(read()[0]) == Decimal(4)
    Wallet.objects.filter(pk=wallet.pk).update(held=0, balance=Decimal(5))


postgres_only = pytest.mark.skipif(connection.vendor != "postgresql", reason="prepared statements: PostgreSQL")


@postgres_only
def test_the_hot_statements_are_prepared_on_the_connection_and_the_orms_are_not(wallet):
    # The server parses and plans a prepared statement once per connection (core/sql.py).
    read = f"SELECT {sql.column(Wallet, 'held')} FROM {sql.table(Wallet)} WHERE id = %s"
    with sql.transaction():  # one connection for the whole test: inside one unit of work
        for _ in range(sql.PREPARE_THRESHOLD + 1):
            assert sql.fetch_one(read, [wallet.pk]) == (Decimal(0),)
        list(Wallet.objects.filter(pk=wallet.pk))
        statements = prepared_statements()
    assert any(statement.startswith("SELECT \"held\"") for statement in statements), statements
    assert not any("billing_app_wallet\".\"id\"" in statement for statement in statements), statements


@postgres_only
def test_statements_skipped_by_a_failed_transaction_are_prepared_again(wallet):
    # Statements after the failing one in a pipeline never reach the server; psycopg must
    # not think them prepared there, or the next turn's close fails ("prepared statement
    # _pg3_n does not exist") until the connection is dropped.
    turn_id = uuid.uuid4()

    def close_like(fail: bool) -> None:
        with sql.transaction():
            sql.insert(LedgerEntry, [entry(wallet, turn_id if fail else uuid.uuid4())])
            sql.update(Wallet, wallet.pk, {"held": Decimal("2")}, count=False)

    sql.insert(LedgerEntry, [entry(wallet, turn_id)])
    for _ in range(sql.PREPARE_THRESHOLD):  # the UPDATE is next prepared in a failing pipeline
        close_like(fail=False)
    with pytest.raises(IntegrityError):
        close_like(fail=True)  # the insert fails: the UPDATE after it is skipped
    close_like(fail=False)
    assert Wallet.objects.get(pk=wallet.pk).held == Decimal("2")
    LedgerEntry.objects.filter(kind="debit").delete()
    Wallet.objects.filter(pk=wallet.pk).update(held=0)


@postgres_only
def test_update_or_fail_updates_a_matching_row_and_else_fails_the_whole_transaction(wallet):
    with sql.transaction():
        sql.update_or_fail(Wallet, wallet.pk, {"held": Decimal("1")}, where="held = 0")
    assert Wallet.objects.get(pk=wallet.pk).held == Decimal(1)
    with pytest.raises(DataError) as failed, sql.transaction():
        sql.insert(LedgerEntry, [entry(wallet, uuid.uuid4())])  # sent before it: rolled back too
        sql.update_or_fail(Wallet, wallet.pk, {"held": Decimal("2")}, where="held = 0")
        sql.update(Wallet, wallet.pk, {"balance": Decimal("1")}, count=False)  # after it: never runs
    assert sql.matched_nothing(failed.value)
    assert (Wallet.objects.get(pk=wallet.pk).held, LedgerEntry.objects.filter(kind="debit").count()) == (1, 0)
    # Writes in its statement: made with the matching row, failed with the missing one.
    with sql.transaction():
        sql.update_or_fail(Wallet, wallet.pk, {"held": Decimal("0")}, where="held = 1",
                           together=[sql.inserting(LedgerEntry, [entry(wallet, uuid.uuid4())])])
    with pytest.raises(DataError), sql.transaction():
        sql.update_or_fail(Wallet, wallet.pk, {"held": Decimal("3")}, where="held = 1",
                           together=[sql.inserting(LedgerEntry, [entry(wallet, uuid.uuid4())])])
    assert (Wallet.objects.get(pk=wallet.pk).held, LedgerEntry.objects.filter(kind="debit").count()) == (0, 1)
    LedgerEntry.objects.filter(kind="debit").delete()


def test_writes_to_several_tables_go_in_one_statement_on_postgresql(wallet):
    from billing_app.models import CreditHold

    turn_id, hold_id = uuid.uuid4(), uuid.uuid4()
    hold = {"id": hold_id, "wallet_id": wallet.pk, "user_id": wallet.user_id, "turn_id": turn_id, "model": "m",
            "amount": Decimal("1"), "max_tokens": 5, "created_at": wallet.created_at, "released_at": None}
    with CaptureQueriesContext(connection) as queries, sql.transaction():
        sql.write_together(sql.inserting(LedgerEntry, [entry(wallet, turn_id), entry(wallet, None)]),
                           sql.inserting(CreditHold, [hold]), sql.inserting(Wallet, []),  # no rows: left out
                           sql.updating(Wallet, wallet.pk, {"held": Decimal("1")}))
    writes = [query["sql"] for query in queries if "INSERT" in query["sql"] or "UPDATE" in query["sql"]]
    assert len(writes) == (1 if connection.vendor == "postgresql" else 3), writes
    assert LedgerEntry.objects.filter(kind="debit").count() == 2 and CreditHold.objects.get().pk == hold_id
    assert Wallet.objects.get(pk=wallet.pk).held == 1
    LedgerEntry.objects.filter(kind="debit").delete()  # (the ledger is checked after each test)
    CreditHold.objects.all().delete()
    Wallet.objects.filter(pk=wallet.pk).update(held=0)


def test_writes_together_fail_together(wallet):
    turn_id = uuid.uuid4()
    with pytest.raises(IntegrityError), sql.transaction():
        sql.write_together(sql.updating(Wallet, wallet.pk, {"held": Decimal("2")}),
                           sql.inserting(LedgerEntry, [entry(wallet, turn_id), entry(wallet, turn_id)]))  # two debits
    assert Wallet.objects.get(pk=wallet.pk).held == 0
    assert not LedgerEntry.objects.filter(kind="debit").exists()


def test_alone_allows_one_statement_and_refuses_a_second_before_it_is_sent(wallet):
    with sql.alone():
        sql.update(Wallet, wallet.pk, {"held": Decimal("1")}, count=False)
        with pytest.raises(ProgrammingError, match="second statement"):
            sql.insert(LedgerEntry, [entry(wallet, uuid.uuid4())])
    assert Wallet.objects.get(pk=wallet.pk).held == Decimal("1")  # committed: a transaction of its own
    assert not LedgerEntry.objects.filter(kind="debit").exists()
    with sql.alone():  # a transaction may be the one thing inside, with as many statements as it likes
        with sql.transaction():
            sql.insert(LedgerEntry, [entry(wallet, uuid.uuid4())])
            sql.update(Wallet, wallet.pk, {"held": Decimal("0")}, count=False)
        with pytest.raises(ProgrammingError):
            sql.update(Wallet, wallet.pk, {"held": Decimal("3")}, count=False)
    with sql.transaction(), sql.alone():  # inside a transaction: part of it
        sql.update(Wallet, wallet.pk, {"held": Decimal("2")}, count=False)
        sql.update(Wallet, wallet.pk, {"held": Decimal("0")}, count=False)
    assert Wallet.objects.get(pk=wallet.pk).held == 0
    sql.update(Wallet, wallet.pk, {"held": Decimal("4")})  # and outside it, no limit again
    sql.update(Wallet, wallet.pk, {"held": Decimal("0")})
    LedgerEntry.objects.filter(kind="debit").delete()


def test_a_write_after_another_joins_its_returning_row(wallet):
    """`updating(..., after=name)`: the update happens only if the named write returned a
    row (PostgreSQL: the join is what orders its row lock after that write's)."""
    if connection.vendor != "postgresql":
        pytest.skip("one statement: PostgreSQL")
    for held, expected in ((Decimal("0"), Decimal("7")), (Decimal("99"), Decimal("0"))):
        matched = sql.Write(f"SELECT id FROM {sql.table(Wallet)} WHERE id = %s AND held = %s",
                            [wallet.pk, held], name="matched")
        with sql.transaction():
            sql.write_together(matched, sql.updating(Wallet, wallet.pk, {"held": Decimal("7")}, after="matched"))
        assert Wallet.objects.get(pk=wallet.pk).held == expected
        Wallet.objects.filter(pk=wallet.pk).update(held=0)
