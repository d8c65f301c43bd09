"""Limits per API key and per user (SPEC section 16), admitted in the preflight's transaction.

Exact under any concurrency and across processes, the way the wallet's hold is: the counts
are read from the turns themselves (each admitted turn is a `running` row from its
preflight's commit on, then a closed one with its real cost and tokens), under a row lock
that serialises the preflights of one key (the key's row) or of one user (the wallet's row),
taken before the counts are read and held to the commit that makes the turn. So whatever
two requests see, the second sees the first's turn, and nothing is ever counted twice or
for a request that was refused (it rolled back: no turn, no hold, no count).

    rpm           turns of the key started in the last 60 s
    max_parallel  turns of the key `running` now
    tpm           tokens of the key's turns closed in the last 60 s (their real counts)
                  + the reservations of its running turns (prompt estimate + every output
                  token the hold allows) + this turn's: refused, not shrunk, if over
    budget        the key's turns' costs in the period (closed turns, reconciliation
                  included) + the holds of its running turns: the hold of this turn is sized
                  to what is left (`billing_app.services.hold(budget_left=...)`)
    user rpm / max_parallel   PANTHEON_USER_RPM / PANTHEON_USER_MAX_PARALLEL, the same over
                  every turn of the user, whatever key or login made it

A key without limits (and no user limits) costs no statement; one with limits costs one
round trip (the lock and the counts, pipelined). Counters are the database's: a limit is
never multiplied by the number of processes. Redis (`PANTHEON_REDIS_URL`) is not needed
for them.

Turns older than `_horizon()` (the longest a turn can run, plus the sweep's slack) are not
looked at: a turn still `running` past it is one whose process died and that the sweep is
about to close.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import uuid
from datetime import datetime, timedelta
from decimal import Decimal

from django.conf import settings
from django.db import connection

from accounts.models import ApiKey
from billing_app.models import CreditHold, Wallet
from billing_app.selectors import period_start
from core import sql
from sessions_app.models import Turn

WINDOW = timedelta(seconds=60)


@dataclasses.dataclass(frozen=True)
class KeyLimits:
    """An API key's limits, as the preflight read them with the key."""

    id: uuid.UUID
    rpm: int | None = None
    tpm: int | None = None
    max_parallel: int | None = None
    budget: Decimal | None = None
    budget_period: str = ""
    allowed_models: tuple[str, ...] | None = None

    @property
    def counts_turns(self) -> bool:
        """Whether admitting a turn needs the key's counts."""
        return any(value is not None for value in (self.rpm, self.tpm, self.max_parallel, self.budget))

    def allows(self, model: str) -> bool:
        return self.allowed_models is None or model in self.allowed_models


