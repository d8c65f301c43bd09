"""Every write of money happens here: grants, holds (the preflight) and settlement, and
the billing policy: how big a hold is, and what a turn that ended early costs.

Each write is synchronous and runs in one transaction that changes the wallet row under
its row lock, so concurrent turns of one user serialise on that row only for the moment of
the write. `hold` and `settle` are plain SQL (core.sql) and join a caller's
`core.sql.transaction()` (the turn's preflight or close), so the turn row and the money
commit together; `grant` is the ORM. Async callers use `core.db.db_call`.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import uuid
from collections.abc import Callable, Sequence
from decimal import ROUND_FLOOR, Decimal
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import IntegrityError, connection, transaction
from django.db.models import F
from django.utils import timezone

from billing_app.models import BUILTIN_PROVIDERS, CreditHold, LedgerEntry, ModelPrice, Provider, Wallet
from core import sql
from core.money import format_money, quantize_money
from llm_gateway import Usage
from llm_gateway.tokens import estimate_tokens

PER_MTOK = Decimal(1_000_000)


class BillingError(Exception):
    code = "billing_error"


class InsufficientCredits(BillingError):
    """A 402: `available` credits (balance less holds) and, when it was sized, `needed` (the
    least this turn can cost: its prompt and the minimum output)."""

    code = "insufficient_credits"

    def __init__(self, message: str, *, available: Decimal | None = None, needed: Decimal | None = None) -> None:
        super().__init__(message)
        self.available, self.needed = available, needed


class KeyBudgetExceeded(InsufficientCredits):
    """A 402 of the API key's budget (SPEC section 16): the wallet could pay, the key may not.
    `available` is what the budget still allows."""

    code = "key_budget_exceeded"


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


_UNSET: Any = object()  # "leave the row's value as it is", where None is a value (the configured provider)


def set_price(*, model: str, prompt_per_mtok: Decimal, completion_per_mtok: Decimal,
              provider: Provider | str | None = _UNSET, upstream_model: str | None = None,
              fallbacks: Sequence[str] | None = None) -> ModelPrice:
    """Create or update a catalogue model (SPEC sections 7 and 15). The route options that are
    not given keep the row's values: `provider` is a Provider, its name, or None / "default" /
    a built-in name for the configured provider; `upstream_model` "" means the model's own
    name; `fallbacks` [] means none. Raises InvalidAmount for a negative price and
    ValidationError for an unknown provider or a route the catalogue refuses."""
    if prompt_per_mtok < 0 or completion_per_mtok < 0:
        raise InvalidAmount("Prices cannot be negative.")
    defaults: dict[str, Any] = {"prompt_price_per_mtok": prompt_per_mtok,
                                "completion_price_per_mtok": completion_per_mtok}
    if isinstance(provider, str):
        if provider in BUILTIN_PROVIDERS or provider == "default":  # names of the configured provider
            provider = None
        else:
            row = Provider.objects.filter(name=provider).first()
            if row is None:
                rows = Provider.objects.values_list("name", flat=True)
                known = ", ".join(["default, openrouter or fake (the configured one)", *rows])
                raise ValidationError({"provider": f"No provider {provider!r}. Known: {known}."})
            provider = row
    if provider is not _UNSET:
        defaults["provider"] = provider
    if upstream_model is not None:
        defaults["upstream_model"] = upstream_model
    if fallbacks is not None:
        defaults["fallbacks"] = list(fallbacks)
    route = set(defaults) - {"prompt_price_per_mtok", "completion_price_per_mtok"}
    if route:
        # Validate only what changes: a price-only update behaves as it always did, even on a
        # row whose fallbacks name a model since removed.
        candidate = ModelPrice(model=model, **defaults)
        candidate.clean_fields(exclude=[f.name for f in ModelPrice._meta.concrete_fields if f.name not in route])
        if "fallbacks" in route:
            candidate.clean()
    price, _ = ModelPrice.objects.update_or_create(model=model, defaults=defaults)
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


def adjust_turn(*, user_id: int, turn_id: uuid.UUID, amount: Decimal, note: str) -> LedgerEntry:
    """The one correction of a settled turn's debit (SPEC section 13): `amount` credits back
    (negative takes more), as an `adjustment` entry carrying the turn id. At most one per
    turn (a unique constraint); call it in the transaction that corrects the turn, so both
    commit together. The balance may go below zero: what was served is owed."""
    amount = Decimal(amount)
    if not amount.is_finite() or amount == 0 or quantize_money(amount) != amount:
        raise InvalidAmount("An adjustment is a nonzero amount with at most 6 decimal places.")
    with transaction.atomic(savepoint=False):
        wallet = _locked_wallet(user_id)
        return _append_entry(wallet, kind=LedgerEntry.Kind.ADJUSTMENT, amount=amount, note=note[:255],
                             turn_id=turn_id)


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


# The SQL of the hot path (core.sql): written once for PostgreSQL and SQLite.
_WALLET = sql.table(Wallet)
_HOLD = sql.table(CreditHold)
_LEDGER = sql.table(LedgerEntry)
# Money parameters are CAST (SQLite compares an expression with a text parameter as text)
# and sums ROUNDed to 6 places (exact on PostgreSQL; SQLite keeps decimals as floats).
_RESERVE = (f"UPDATE {_WALLET} SET held = ROUND(held + CAST(%(amount)s AS NUMERIC), 6), updated_at = %(now)s "
            f"WHERE user_id = %(user)s AND ROUND(balance - held, 6) >= CAST(%(amount)s AS NUMERIC) RETURNING id")
_SNAPSHOT = f"SELECT balance, held FROM {_WALLET} WHERE user_id = %s"
# PostgreSQL: the reservation and the hold row as two parts of one statement that waits
# for no answer (core.sql.write_together, with the caller's writes). The hold's wallet is
# the reserved row's id: without the reservation (a concurrent turn took the credits since
# they were read) it is NULL, which the column refuses, so the whole statement fails in the
# server and nothing of it commits (see `refused_in_flight`).
RESERVATION = "reserved"
_HOLD_COLUMNS = ("id", "user_id", "turn_id", "model", "amount", "max_tokens", "created_at", "released_at")
_RESERVE_IN_FLIGHT = (f"UPDATE {_WALLET} SET held = ROUND(held + CAST(%s AS NUMERIC), 6), updated_at = %s "
                      f"WHERE user_id = %s AND ROUND(balance - held, 6) >= CAST(%s AS NUMERIC) RETURNING id")
_HOLD_IN_FLIGHT = (f"INSERT INTO {_HOLD} "
                   f"({', '.join(sql.column(CreditHold, name) for name in ('wallet', *_HOLD_COLUMNS))}) "
                   f"VALUES ((SELECT id FROM {RESERVATION}), {', '.join(['%s'] * len(_HOLD_COLUMNS))})")


def wallet_snapshot(user_id: int, *, lock: bool = False) -> tuple[Decimal, Decimal] | None:
    """(balance, held) of the user's wallet, or None if there is none; `lock` takes the row
    lock until the transaction ends (PostgreSQL; SQLite's writers are serialised anyway)."""
    query = _SNAPSHOT + (" FOR UPDATE" if lock and connection.features.has_select_for_update else "")
    row = sql.fetch_one(query, [user_id])
    return None if row is None else (sql.as_money(row[0]), sql.as_money(row[1]))


def _size_hold(available: Decimal, *, price: ModelPrice, prompt_tokens: int, cap: int, minimum: int,
               rounds: int) -> tuple[int, Decimal] | InsufficientCredits:
    """(output tokens granted, amount to hold), or the refusal."""
    def cost_of(output_tokens: int) -> Decimal:
        return compute_cost(prompt_tokens=prompt_tokens, completion_tokens=output_tokens * rounds, price=price)

    if available <= 0:
        return InsufficientCredits(f"Your wallet has no available credits ({format_money(available)}).",
                                   available=available, needed=cost_of(minimum))
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
    if granted < minimum or cost_of(0) > available:
        return InsufficientCredits(f"This turn needs {format_money(cost_of(minimum))} credits (its prompt and "
                                   f"{minimum} output tokens); {format_money(available)} are available.",
                                   available=available, needed=cost_of(minimum))
    return granted, cost_of(granted)


def refused_in_flight(error: IntegrityError) -> bool:
    """Whether `error` is a reservation sent in one flight (`hold(in_one_flight=True)`)
    finding too few credits: its transaction was rolled back, and the turn may be tried
    again the careful way (`in_one_flight=False`)."""
    diag = getattr(error.__cause__, "diag", None)
    return (getattr(error.__cause__, "sqlstate", None) == "23502" and diag is not None
            and diag.table_name == CreditHold._meta.db_table
            and diag.column_name == CreditHold._meta.get_field("wallet").column)


def hold(*, user_id: int, turn_id: uuid.UUID, model: str, prompt_tokens: int,
         max_tokens: int | None = None, rounds: int = 1, price: ModelPrice | None = None,
         wallet: tuple[Decimal, Decimal] | None = None, budget_left: Decimal | None = None,
         in_one_flight: bool = False,
         together: Callable[[HoldDecision, str | None], Sequence[sql.Write | None]] | None = None,
         ) -> HoldDecision:
    """The credit preflight: reserve the most this turn can cost, or refuse with 402.

    `prompt_tokens` is a conservative estimate of every prompt the turn sends (all tool
    rounds together); the hold covers it plus `rounds` x `max_tokens` output tokens, with
    `max_tokens` capped to what the wallet can still afford. The turn needs at least
    PANTHEON_MIN_OUTPUT_TOKENS, or what the client asked for if that is fewer.

    The reservation is one conditional UPDATE (`held += amount` where `balance - held >=
    amount`), sized from `wallet` (a `(balance, held)` the caller already read) or a fresh
    read; if a concurrent turn took the credits meanwhile, it is sized again under the row
    lock. So the row is locked only from that UPDATE to the commit, never across a read.
    The hold counts against `available` until its turn settles (see `settle`): it has no
    clock of its own; the turn's lease, which the sweep enforces, is its expiry.

    `budget_left`: what the API key's budget still allows (SPEC section 16; the caller holds
    the key's row lock, so it stays true until the commit): the hold is sized to the smaller
    of it and the wallet's available credits. Refused by the budget alone (the wallet could
    pay): KeyBudgetExceeded; by both: InsufficientCredits.

    `in_one_flight` (PostgreSQL, with `wallet`): the reservation and the hold row are one
    statement that waits for no answer, so the caller's transaction makes one round trip
    with its COMMIT, and the wallet row is locked only while the server runs it. If the
    credits were taken meanwhile, the transaction fails with an IntegrityError for which
    `refused_in_flight` is true, and the caller tries again without it.

    `together(decision, reservation)`: the caller's writes that need the decision (the
    turn's row and its question): they go out with the hold, in the same statement in one
    flight (a statement is a transaction of its own: the caller needs none for it), else
    after the hold in its transaction. `reservation` is the name of the reservation's part
    of that statement (None when the hold went before them): a write that takes a row lock
    joins it (`sql.updating(..., after=reservation)`), so it takes that lock after the
    wallet's, as everywhere else.
    """
    price = price or get_price(model)
    cap = min(max_tokens or settings.PANTHEON_MAX_OUTPUT_TOKENS, settings.PANTHEON_MAX_OUTPUT_TOKENS)
    if not settings.PANTHEON_CREDIT_ENFORCEMENT:
        decision = HoldDecision(max_tokens=cap, hold_id=None, amount=Decimal("0"))
        with sql.transaction():
            sql.write_together(*(together(decision, None) if together is not None else ()))
        return decision
    minimum = min(settings.PANTHEON_MIN_OUTPUT_TOKENS, cap)
    now = timezone.now()

    def size(snapshot: tuple[Decimal, Decimal] | None) -> tuple[int, Decimal]:
        """(output tokens granted, amount to hold) from a (balance, held), or the refusal raised."""
        balance, held = snapshot or (Decimal(0), Decimal(0))
        available = balance - held
        limit = available if budget_left is None else min(available, budget_left)
        sized = _size_hold(limit, price=price, prompt_tokens=prompt_tokens, cap=cap, minimum=minimum, rounds=rounds)
        if isinstance(sized, InsufficientCredits):
            if limit < available and not isinstance(_size_hold(
                    available, price=price, prompt_tokens=prompt_tokens, cap=cap, minimum=minimum,
                    rounds=rounds), InsufficientCredits):
                raise KeyBudgetExceeded(
                    f"This key's budget allows {format_money(limit)} more credits; this turn needs "
                    f"{format_money(sized.needed)}.", available=limit, needed=sized.needed)
            raise sized
        return sized

    reservation = {"now": sql.value(Wallet, "updated_at", now), "user": user_id}
    hold_id = uuid.uuid4()
    row = {"id": hold_id, "user_id": user_id, "turn_id": turn_id, "model": model, "created_at": now,
           "released_at": None}
    if in_one_flight and wallet is not None and sql.vendor() == "postgresql":
        granted, amount = size(wallet)
        decision = HoldDecision(max_tokens=granted, hold_id=hold_id, amount=amount)
        values = {**row, "amount": amount, "max_tokens": granted}
        sql.write_together(
            sql.Write(_RESERVE_IN_FLIGHT, [amount, reservation["now"], user_id, amount], name=RESERVATION),
            sql.Write(_HOLD_IN_FLIGHT, [sql.value(CreditHold, name, values[name]) for name in _HOLD_COLUMNS]),
            *(together(decision, RESERVATION) if together is not None else ()))
        return decision
    with sql.transaction():
        snapshot = wallet if wallet is not None else wallet_snapshot(user_id)
        for locked in (False, True):
            if locked:  # a concurrent turn took credits since the snapshot: size again, locked
                snapshot = wallet_snapshot(user_id, lock=True)
            granted, amount = size(snapshot)
            reserved = sql.fetch_one(_RESERVE, {**reservation, "amount": amount})
            if reserved is not None:
                sql.insert(CreditHold, [{**row, "wallet_id": reserved[0], "amount": amount, "max_tokens": granted}])
                decision = HoldDecision(max_tokens=granted, hold_id=hold_id, amount=amount)
                sql.write_together(*(together(decision, None) if together is not None else ()))
                return decision
    raise InsufficientCredits("Your wallet has no available credits.")  # only float fuzz on SQLite


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


# Lock order, here and in release_holds_without_turn: the hold rows, then the wallet row.
_RELEASE = (f"UPDATE {_HOLD} SET released_at = %(now)s WHERE turn_id = %(turn)s AND released_at IS NULL "
            f"RETURNING amount")
_NOT_DEBITED = f"NOT EXISTS (SELECT 1 FROM {_LEDGER} WHERE turn_id = %(turn)s AND kind = 'debit')"
# SQLite, one statement after another (no UPDATE in a WITH there; nothing waits on a
# network, and one writer at a time keeps the caller's time in the ledger's order).
_CHARGE = (f"UPDATE {_WALLET} SET balance = ROUND(balance - CASE WHEN {_NOT_DEBITED} THEN CAST(%(cost)s AS NUMERIC) "
           f"ELSE 0 END, 6), held = ROUND(held - CAST(%(released)s AS NUMERIC), 6), updated_at = %(now)s "
           f"WHERE user_id = %(user)s RETURNING balance")
_DEBIT_COLUMNS = "(id, wallet_id, user_id, kind, amount, balance_after, turn_id, note, created_at)"
_DEBIT = (f"INSERT INTO {_LEDGER} {_DEBIT_COLUMNS} "
          f"SELECT %(id)s, id, user_id, 'debit', %(amount)s, balance, %(turn)s, %(note)s, %(now)s FROM {_WALLET} "
          f"WHERE user_id = %(user)s AND {_NOT_DEBITED}")
# PostgreSQL: the whole settlement in one statement, which waits for no answer.
# - The wallet is made if there is none (a user never granted anything, credit enforcement
#   off: no hold either, so `held` starts at 0), else charged unless the turn was debited
#   already, and its `held` goes down by exactly the amounts `released` released.
# - The debit records the charged row's balance, at the clock's time once that row is
#   locked (it reads the upsert's RETURNING, so it runs after it): the ledger's time order
#   is its lock order. The statement's own time, taken before the lock, could sort before a
#   concurrent entry that committed first.
# - Every EXISTS sees the statement's one snapshot, so the charge and the debit agree; the
#   ledger's one debit per turn (a unique index) stands behind them.
# - PostgreSQL does not promise the order of the hold rows' and the wallet row's locks here;
#   either is free of deadlocks: the only other writer of an existing hold,
#   release_holds_without_turn, takes holds whose turn is not running, and this turn's is
#   (its row locked by the close).
# - The caller's writes that come after the charge (`settle_later(together=...)`) are parts
#   of it too; one that takes a row lock joins CHARGED, so it takes it after the wallet's.
CHARGED = "charged"
_SETTLE_NAMED = (f"WITH released AS ({_RELEASE}), "
                 f"{CHARGED} AS (INSERT INTO {_WALLET} AS w (user_id, balance, held, created_at, updated_at) "
                 f"VALUES (%(user)s, ROUND(0 - CAST(%(cost)s AS NUMERIC), 6), 0, %(now)s, %(now)s) "
                 f"ON CONFLICT (user_id) DO UPDATE SET balance = ROUND(w.balance - CASE WHEN {_NOT_DEBITED} "
                 f"THEN CAST(%(cost)s AS NUMERIC) ELSE 0 END, 6), "
                 f"held = ROUND(w.held - (SELECT COALESCE(SUM(amount), 0) FROM released), 6), updated_at = %(now)s "
                 f"RETURNING w.id, w.user_id, w.balance), "
                 f"debit AS (INSERT INTO {_LEDGER} {_DEBIT_COLUMNS} "
                 f"SELECT %(id)s, id, user_id, 'debit', %(amount)s, balance, %(turn)s, %(note)s, CLOCK_TIMESTAMP() "
                 f"FROM {CHARGED} WHERE CAST(%(cost)s AS NUMERIC) > 0 AND {_NOT_DEBITED})")
# Positional, as the caller's writes are: its parameters' names in the order the text has them.
_SETTLE_NAMES = tuple(re.findall(r"%\((\w+)\)s", _SETTLE_NAMED))
_SETTLE_PARTS = re.sub(r"%\(\w+\)s", "%s", _SETTLE_NAMED)


@functools.cache
def _settle_sql(together: tuple[str, ...]) -> str:
    return (_SETTLE_PARTS + "".join(f", after_charge{i} AS ({part})" for i, part in enumerate(together))
            + f" SELECT balance FROM {CHARGED}")


def settle(*, user_id: int, turn_id: uuid.UUID, cost: Decimal, note: str = "") -> Decimal:
    """Debit the actual cost of a turn and release its hold. Returns the new balance.

    Idempotent by turn id: a second call neither debits nor fails (and the ledger's unique
    constraint refuses a second debit whatever happens). `held` goes down by exactly what
    this call released, and balance and ledger change together under the row lock.
    """
    with sql.transaction():
        balance = settle_later(user_id=user_id, turn_id=turn_id, cost=cost, note=note)
    return balance()


def settle_later(*, user_id: int, turn_id: uuid.UUID, cost: Decimal, note: str = "",
                 together: Sequence[sql.Write | None] = ()) -> Callable[[], Decimal]:
    """settle(), inside the caller's `core.sql.transaction()` (so the turn and its payment
    commit together), waiting for no answer: the returned function gives the new balance,
    to be called once the transaction has committed. On PostgreSQL its statements go out
    with the caller's COMMIT, in one round trip.

    `together`: the caller's writes that come after the charge (the session's leaf), in the
    same statement on PostgreSQL; one that takes a row lock joins it
    (`sql.updating(..., after=CHARGED)`). Elsewhere they follow it, in order."""
    if cost < 0:
        raise InvalidAmount("A cost cannot be negative.")
    now = timezone.now()
    params = {"turn": sql.value(LedgerEntry, "turn_id", turn_id), "cost": cost,
              "now": sql.value(LedgerEntry, "created_at", now), "user": user_id,
              "id": sql.value(LedgerEntry, "id", uuid.uuid4()), "amount": -cost, "note": note[:255]}
    writes = [write for write in together if write is not None]
    if sql.vendor() == "postgresql":  # one statement (see _SETTLE_PARTS)
        charged = sql.fetch_later(_settle_sql(tuple(write.sql for write in writes)),
                                  [params[name] for name in _SETTLE_NAMES]
                                  + [param for write in writes for param in write.params])
    else:  # SQLite has no UPDATE in a WITH; nothing there waits on a network
        with sql.transaction():
            # A user who was never granted anything (credit enforcement off) has no wallet
            # yet: made here, so that the charge always finds one.
            sql.insert(Wallet, [{"user_id": user_id, "balance": Decimal(0), "held": Decimal(0), "created_at": now,
                                 "updated_at": now}], ignore_conflicts=True)
            params["released"] = sum((sql.as_money(row[0]) for row in sql.fetch_all(_RELEASE, params)),
                                     Decimal(0))
            charged = sql.fetch_later(_CHARGE, params)
            if cost > 0:
                sql.execute(_DEBIT, params, count=False)
            sql.write_together(*writes)

    def balance() -> Decimal:
        row = charged()
        assert row is not None, "the wallet was made above"
        return sql.as_money(row[0])
    return balance


def release_holds_without_turn(*, live_turn_ids, created_before) -> int:
    """Release open holds older than `created_before` whose turn is not among
    `live_turn_ids` (a queryset of running turn ids): holds no settlement will ever release
    (taken by an older version, or by a caller that never made a turn)."""
    stale = list(CreditHold.objects.open().filter(created_at__lt=created_before)
                 .exclude(turn_id__in=live_turn_ids).values_list("id", flat=True)[:1000])
    released = 0
    for hold_id in stale:
        with transaction.atomic():
            # Released only if still open; `held` follows exactly what was released.
            row = sql.fetch_one(f"UPDATE {_HOLD} SET released_at = %s WHERE id = %s AND released_at IS NULL "
                                f"RETURNING wallet_id, amount", [sql.value(CreditHold, "released_at", timezone.now()),
                                                                 sql.value(CreditHold, "id", hold_id)])
            if row is not None:
                Wallet.objects.filter(pk=row[0]).update(held=F("held") - sql.as_money(row[1]))
                released += 1
    return released
