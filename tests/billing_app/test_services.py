import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from decimal import Decimal

import pytest
from django.db import connection, transaction
from django.utils import timezone

from billing_app import services
from billing_app.models import CreditHold, LedgerEntry, ModelPrice, Wallet
from billing_app.selectors import ledger_problems, wallet_summary
from tests.conftest import MODEL, in_threads


def price_of(prompt: str, completion: str) -> ModelPrice:
    return ModelPrice(model="x", prompt_price_per_mtok=Decimal(prompt), completion_price_per_mtok=Decimal(completion))


@pytest.mark.parametrize(
    ("prompt_tokens", "completion_tokens", "prices", "expected"),
    [
        (12, 2, ("1", "1"), "0.000014"),
        (1, 0, ("0.5", "0"), "0.000001"),  # 0.0000005 rounds half up
        (1, 0, ("0.4999", "0"), "0.000000"),  # just below half rounds down
        (3, 0, ("0.5", "0"), "0.000002"),  # 0.0000015 -> 0.000002 (half up, not banker's)
        (5, 0, ("0.5", "0"), "0.000003"),  # 0.0000025 -> 0.000003 (banker's would give 0.000002)
        (1_000_000, 1_000_000, ("0.15", "0.60"), "0.750000"),
        (0, 0, ("5", "5"), "0.000000"),
        (1234, 567, ("2.5", "10"), "0.008755"),  # 0.003085 + 0.00567
        (10**9, 10**9, ("1000", "2000"), "3000000.000000"),
    ],
)
def test_compute_cost_rounds_half_up_to_six_places(prompt_tokens, completion_tokens, prices, expected):
    cost = services.compute_cost(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                 price=price_of(*prices))
    assert str(cost) == expected


def test_grant_writes_ledger_entry_with_balance_after(alice):
    entry = services.grant(user_id=alice.pk, amount=Decimal("2.5"), note="top-up")
    assert entry.kind == "grant" and entry.amount == Decimal("2.5")
    assert entry.balance_after == Decimal("12.5")
    assert Wallet.objects.get(user=alice).balance == Decimal("12.5")
    assert ledger_problems() == []


@pytest.mark.parametrize("amount", ["0", "-1", "0.0000001", "NaN", "Infinity"])
def test_grant_rejects_bad_amounts(alice, amount):
    with pytest.raises(services.InvalidAmount):
        services.grant(user_id=alice.pk, amount=Decimal(amount))
    assert Wallet.objects.get(user=alice).balance == Decimal("10")


@pytest.mark.open_holds_ok
def test_hold_reserves_prompt_and_capped_output(alice, price, settings):
    settings.PANTHEON_MAX_OUTPUT_TOKENS = 1024
    decision = services.hold(user_id=alice.pk, turn_id=uuid.uuid4(), model=MODEL, prompt_tokens=100)
    assert decision.max_tokens == 1024
    # 100 * 1000/1e6 + 1024 * 2000/1e6 = 0.1 + 2.048
    assert decision.amount == Decimal("2.148000")
    summary = wallet_summary(user_id=alice.pk)
    assert summary.held == Decimal("2.148") and summary.available == Decimal("7.852")


@pytest.mark.open_holds_ok
def test_hold_caps_max_tokens_to_what_is_affordable(make_user, price, settings):
    user = make_user("carol", "0.05")
    decision = services.hold(user_id=user.pk, turn_id=uuid.uuid4(), model=MODEL, prompt_tokens=10, max_tokens=500)
    # available 0.05 - prompt 0.01 = 0.04 affords 20 output tokens at 0.002 each
    assert decision.max_tokens == 20
    assert decision.amount <= Decimal("0.05")


def test_hold_refuses_below_minimum_output_tokens(make_user, price, settings):
    settings.PANTHEON_MIN_OUTPUT_TOKENS = 16
    user = make_user("dave", "0.03")  # affords 10 output tokens after a 10-token prompt
    with pytest.raises(services.InsufficientCredits):
        services.hold(user_id=user.pk, turn_id=uuid.uuid4(), model=MODEL, prompt_tokens=10)
    assert not CreditHold.objects.exists()


def test_hold_refuses_empty_wallet(make_user, price):
    user = make_user("erin")
    with pytest.raises(services.InsufficientCredits):
        services.hold(user_id=user.pk, turn_id=uuid.uuid4(), model=MODEL, prompt_tokens=1)


def test_hold_unknown_model(alice):
    with pytest.raises(services.UnknownModel):
        services.hold(user_id=alice.pk, turn_id=uuid.uuid4(), model="nope/none", prompt_tokens=1)


