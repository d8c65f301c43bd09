"""Every write of money happens here: grants, holds (the preflight) and settlement.

Each function is synchronous and runs in one `transaction.atomic` with the wallet row
locked (`select_for_update`), so concurrent turns of one user serialise on that row.
Async callers use `sync_to_async`.
"""

from __future__ import annotations

import dataclasses
import uuid
from datetime import timedelta
from decimal import ROUND_FLOOR, Decimal

from django.conf import settings
from django.db import transaction
from django.db.models import Sum
from django.utils import timezone

from billing_app.models import CreditHold, LedgerEntry, ModelPrice, Wallet
from core.money import quantize_money

PER_MTOK = Decimal(1_000_000)


class BillingError(Exception):
    code = "billing_error"


class InsufficientCredits(BillingError):
    code = "insufficient_credits"


class UnknownModel(BillingError):
    code = "unknown_model"


class InvalidAmount(BillingError):
    code = "invalid_amount"


def compute_cost(*, prompt_tokens: int, completion_tokens: int, price: ModelPrice) -> Decimal:
    """The one cost function (SPEC section 7): credits, rounded half-up to 6 places."""
    raw = (
        Decimal(prompt_tokens) * price.prompt_price_per_mtok
        + Decimal(completion_tokens) * price.completion_price_per_mtok
    ) / PER_MTOK
    return quantize_money(raw)


def get_price(model: str) -> ModelPrice:
    try:
        return ModelPrice.objects.get(model=model)
    except ModelPrice.DoesNotExist:
        raise UnknownModel(f"Model {model!r} is not in the price list.") from None


def set_price(*, model: str, prompt_per_mtok: Decimal, completion_per_mtok: Decimal) -> ModelPrice:
    if prompt_per_mtok < 0 or completion_per_mtok < 0:
        raise InvalidAmount("Prices cannot be negative.")
    price, _ = ModelPrice.objects.update_or_create(
        model=model,
        defaults={"prompt_price_per_mtok": prompt_per_mtok, "completion_price_per_mtok": completion_per_mtok},
    )
    return price


def _locked_wallet(user_id: int) -> Wallet:
    """The user's wallet row, locked until the surrounding transaction ends."""
    wallet = Wallet.objects.select_for_update().filter(user_id=user_id).first()
    if wallet is None:  # first grant or turn of this user: create it (a racing creator wins)
        Wallet.objects.get_or_create(user_id=user_id)
        wallet = Wallet.objects.select_for_update().get(user_id=user_id)
    return wallet


def _append_entry(wallet: Wallet, *, kind: str, amount: Decimal, note: str = "",
                  turn_id: uuid.UUID | None = None) -> LedgerEntry:
    # Balance and ledger change together, under the row lock: the ledger always sums to it.
    wallet.balance += amount
    wallet.save(update_fields=["balance", "updated_at"])
    return LedgerEntry.objects.create(
        wallet=wallet, user_id=wallet.user_id, kind=kind, amount=amount,
        balance_after=wallet.balance, turn_id=turn_id, note=note,
    )


def grant(*, user_id: int, amount: Decimal, note: str = "") -> LedgerEntry:
    """Add credits to a wallet (creating it if needed)."""
    amount = Decimal(amount)
    if not amount.is_finite() or amount <= 0:
        raise InvalidAmount("A grant must be a positive amount.")
    if quantize_money(amount) != amount:
        raise InvalidAmount("Amounts have at most 6 decimal places.")
    with transaction.atomic():
        wallet = _locked_wallet(user_id)
        return _append_entry(wallet, kind=LedgerEntry.Kind.GRANT, amount=amount, note=note)


@dataclasses.dataclass(frozen=True)
class HoldDecision:
    """What the preflight allows: the capped `max_tokens` and the hold taken (if any)."""

    max_tokens: int
    hold_id: uuid.UUID | None
    amount: Decimal


def hold(*, user_id: int, turn_id: uuid.UUID, model: str, prompt_tokens: int,
         max_tokens: int | None = None, rounds: int = 1) -> HoldDecision:
    """The credit preflight: reserve the most this turn can cost, or refuse with 402.

    `prompt_tokens` is a conservative estimate of every prompt the turn sends (all tool
    rounds together); the hold covers it plus `rounds` x `max_tokens` output tokens, with
    `max_tokens` capped to what the wallet can still afford.
    """
    price = get_price(model)
    cap = min(max_tokens or settings.PANTHEON_MAX_OUTPUT_TOKENS, settings.PANTHEON_MAX_OUTPUT_TOKENS)
    if not settings.PANTHEON_CREDIT_ENFORCEMENT:
        return HoldDecision(max_tokens=cap, hold_id=None, amount=Decimal("0"))

    with transaction.atomic():
        wallet = _locked_wallet(user_id)
        held = wallet.holds.open().aggregate(total=Sum("amount"))["total"] or Decimal("0")
        available = wallet.balance - held
        if available <= 0:
            raise InsufficientCredits("Your wallet has no available credits.")
        prompt_cost = compute_cost(prompt_tokens=prompt_tokens, completion_tokens=0, price=price)
        if price.completion_price_per_mtok == 0:
            affordable = cap
        else:
            left = available - prompt_cost
            per_token = price.completion_price_per_mtok * rounds
            affordable = int((left * PER_MTOK / per_token).to_integral_value(ROUND_FLOOR))
        granted = min(cap, max(affordable, 0))
        # Rounding half-up may push the total one unit over; step down until it fits.
        while granted > 0 and compute_cost(prompt_tokens=prompt_tokens, completion_tokens=granted * rounds,
                                            price=price) > available:
            granted -= 1
        if granted < settings.PANTHEON_MIN_OUTPUT_TOKENS or prompt_cost > available:
            raise InsufficientCredits(
                f"Available credits ({available}) do not cover this prompt and "
                f"{settings.PANTHEON_MIN_OUTPUT_TOKENS} output tokens."
            )
        amount = compute_cost(prompt_tokens=prompt_tokens, completion_tokens=granted * rounds, price=price)
        held_row = CreditHold.objects.create(
            wallet=wallet, user_id=user_id, turn_id=turn_id, model=model, amount=amount,
            max_tokens=granted,
            expires_at=timezone.now() + timedelta(seconds=settings.PANTHEON_HOLD_TTL_SECONDS),
        )
    return HoldDecision(max_tokens=granted, hold_id=held_row.id, amount=amount)


def settle(*, user_id: int, turn_id: uuid.UUID, cost: Decimal, note: str = "") -> Decimal:
    """Debit the actual cost of a turn and release its hold. Returns the new balance.

    Idempotent by turn id: a second call neither debits nor fails. Callers that store the
    turn call this inside their own `atomic` so both commit together.
    """
    if cost < 0:
        raise InvalidAmount("A cost cannot be negative.")
    with transaction.atomic():
        wallet = _locked_wallet(user_id)
        CreditHold.objects.filter(turn_id=turn_id, released_at__isnull=True).update(released_at=timezone.now())
        already = LedgerEntry.objects.filter(turn_id=turn_id, kind=LedgerEntry.Kind.DEBIT).exists()
        if cost > 0 and not already:
            _append_entry(wallet, kind=LedgerEntry.Kind.DEBIT, amount=-cost, turn_id=turn_id, note=note)
        return wallet.balance


def release_expired_holds(*, now=None) -> int:
    """Sweep: mark expired holds released. Expired holds already stop counting against
    `available`; this keeps the open-hold set small and visible in the admin."""
    now = now or timezone.now()
    return CreditHold.objects.filter(released_at__isnull=True, expires_at__lte=now).update(released_at=now)

