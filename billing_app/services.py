"""Every write of money happens here: grants, holds (the preflight) and settlement, and
the billing policy: how big a hold is, and what a turn that ended early costs.

Each write is synchronous and runs in one `transaction.atomic` with the wallet row locked
(`select_for_update`), so concurrent turns of one user serialise on that row. Called inside
a caller's `atomic` (the turn's preflight or close), it joins that transaction without a
savepoint, so the turn row and the money commit together. Async callers use `core.db.db_call`.
"""

from __future__ import annotations

import dataclasses
import uuid
from decimal import ROUND_FLOOR, Decimal

from django.conf import settings
from django.db import transaction
from django.db.models import Sum
from django.utils import timezone

from billing_app.models import CreditHold, LedgerEntry, ModelPrice, Wallet
from core.money import format_money, quantize_money
from llm_gateway import Usage
from llm_gateway.tokens import estimate_tokens

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
    with transaction.atomic(savepoint=False):
        wallet = _locked_wallet(user_id)
        return _append_entry(wallet, kind=LedgerEntry.Kind.GRANT, amount=amount, note=note)


@dataclasses.dataclass(frozen=True)
class HoldDecision:
    """What the preflight allows: the capped `max_tokens` and the hold taken (if any)."""

    max_tokens: int
    hold_id: uuid.UUID | None
    amount: Decimal


def tool_turn_prompt_tokens(prompt_tokens: int, *, rounds: int, tool_output_chars: int) -> int:
    """The prompt tokens a tool turn of at most `rounds` model calls can send in all: round k
    resends the prompt plus what the loop added before it, at most every tool result of the
    turn (`tool_output_chars` in all) and k earlier outputs."""
    if rounds <= 1:
        return prompt_tokens
    tool_output = estimate_tokens("x" * tool_output_chars)
    earlier_outputs = settings.PANTHEON_MAX_OUTPUT_TOKENS * rounds * (rounds - 1) // 2
    return rounds * (prompt_tokens + tool_output) + earlier_outputs


def hold(*, user_id: int, turn_id: uuid.UUID, model: str, prompt_tokens: int,
         max_tokens: int | None = None, rounds: int = 1, price: ModelPrice | None = None) -> HoldDecision:
    """The credit preflight: reserve the most this turn can cost, or refuse with 402.

    `prompt_tokens` is a conservative estimate of every prompt the turn sends (all tool
    rounds together); the hold covers it plus `rounds` x `max_tokens` output tokens, with
    `max_tokens` capped to what the wallet can still afford. The turn needs at least
    PANTHEON_MIN_OUTPUT_TOKENS, or what the client asked for if that is fewer.
    The hold counts against `available` until its turn settles (see `settle`): it has no
    clock of its own, so a long stream can never lose it; the turn's lease, which the sweep
    enforces, is its expiry. `price` saves the lookup when the caller has it.
    """
    price = price or get_price(model)
    cap = min(max_tokens or settings.PANTHEON_MAX_OUTPUT_TOKENS, settings.PANTHEON_MAX_OUTPUT_TOKENS)
    if not settings.PANTHEON_CREDIT_ENFORCEMENT:
        return HoldDecision(max_tokens=cap, hold_id=None, amount=Decimal("0"))
    minimum = min(settings.PANTHEON_MIN_OUTPUT_TOKENS, cap)

    # A refusal is raised after the block, not from inside it: an exception leaving an
    # atomic(savepoint=False) would doom the caller's whole transaction.
    refusal = ""
    with transaction.atomic(savepoint=False):
        wallet = _locked_wallet(user_id)
        held = wallet.holds.open().aggregate(total=Sum("amount"))["total"] or Decimal("0")
        available = wallet.balance - held

        def cost_of(output_tokens: int) -> Decimal:
            return compute_cost(prompt_tokens=prompt_tokens, completion_tokens=output_tokens * rounds, price=price)

        if price.completion_price_per_mtok == 0:
            granted = cap
        else:
            left = available - cost_of(0)
            affordable = int((max(left, Decimal(0)) * PER_MTOK / (price.completion_price_per_mtok * rounds))
                             .to_integral_value(ROUND_FLOOR))
            granted = min(cap, affordable)
        # Rounding half-up may push the total one unit over; step down until it fits.
        while granted > 0 and cost_of(granted) > available:
            granted -= 1
        if available <= 0:
            refusal = f"Your wallet has no available credits ({format_money(available)})."
        elif granted < minimum or cost_of(0) > available:
            refusal = (f"This turn needs {format_money(cost_of(minimum))} credits (its prompt and {minimum} "
                       f"output tokens); {format_money(available)} are available.")
        else:
            amount = cost_of(granted)
            held_row = CreditHold.objects.create(wallet=wallet, user_id=user_id, turn_id=turn_id, model=model,
                                                 amount=amount, max_tokens=granted)
    if refusal:
        raise InsufficientCredits(refusal)
    return HoldDecision(max_tokens=granted, hold_id=held_row.id, amount=amount)


def usage_to_bill(*, reported: Usage | None, text: str, prompt_estimate: int, output_cap: int,
                  prompt_processed: bool) -> Usage:
    """What a turn is billed for, however it ended (SPEC section 10):

    - the provider's own count whenever it reported one;
    - else an estimate of the prompt plus the text produced (`estimated`): a failed,
      cancelled or interrupted turn whose user received text is never free;
    - a turn that produced no text costs nothing, unless the provider was already working
      on it when it was cut off (`prompt_processed`: a client leaving mid-call), since the
      provider bills that prompt.

    Output is never billed beyond `output_cap`, the output tokens the hold was taken for:
    a provider that ignores `max_tokens` cannot take a wallet below zero.
    """
    if reported is not None:
        if reported.completion_tokens <= output_cap:
            return reported
        return Usage(prompt_tokens=reported.prompt_tokens, completion_tokens=output_cap,
                     estimated=reported.estimated)
    if not text and not prompt_processed:
        return Usage(prompt_tokens=0, completion_tokens=0)
    completion = min(estimate_tokens(text), output_cap)
    return Usage(prompt_tokens=prompt_estimate, completion_tokens=completion, estimated=True)


def settle(*, user_id: int, turn_id: uuid.UUID, cost: Decimal, note: str = "") -> Decimal:
    """Debit the actual cost of a turn and release its hold. Returns the new balance.

    Idempotent by turn id: a second call neither debits nor fails (and the ledger's unique
    constraint refuses a second debit whatever happens). Callers that store the turn call
    this inside their own `atomic` so both commit together.
    """
    if cost < 0:
        raise InvalidAmount("A cost cannot be negative.")
    with transaction.atomic(savepoint=False):
        wallet = _locked_wallet(user_id)
        CreditHold.objects.filter(turn_id=turn_id, released_at__isnull=True).update(released_at=timezone.now())
        already = LedgerEntry.objects.filter(turn_id=turn_id, kind=LedgerEntry.Kind.DEBIT).exists()
        if cost > 0 and not already:
            _append_entry(wallet, kind=LedgerEntry.Kind.DEBIT, amount=-cost, turn_id=turn_id, note=note)
        return wallet.balance


def release_holds_without_turn(*, live_turn_ids, created_before) -> int:
    """Release open holds older than `created_before` whose turn is not among
    `live_turn_ids` (a queryset of running turn ids): holds no settlement will ever release
    (taken by an older version, or by a caller that never made a turn)."""
    stale = CreditHold.objects.open().filter(created_at__lt=created_before).exclude(turn_id__in=live_turn_ids)
    return stale.update(released_at=timezone.now())