def test_an_open_hold_counts_until_its_turn_settles_however_old(make_user, price, settings):
    """A hold has no clock of its own: an hour-old hold of a long stream still protects the
    wallet (the overspend of issue 9: wallet 0.25, hold A, A expires, hold B granted)."""
    settings.PANTHEON_MAX_OUTPUT_TOKENS = 1000
    settings.PANTHEON_MIN_OUTPUT_TOKENS = 100
    user = make_user("frank", "2.1")  # one hold of 0.001 + 2.0 fits, a second does not
    first = services.hold(user_id=user.pk, turn_id=uuid.uuid4(), model=MODEL, prompt_tokens=1)
    assert first.max_tokens == 1000
    CreditHold.objects.filter(pk=first.hold_id).update(created_at=timezone.now() - timedelta(hours=2))
    with pytest.raises(services.InsufficientCredits):
        services.hold(user_id=user.pk, turn_id=uuid.uuid4(), model=MODEL, prompt_tokens=1)
    services.settle(user_id=user.pk, turn_id=CreditHold.objects.get(pk=first.hold_id).turn_id, cost=Decimal("0"))
    second = services.hold(user_id=user.pk, turn_id=uuid.uuid4(), model=MODEL, prompt_tokens=1)
    assert second.max_tokens == 1000
    services.settle(user_id=user.pk, turn_id=CreditHold.objects.get(pk=second.hold_id).turn_id, cost=Decimal("0"))


def test_a_client_max_tokens_below_the_minimum_is_honoured(alice, price, settings):
    settings.PANTHEON_MIN_OUTPUT_TOKENS = 16
    turn_id = uuid.uuid4()
    decision = services.hold(user_id=alice.pk, turn_id=turn_id, model=MODEL, prompt_tokens=10, max_tokens=7)
    assert decision.max_tokens == 7
    services.settle(user_id=alice.pk, turn_id=turn_id, cost=Decimal("0"))


def test_the_402_message_says_what_is_needed_and_available_in_six_places(make_user, price, settings):
    settings.PANTHEON_MIN_OUTPUT_TOKENS = 16
    user = make_user("hal", "0.03")
    with pytest.raises(services.InsufficientCredits) as refused:
        services.hold(user_id=user.pk, turn_id=uuid.uuid4(), model=MODEL, prompt_tokens=10)
    # 10 * 0.001 + 16 * 0.002 = 0.042 needed
    assert str(refused.value) == ("This turn needs 0.042000 credits (its prompt and 16 output tokens); "
                                  "0.030000 are available.")


def test_usage_to_bill_follows_spec_section_10():
    from llm_gateway import Usage

    reported = Usage(7, 3)
    assert services.usage_to_bill(reported=reported, text="abc", prompt_estimate=50, output_cap=10,
                                  prompt_processed=False) == reported
    # Text produced and no count: never free, estimated.
    assert services.usage_to_bill(reported=None, text="x" * 30, prompt_estimate=50, output_cap=100,
                                  prompt_processed=False) == Usage(50, 10, estimated=True)
    # ...and never more output than the cap the turn was given.
    assert services.usage_to_bill(reported=None, text="x" * 300, prompt_estimate=50, output_cap=7,
                                  prompt_processed=False) == Usage(50, 7, estimated=True)
    # Nothing produced: free, unless the provider already had the prompt.
    assert services.usage_to_bill(reported=None, text="", prompt_estimate=50, output_cap=7,
                                  prompt_processed=False) == Usage(0, 0)
    assert services.usage_to_bill(reported=None, text="", prompt_estimate=50, output_cap=7,
                                  prompt_processed=True) == Usage(50, 0, estimated=True)
    # A provider that ignored max_tokens is not passed on beyond what the hold covered.
    assert services.usage_to_bill(reported=Usage(7, 5000), text="", prompt_estimate=50, output_cap=100,
                                  prompt_processed=True) == Usage(7, 100)


def test_release_holds_without_turn_leaves_live_and_recent_ones(alice, price):
    old, live, recent = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    for turn_id in (old, live, recent):
        services.hold(user_id=alice.pk, turn_id=turn_id, model=MODEL, prompt_tokens=10)
    CreditHold.objects.filter(turn_id__in=[old, live]).update(created_at=timezone.now() - timedelta(hours=1))
    released = services.release_holds_without_turn(live_turn_ids=[live],
                                                   created_before=timezone.now() - timedelta(minutes=1))
    assert released == 1
    assert set(CreditHold.objects.open().values_list("turn_id", flat=True)) == {live, recent}
    for turn_id in (live, recent):
        services.settle(user_id=alice.pk, turn_id=turn_id, cost=Decimal("0"))


def test_enforcement_off_takes_no_hold(alice, price, settings):
    settings.PANTHEON_CREDIT_ENFORCEMENT = False
    settings.PANTHEON_MAX_OUTPUT_TOKENS = 64
    decision = services.hold(user_id=alice.pk, turn_id=uuid.uuid4(), model=MODEL, prompt_tokens=10**9,
                             max_tokens=100)
    assert decision.hold_id is None and decision.max_tokens == 64


def test_settle_debits_once_and_releases_the_hold(alice, price):
    turn_id = uuid.uuid4()
    services.hold(user_id=alice.pk, turn_id=turn_id, model=MODEL, prompt_tokens=10)
    balance = services.settle(user_id=alice.pk, turn_id=turn_id, cost=Decimal("0.25"))
    assert balance == Decimal("9.75")
    again = services.settle(user_id=alice.pk, turn_id=turn_id, cost=Decimal("0.25"))
    assert again == Decimal("9.75")
    debit = LedgerEntry.objects.get(turn_id=turn_id)
    assert debit.kind == "debit" and debit.amount == Decimal("-0.25") and debit.balance_after == Decimal("9.75")
    assert not CreditHold.objects.open().exists()


