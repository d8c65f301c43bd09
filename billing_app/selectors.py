"""Reads of money state."""

from __future__ import annotations

import dataclasses
from decimal import Decimal

from django.conf import settings
from django.db.models import Sum

from billing_app.models import CreditHold, LedgerEntry, Wallet


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