class LimitRefused(Exception):
    """A limit refuses the turn. `code`: `rate_limited` (429, `retry_after` seconds) or
    `model_not_allowed` (403); `headers` go on the answer."""

    def __init__(self, code: str, detail: str, *, retry_after: int | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.code, self.detail, self.retry_after = code, detail, retry_after
        self.headers = dict(headers or {})
        if retry_after is not None:
            self.headers["Retry-After"] = str(retry_after)


def user_limits() -> tuple[int | None, int | None]:
    return settings.PANTHEON_USER_RPM, settings.PANTHEON_USER_MAX_PARALLEL


def _horizon(now: datetime) -> datetime:
    lease = settings.PANTHEON_TURN_LEASE_SECONDS
    return now - timedelta(seconds=settings.PANTHEON_MAX_TURN_SECONDS + 3 * lease) - WINDOW


@functools.cache
def _lock_sql(what: str, vendor: str) -> str:
    table, column = (sql.table(ApiKey), "id") if what == "key" else (sql.table(Wallet), "user_id")
    query = f"SELECT 1 FROM {table} WHERE {column} = %s"
    return query + (" FOR UPDATE" if connection.features.has_select_for_update else "")


@functools.cache
def _counts_sql(owner: str, vendor: str, since_period: bool = False) -> str:
    """Counts of one key's (or user's) turns: running, started in the window and the first
    of those, tokens (closed in the window, reserved by the running), the first closed in
    the window; for a key also its spend (since the period's start, `since_period`) and its
    running holds. (No `%(period)s IS NULL` test: a parameter bound on the server needs a
    type, and a NULL alone has none.)"""
    turn, hold = sql.table(Turn), sql.table(CreditHold)
    owner_column = "api_key_id" if owner == "key" else "user_id"
    columns = (
        "COALESCE(SUM(CASE WHEN t.status = 'running' THEN 1 ELSE 0 END), 0), "
        "COALESCE(SUM(CASE WHEN t.created_at > %(minute)s THEN 1 ELSE 0 END), 0), "
        "MIN(CASE WHEN t.created_at > %(minute)s THEN t.created_at END), "
        "COALESCE(SUM(CASE WHEN t.status = 'running' "
        "THEN t.prompt_tokens + t.max_tokens * (CASE WHEN t.tools_enabled THEN %(rounds)s ELSE 1 END) "
        "WHEN t.finished_at > %(minute)s THEN t.prompt_tokens + t.completion_tokens ELSE 0 END), 0), "
        "MIN(CASE WHEN t.status <> 'running' AND t.finished_at > %(minute)s THEN t.finished_at END)")
    if owner == "key":
        columns += (
            f", (SELECT COALESCE(SUM(s.cost), 0) FROM {turn} s WHERE s.api_key_id = %(owner)s "
            f"AND s.status <> 'running'{' AND s.finished_at >= %(period)s' if since_period else ''}), "
            f"(SELECT COALESCE(SUM(h.amount), 0) FROM {hold} h JOIN {turn} r ON r.id = h.turn_id "
            f"WHERE r.api_key_id = %(owner)s AND r.status = 'running' AND h.released_at IS NULL)")
    return (f"SELECT {columns} FROM {turn} t WHERE t.{owner_column} = %(owner)s "
            f"AND t.created_at > %(horizon)s")


@dataclasses.dataclass(frozen=True)
class Counts:
    running: int
    started: int  # in the last 60 s
    first_started: datetime | None
    tokens: int  # closed in the last 60 s, plus the running turns' reservations
    first_closed: datetime | None
    spent: Decimal = Decimal(0)  # a key's, in its budget period
    held: Decimal = Decimal(0)  # a key's running turns' holds


def _read(owner: str, owner_id: object, now: datetime, *, period: datetime | None = None) -> Counts:
    lock = (_lock_sql(owner, sql.vendor()), [owner_id])
    params = {"owner": owner_id, "minute": sql.value(Turn, "created_at", now - WINDOW),
              "horizon": sql.value(Turn, "created_at", _horizon(now)),
              "rounds": settings.PANTHEON_MAX_TOOL_ROUNDS + 1,
              "period": sql.value(Turn, "finished_at", period)}
    _, rows = sql.fetch_together([lock, (_counts_sql(owner, sql.vendor(), period is not None), params)])
    row = rows[0]
    return Counts(running=int(row[0]), started=int(row[1]), first_started=sql.as_datetime(row[2]),
                  tokens=int(row[3]), first_closed=sql.as_datetime(row[4]),
                  spent=sql.as_money(row[5]) if owner == "key" else Decimal(0),
                  held=sql.as_money(row[6]) if owner == "key" else Decimal(0))


def _seconds_until(moment: datetime | None, now: datetime) -> int:
    """Whole seconds (at least 1) until `moment` leaves the 60-s window."""
    if moment is None:
        return 1
    return max(1, math.ceil((moment + WINDOW - now).total_seconds()))


@dataclasses.dataclass
class Admission:
    """What the preflight learnt from the counts: the budget left for the hold, and what
    the tpm check still needs once the hold has fixed `max_tokens`."""

    key: KeyLimits | None
    now: datetime
    key_counts: Counts | None = None
    budget_left: Decimal | None = None
    headers: dict[str, str] = dataclasses.field(default_factory=dict)

    def admit_tokens(self, reservation: int) -> None:
        """The tpm check, with this turn's reservation (prompt estimate + every output token
        it may use). Raises LimitRefused; adds the token headers."""
        key, counts = self.key, self.key_counts
        if key is None or key.tpm is None or counts is None:
            return
        used = counts.tokens + reservation
        if used > key.tpm:
            # Waiting on running turns only (the window is empty of closed ones): a short guess.
            retry = _seconds_until(counts.first_closed, self.now) if counts.first_closed else 1
            raise LimitRefused("rate_limited", f"This key allows {key.tpm} tokens per minute; this turn may use "
                                               f"{reservation} and {counts.tokens} are counted or reserved.",
                               retry_after=retry, headers={**self.headers, **_token_headers(
                                   key.tpm, counts.tokens, counts.first_closed, self.now)})
        self.headers.update(_token_headers(key.tpm, used, counts.first_closed or self.now, self.now))


def _request_headers(limit: int, used: int, first: datetime | None, now: datetime) -> dict[str, str]:
    reset = 0 if first is None else _seconds_until(first, now)
    return {"x-ratelimit-limit-requests": str(limit), "x-ratelimit-remaining-requests": str(max(limit - used, 0)),
            "x-ratelimit-reset-requests": f"{reset}s"}


def _token_headers(limit: int, used: int, first: datetime | None, now: datetime) -> dict[str, str]:
    reset = 0 if first is None else _seconds_until(first, now)
    return {"x-ratelimit-limit-tokens": str(limit), "x-ratelimit-remaining-tokens": str(max(limit - used, 0)),
            "x-ratelimit-reset-tokens": f"{reset}s"}


def admit(*, user_id: int, key: KeyLimits | None, now: datetime) -> Admission:
    """The request and parallel checks of the user and the key, and the key's budget left;
    call it in the preflight's transaction before the hold (its row locks last to the
    commit). Raises LimitRefused."""
    admission = Admission(key=key, now=now)
    user_rpm, user_parallel = user_limits()
    if user_rpm is not None or user_parallel is not None:
        counts = _read("user", user_id, now)
        if user_parallel is not None and counts.running >= user_parallel:
            raise LimitRefused("rate_limited", f"You may have {user_parallel} turns running at once.", retry_after=1)
        if user_rpm is not None and counts.started >= user_rpm:
            raise LimitRefused("rate_limited", f"You may start {user_rpm} turns per minute.",
                               retry_after=_seconds_until(counts.first_started, now))
    if key is None or not key.counts_turns:
        return admission
    period = period_start(key.budget_period, now) if key.budget is not None else None
    counts = admission.key_counts = _read("key", sql.value(Turn, "api_key", key.id), now, period=period)
    if key.rpm is not None:
        admission.headers.update(_request_headers(key.rpm, counts.started + 1, counts.first_started or now, now))
        if counts.started >= key.rpm:
            raise LimitRefused("rate_limited", f"This key may start {key.rpm} turns per minute.",
                               retry_after=_seconds_until(counts.first_started, now),
                               headers=_request_headers(key.rpm, counts.started, counts.first_started, now))
    if key.max_parallel is not None and counts.running >= key.max_parallel:
        raise LimitRefused("rate_limited", f"This key may have {key.max_parallel} turns running at once.",
                           retry_after=1, headers=admission.headers)
    if key.budget is not None:
        admission.budget_left = max(key.budget - counts.spent - counts.held, Decimal(0))
    return admission