def test_settle_without_a_wallet_makes_one_and_debits_it_once(make_user):
    # Credit enforcement off and nothing ever granted: the turn is still paid for, once.
    carol = make_user("carol")
    turn_id = uuid.uuid4()
    assert services.settle(user_id=carol.pk, turn_id=turn_id, cost=Decimal("0.25")) == Decimal("-0.25")
    assert services.settle(user_id=carol.pk, turn_id=turn_id, cost=Decimal("0.25")) == Decimal("-0.25")
    wallet = Wallet.objects.get(user=carol)
    assert (wallet.balance, wallet.held) == (Decimal("-0.25"), Decimal("0"))
    debit = LedgerEntry.objects.get(user=carol)
    assert (debit.kind, debit.amount, debit.balance_after) == ("debit", Decimal("-0.25"), Decimal("-0.25"))
    assert ledger_problems() == []


def test_settle_zero_cost_releases_without_entry(alice, price):
    turn_id = uuid.uuid4()
    services.hold(user_id=alice.pk, turn_id=turn_id, model=MODEL, prompt_tokens=10)
    services.settle(user_id=alice.pk, turn_id=turn_id, cost=Decimal("0"))
    assert not LedgerEntry.objects.filter(turn_id=turn_id).exists()
    assert not CreditHold.objects.filter(released_at__isnull=True).exists()


def test_database_refuses_a_second_debit_for_a_turn(alice):
    from django.db import IntegrityError, transaction

    wallet = Wallet.objects.get(user=alice)
    turn_id = uuid.uuid4()
    LedgerEntry.objects.create(wallet=wallet, user=alice, kind="debit", amount=Decimal("-1"),
                               balance_after=Decimal("9"), turn_id=turn_id)
    with pytest.raises(IntegrityError), transaction.atomic():
        LedgerEntry.objects.create(wallet=wallet, user=alice, kind="debit", amount=Decimal("-1"),
                                   balance_after=Decimal("8"), turn_id=turn_id)
    LedgerEntry.objects.filter(turn_id=turn_id).delete()


def test_ledger_problems_detects_a_tampered_balance(alice):
    Wallet.objects.filter(user=alice).update(balance=Decimal("11"))
    assert ledger_problems(user_ids=[alice.pk])
    Wallet.objects.filter(user=alice).update(balance=Decimal("10"))
    assert ledger_problems(user_ids=[alice.pk]) == []


@pytest.mark.django_db(transaction=True)
@pytest.mark.skipif(connection.vendor != "postgresql", reason="row locks need PostgreSQL")
def test_concurrent_holds_never_overdraw(make_user, price, settings):
    """Many threads take holds on one wallet at once: the sum held never exceeds the balance."""
    settings.PANTHEON_MAX_OUTPUT_TOKENS = 100
    settings.PANTHEON_MIN_OUTPUT_TOKENS = 100
    user = make_user("gina", "0.7")  # each hold: 10 prompt (0.01) + 100 out (0.2) -> 3 fit
    def attempt(_):
        try:
            services.hold(user_id=user.pk, turn_id=uuid.uuid4(), model=MODEL, prompt_tokens=10)
            return True
        except services.InsufficientCredits:
            return False

    assert sum(in_threads(attempt, 40, workers=12)) == 3
    summary = wallet_summary(user_id=user.pk)
    assert summary.available >= 0
    for turn_id in CreditHold.objects.values_list("turn_id", flat=True):
        services.settle(user_id=user.pk, turn_id=turn_id, cost=Decimal("0"))


@pytest.mark.django_db(transaction=True)
@pytest.mark.skipif(connection.vendor != "postgresql", reason="SQLite has one writer at a time")
def test_a_debit_that_waited_for_the_wallet_is_dated_after_the_entry_that_held_it(alice, price):
    """The ledger's time order is its lock order: a settlement that waited for the wallet's
    row lock dates its debit from when it had the lock, not from when its statement began."""
    turn_id = uuid.uuid4()
    services.hold(user_id=alice.pk, turn_id=turn_id, model=MODEL, prompt_tokens=10)
    started = threading.Event()

    def settle():
        started.set()
        try:
            return services.settle(user_id=alice.pk, turn_id=turn_id, cost=Decimal("0.25"))
        finally:
            connection.close()

    with ThreadPoolExecutor(1) as pool, transaction.atomic():
        Wallet.objects.select_for_update().get(user=alice)  # the settlement below waits for this
        settled = pool.submit(settle)
        started.wait()
        time.sleep(0.3)
        grant = services.grant(user_id=alice.pk, amount=Decimal("1"))
    assert settled.result() == Decimal("10.75")
    debit = LedgerEntry.objects.get(turn_id=turn_id, kind="debit")
    assert debit.created_at > grant.created_at and debit.balance_after == Decimal("10.75")
    assert ledger_problems() == []
