"""Reads of money state."""

from __future__ import annotations

import dataclasses
import datetime
import uuid
from decimal import Decimal

from django.conf import settings
from django.db.models import Case, DecimalField, OuterRef, QuerySet, Subquery, Sum, Value, When
from django.db.models.functions import Coalesce

from billing_app.models import MONEY, CreditHold, LedgerEntry, UsageRecord, Wallet
from core.money import quantize_money


@dataclasses.dataclass(frozen=True)
class WalletSummary:
    balance: Decimal
    held: Decimal
    available: Decimal
    enforcement: bool


def current_balance(*, user_id: int) -> Decimal:
    return Wallet.objects.filter(user_id=user_id).values_list("balance", flat=True).first() or Decimal("0")


def wallet_summary(*, user_id: int) -> WalletSummary:
    wallet = Wallet.objects.filter(user_id=user_id).first()
    balance, held = (wallet.balance, wallet.held) if wallet else (Decimal("0"), Decimal("0"))
    return WalletSummary(balance=balance, held=held, available=balance - held,
                         enforcement=settings.PANTHEON_CREDIT_ENFORCEMENT)


def ledger_problems(*, user_ids: list[int] | None = None, allow_open_holds: bool = True) -> list[str]:
    """The ledger invariant, as a list of violations (empty when all is well).

    - each wallet's balance equals the sum of its ledger entries, and its `held` the sum of
      its open holds;
    - the newest entry's `balance_after` equals the balance;
    - no hold stays open for a turn that was debited;
    - with `allow_open_holds=False`, no hold is open at all (use once every turn ended).
    """
    problems = []
    wallets = Wallet.objects.all()
    if user_ids is not None:
        wallets = wallets.filter(user_id__in=user_ids)
    for wallet in wallets:
        total = wallet.entries.aggregate(t=Sum("amount"))["t"] or Decimal("0")
        if total != wallet.balance:
            problems.append(f"wallet {wallet.pk}: balance {wallet.balance} != ledger sum {total}")
        # Entries are written under the wallet lock, so creation order is ledger order.
        last = wallet.entries.order_by("-created_at").first()
        if last and last.balance_after != wallet.balance:
            problems.append(f"wallet {wallet.pk}: newest balance_after {last.balance_after} != {wallet.balance}")
        open_holds = CreditHold.objects.filter(wallet=wallet, released_at__isnull=True)
        held = open_holds.aggregate(t=Sum("amount"))["t"] or Decimal("0")
        if held != wallet.held:
            problems.append(f"wallet {wallet.pk}: held {wallet.held} != open holds {held}")
        debited = LedgerEntry.objects.filter(wallet=wallet, kind=LedgerEntry.Kind.DEBIT).values("turn_id")
        for h in open_holds.filter(turn_id__in=debited):
            problems.append(f"hold {h.pk} still open after turn {h.turn_id} was debited")
        if not allow_open_holds:
            for h in open_holds:
                problems.append(f"hold {h.pk} for turn {h.turn_id} is still open")
    return problems


# --- what an API key spent (SPEC section 16) ---------------------------------------------

PERIODS = ("day", "week", "month", "total")


def period_start(period: str, now: datetime.datetime) -> datetime.datetime | None:
    """The start of the budget period holding `now`, in UTC: the calendar day, the ISO week
    (from Monday 00:00), the calendar month; None for `total` (since ever). An empty period
    (a key without a budget) is the day: what `spent_this_period` shows for it."""
    if period not in PERIODS and period != "":
        raise ValueError(f"Unknown budget period {period!r}.")
    if period == "total":
        return None
    day = now.astimezone(datetime.UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "week":
        return day - datetime.timedelta(days=day.weekday())
    if period == "month":
        return day.replace(day=1)
    return day


def key_spend(key_id: uuid.UUID, since: datetime.datetime | None) -> Decimal:
    """The credits the key's turns cost from `since` on (None: ever), by their usage records."""
    records = UsageRecord.objects.filter(api_key_id=key_id)
    if since is not None:
        records = records.filter(created_at__gte=since)
    return quantize_money(records.aggregate(total=Sum("cost"))["total"] or Decimal(0))


def key_spend_this_period(key, now: datetime.datetime) -> Decimal:
    """`spent_this_period` of one key: in its budget period, or since 00:00 UTC without a budget."""
    return key_spend(key.pk, period_start(key.budget_period if key.budget is not None else "", now))


def with_spend_this_period(keys: QuerySet, now: datetime.datetime) -> QuerySet:
    """ApiKey rows annotated with `spent_this_period` (as `key_spend_this_period`), in the
    same query: a correlated sum over the key's usage records from its period's start."""
    money = DecimalField(**MONEY)

    def spent_since(since: datetime.datetime | None):
        records = UsageRecord.objects.filter(api_key_id=OuterRef("pk"))
        if since is not None:
            records = records.filter(created_at__gte=since)
        total = records.order_by().values("api_key_id").annotate(total=Sum("cost")).values("total")
        return Coalesce(Subquery(total, output_field=money), Value(Decimal(0)), output_field=money)

    return keys.annotate(spent_this_period=Case(
        *[When(budget__isnull=False, budget_period=period, then=spent_since(period_start(period, now)))
          for period in ("week", "month", "total")],
        default=spent_since(period_start("day", now)), output_field=money))
