"""The life of a turn, in the database. Every front door (the plain and the streaming turn
endpoint) goes through these, and nothing here knows of HTTP:

    begin_turn()          the preflight, one transaction: hold, the `running` turn row with
                          its lease, the user message
    renew_turns()         while the model calls run: one UPDATE extending the leases (and so
                          the holds) of a process's running turns and saving their partial
                          answers (renew_turn(): one turn's)
    close_turn()          however the turn ends: the one close-time transaction (turn,
                          messages, usage, LLM events, debit, hold release); idempotent
    sweep_lapsed_turns()  closes turns whose lease lapsed (their process died) as
                          `interrupted`, through close_turn()

All are sync; async callers use `core.db.db_call` (sessions_app.live_turn does). The hot
statements are plain SQL (core.sql), PostgreSQL's pipelined: a preflight is three round
trips, a checkpoint one, a close one transaction of four, whatever the history length.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import logging
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import DataError, IntegrityError, connection
from django.db.models import Model
from django.utils import timezone

from accounts.authentication import LAST_USED_RESOLUTION
from accounts.models import ApiKey
from billing_app import catalogue, selectors
from billing_app import services as billing
from billing_app.models import LedgerEntry, ModelPrice, Provider, UsageRecord, Wallet
from core import sql
from core.money import format_money
from core.text import clean_text
from files_app.services import FILE_READ_TOOL, ready_files_for
from files_app.tools import TOOL_OUTPUT_BUDGET_CHARS
from llm_gateway import CallRecord, ChatMessage, GatewayError, ToolCall, Usage
from llm_gateway.routing import Candidate
from llm_gateway.tokens import (
    MESSAGE_OVERHEAD_TOKENS,
    REPLY_PRIMING_TOKENS,
    estimate_prompt_tokens,
    estimate_tokens,
)
from sessions_app import limits, metrics, tree
from sessions_app.models import ChatSession, IdempotencyKey, LlmEvent, Message, Turn

logger = logging.getLogger(__name__)
User = get_user_model()

# Most earlier messages looked at when building the context (the budget trims further).
HISTORY_LIMIT = 200
# What estimate_prompt_tokens() gives for one message beyond its text's tokens.
ONE_MESSAGE_TOKENS = REPLY_PRIMING_TOKENS + MESSAGE_OVERHEAD_TOKENS
# Lapsed turns closed per sweep transaction batch.
SWEEP_BATCH = 100


class TurnRejected(Exception):
    """The request cannot start a turn; nothing was stored and no credits were held.
    `code` says why (`not_found`, `insufficient_credits`, `unknown_model`, ...); the view
    layer maps it to a status."""

    def __init__(self, code: str, detail: str, *, extra: dict[str, Any] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.code, self.detail = code, detail
        self.extra = extra or {}  # more fields for the error body (a 402's amounts)
        self.headers = headers or {}  # for the answer (a 429's Retry-After and x-ratelimit-*)


@dataclasses.dataclass(frozen=True)
class TurnInput:
    content: str | None  # None: a regenerate (SPEC section 17: a new answer to `parent_id`)
    model: str | None = None
    tools_enabled: bool = False
    max_tokens: int | None = None
    resumable: bool = False
    # (Idempotency-Key, fingerprint of the request) when the client sent a key.
    idempotency: tuple[str, str] | None = None
    # The OpenAI-compatible front door (SPEC section 14): the client's own messages are the
    # context (no history is read), its parameters and tools go to the provider as they are.
    context: list[ChatMessage] | None = None
    params: dict[str, Any] | None = None
    client_tools: list[dict[str, Any]] | None = None
    # The request's own fallbacks (SPEC section 15: after `model`, replacing the configured
    # ones; () means none); None: the model's configured fallbacks.
    models: tuple[str, ...] | None = None
    # Where the turn continues (SPEC section 17): `parent_id` a message of the session (with
    # `parent_given`); `parent_given` with None starts a new root; not given: the current leaf.
    parent_id: uuid.UUID | None = None
    parent_given: bool = False
    # A `title` turn (SPEC section 17) writes the session's title: it is no message of the tree.
    kind: str = Turn.Kind.CHAT


@dataclasses.dataclass(frozen=True)
class SessionFacts:
    id: uuid.UUID
    model: str
    system_prompt: str
    titled: bool = False  # it has a title, or has asked for one (LockedTurn.session_titled)


@dataclasses.dataclass(frozen=True)
class Preflight:
    """What one read found for a turn request: its user, the session (None if it is not
    theirs), the price of the model asked for, the wallet and the recent history."""

    user_id: int
    key_id: uuid.UUID | None  # the API key, when it should be marked used
    session: SessionFacts | None
    price: ModelPrice | None
    wallet: tuple[Decimal, Decimal] | None  # (balance, held)
    history: list[tuple[str, str]]  # (role, content), newest first
    key: limits.KeyLimits | None = None  # the API key that asks, and its limits (SPEC section 16)
    # The message the turn continues from (the parent asked for, else the current leaf):
    # (id, role, content), or None (a new root, an empty session, or a parent not found).
    anchor: tuple[uuid.UUID, str, str] | None = None


# Whether the session `s` has a title or has asked for one (a title is asked for once).
_TITLED = "(s.title <> '' OR s.title_requested)"


@functools.cache
def _preflight_sql(by_key: bool, vendor: str, api_session: bool = False) -> str:
    key, user, session = sql.table(ApiKey), sql.table(User), sql.table(ChatSession)
    price, wallet, provider = sql.table(ModelPrice), sql.table(Wallet), sql.table(Provider)
    # The session asked for, or (the OpenAI front door) the key's own API session.
    which = (f"s.{sql.column(ChatSession, 'api_key')} = k.id" if api_session else "s.id = %(session)s")
    joins = (f"LEFT JOIN {session} s ON {which} AND s.user_id = u.id "
             f"LEFT JOIN {price} p ON p.model = COALESCE(%(model)s, s.model) "
             f"LEFT JOIN {wallet} w ON w.user_id = u.id "
             f"LEFT JOIN {provider} pr ON pr.id = p.{sql.column(ModelPrice, 'provider')} ")
    columns = ("SELECT u.id, {key_columns}, s.id, s.model, s.system_prompt, " + _TITLED + ", "
               "p.id, p.model, p.prompt_price_per_mtok, p.completion_price_per_mtok, w.balance, w.held, "
               "p.upstream_model, p.fallbacks, pr.id, pr.name, pr.base_url, pr.api_key_env, pr.api_key, "
               "pr.timeout_seconds, {limit_columns} ")
    if by_key:
        limit_columns = ", ".join(f"k.{sql.column(ApiKey, name)}" for name in _KEY_LIMITS)
        return (columns.format(key_columns="k.id, (k.last_used_at IS NULL OR k.last_used_at < %(stale)s)",
                               limit_columns=limit_columns)
                + f"FROM {key} k JOIN {user} u ON u.id = k.user_id AND u.is_active = %(true)s " + joins
                + "WHERE k.key_hash = %(hash)s AND k.revoked_at IS NULL "
                  "AND (k.expires_at IS NULL OR k.expires_at > %(now)s)")
    return (columns.format(key_columns="NULL, NULL", limit_columns=", ".join(["NULL"] * len(_KEY_LIMITS)))
            + f"FROM {user} u " + joins + "WHERE u.id = %(user)s")


_KEY_LIMITS = ("rpm", "tpm", "max_parallel", "budget", "budget_period", "allowed_models")


def load_preflight(*, session_id: uuid.UUID | None, model: str | None, key_hash: str | None = None,
                   user_id: int | None = None, parent_id: uuid.UUID | None = None,
                   root: bool = False) -> Preflight | None:
    """Everything a turn request needs to know, in one round trip (two reads, pipelined on
    PostgreSQL): by API key (`key_hash`; None when no active key of an active user has that
    hash) or by a user already authenticated (`user_id`). The history is read whoever owns
    the session and dropped unless the requester does.

    `session_id=None` (the OpenAI front door, by key): the key's own API session, if it has
    one yet, and no history (the client sends its whole context): one read.

    The history is the chain of messages (SPEC section 17) from `parent_id`, else the
    session's current leaf, up to its root (none with `root`)."""
    now = timezone.now()
    stale = now - LAST_USED_RESOLUTION
    params = {"session": sql.value(ChatSession, "id", session_id), "model": model, "true": True,
              "hash": key_hash, "user": user_id, "stale": sql.value(ApiKey, "last_used_at", stale),
              "now": sql.value(ApiKey, "expires_at", now)}
    if session_id is None:
        assert key_hash is not None, "the API session is found by key"
        found, history = sql.fetch_all(_preflight_sql(True, sql.vendor(), True), params), []
    elif root:  # a new root (or a title): no chain to read
        found, history = sql.fetch_all(_preflight_sql(key_hash is not None, sql.vendor()), params), []
    else:
        chain = {"session": params["session"], "parent": sql.value(Message, "id", parent_id), "root": root}
        found, history = sql.fetch_together([(_preflight_sql(key_hash is not None, sql.vendor()), params),
                                             (tree.chain_sql(sql.vendor()), chain)])
    if not found:
        return None
    (user, key_id, touch, session, session_model, prompt, titled, price_id, price_model, prompt_price,
     completion_price, balance, held, upstream_model, fallbacks, provider_id, *rest) = found[0]
    provider, (rpm, tpm, max_parallel, budget, budget_period, allowed) = rest[:5], rest[5:]
    return Preflight(
        user_id=user,
        key_id=sql.as_uuid(key_id) if key_id is not None and touch else None,  # (key: always)
        session=SessionFacts(id=sql.as_uuid(session), model=session_model, system_prompt=prompt or "",
                             titled=bool(titled)) if session is not None else None,
        price=ModelPrice(id=price_id, model=price_model, prompt_price_per_mtok=sql.as_money(prompt_price),
                         completion_price_per_mtok=sql.as_money(completion_price), upstream_model=upstream_model,
                         fallbacks=sql.as_json(fallbacks) or [], provider_id=provider_id,
                         provider=_provider(provider_id, *provider)) if price_id is not None else None,
        wallet=(sql.as_money(balance), sql.as_money(held)) if balance is not None else None,
        history=[(role, content) for _, role, content in history
                 if role in (Message.Role.USER, Message.Role.ASSISTANT) and content][:HISTORY_LIMIT]
        if session is not None else [],
        anchor=(sql.as_uuid(history[0][0]), history[0][1], history[0][2]) if session is not None and history else None,
        key=limits.KeyLimits(id=sql.as_uuid(key_id), rpm=rpm, tpm=tpm, max_parallel=max_parallel,
                             budget=sql.as_money(budget) if budget is not None else None,
                             budget_period=budget_period or "",
                             allowed_models=tuple(sql.as_json(allowed)) if allowed is not None else None)
        if key_id is not None else None,
    )


def _provider(provider_id: int | None, name: str, base_url: str, api_key_env: str, api_key: str,
              timeout: float | None) -> Provider | None:
    if provider_id is None:
        return None
    return Provider(id=provider_id, name=name, base_url=base_url, api_key_env=api_key_env, api_key=api_key,
                    timeout_seconds=timeout)


def build_context(system_prompt: str, history: list[tuple[str, str]], content: str, *,
                  extra_system: str = "") -> list[ChatMessage]:
    """The messages sent upstream: system prompt, earlier messages (`history`, newest first;
    the oldest dropped first to fit PANTHEON_CONTEXT_BUDGET_TOKENS), then the new user message."""
    head: list[ChatMessage] = []
    if system_prompt:
        head.append({"role": "system", "content": system_prompt})
    if extra_system:
        head.append({"role": "system", "content": extra_system})
    tail: list[ChatMessage] = [{"role": "user", "content": content}]
    budget = settings.PANTHEON_CONTEXT_BUDGET_TOKENS - estimate_prompt_tokens(head + tail)
    earlier: list[ChatMessage] = []
    for role, text in history:  # newest first, so the oldest are the ones left out
        cost = ONE_MESSAGE_TOKENS + estimate_tokens(text)  # inline: up to HISTORY_LIMIT of them per turn
        if cost > budget:
            break
        budget -= cost
        earlier.append({"role": role, "content": text})
    earlier.reverse()
    return head + earlier + tail


@dataclasses.dataclass
class PreparedTurn:
    """Everything decided before the model is called. The turn row exists (`running`)."""

    turn_id: uuid.UUID
    user_id: int
    session_id: uuid.UUID
    model: str
    messages: list[ChatMessage]
    max_tokens: int
    price: ModelPrice  # what the hold was sized at: the dearest candidate's rates
    tools: list[dict[str, Any]] | None
    resumable: bool = False
    params: dict[str, Any] | None = None  # passed to the provider (the OpenAI front door)
    client_tools: list[dict[str, Any]] | None = None  # the client's tools: offered, never run here
    # The candidates, in order (SPEC section 15): the model asked for first.
    routes: list[catalogue.Route] = dataclasses.field(default_factory=list)
    # The key's `x-ratelimit-*` headers for the answer (SPEC section 16).
    rate_headers: dict[str, str] = dataclasses.field(default_factory=dict)
    # The turn's row as begin_turn() wrote it (what its close needs of it): close_turn(...,
    # as_begun=) then skips reading it.
    as_begun: LockedTurn | None = None

    def candidates(self) -> list[Candidate]:
        return [route.candidate() for route in self.routes]

    def price_of(self, model: str) -> ModelPrice | None:
        """The price a turn served by `model` is billed at (None: look it up)."""
        return next((route.price for route in self.routes if route.model == model), None)


_REQUEST_CANCEL = f"UPDATE {sql.table(Turn)} SET cancel_requested = %s WHERE id = %s AND status = 'running'"
_PROGRESS = f"SELECT status, checkpoint, chunk_ends, session_id, model FROM {sql.table(Turn)} WHERE id = %s"
_TOUCH_KEY = f"UPDATE {sql.table(ApiKey)} SET last_used_at = %s WHERE id = %s"
# SPEC section 11: a key is kept 24 hours; an older one is used afresh.
IDEMPOTENCY_TTL = timedelta(hours=24)
_DROP_EXPIRED_KEY = (f"DELETE FROM {sql.table(IdempotencyKey)} WHERE user_id = %s AND key = %s "
                     f"AND created_at < %s")
_FIND_KEY = (f"SELECT fingerprint, turn_id FROM {sql.table(IdempotencyKey)} WHERE user_id = %s AND key = %s "
             f"AND created_at >= %s")


class AlreadyRequested(Exception):
    """A request repeating an earlier one (the same Idempotency-Key and body): answer that
    request's turn instead of making a new one."""

    def __init__(self, turn_id: uuid.UUID) -> None:
        super().__init__(f"repeat of turn {turn_id}")
        self.turn_id = turn_id


def find_repeat(user_id: int, key: str, fingerprint: str) -> uuid.UUID | None:
    """The turn an earlier request with this Idempotency-Key made (None if none in the last
    24 hours). Raises TurnRejected (422) when that request had a different body."""
    row = sql.fetch_one(_FIND_KEY, [user_id, key, sql.value(IdempotencyKey, "created_at",
                                                             timezone.now() - IDEMPOTENCY_TTL)])
    if row is None:
        return None
    if row[0] != fingerprint:
        raise TurnRejected("idempotency_key_reused",
                           "This Idempotency-Key was used with a different request.")
    return sql.as_uuid(row[1])


def _tool_system_message(files: list[dict[str, Any]]) -> str:
    if not files:
        return "You can call file_read to read the user's uploaded files, but the user has no ready files."
    listing = "\n".join(f"- id {f['id']}: {f['filename']} ({f['size']} bytes)" for f in files)
    return ("You can call file_read to read the user's uploaded files. "
            f"The user's ready files:\n{listing}")


def turn_rounds(tools_enabled: bool) -> int:
    """Model calls a turn may make: tool rounds, then the answer."""
    return settings.PANTHEON_MAX_TOOL_ROUNDS + 1 if tools_enabled else 1


def _lease_from(now: datetime) -> datetime:
    return now + timedelta(seconds=settings.PANTHEON_TURN_LEASE_SECONDS)


def begin_turn(preflight: Preflight, request: TurnInput, *, streamed: bool) -> PreparedTurn:
    """The preflight after authentication and the session check: 422, 400, then 402.

    One transaction takes the hold and creates the `running` turn (with its lease) and the
    user message, so from here on the turn cannot be lost: whoever ends it, and the sweep
    if nobody does, goes through close_turn(). Raises TurnRejected.
    """
    session = preflight.session
    if session is None:
        raise TurnRejected("not_found", "Not found.")
    if streamed and request.tools_enabled:
        raise TurnRejected("tools_not_supported_in_stream",
                           "Tools are not supported in streamed turns; use POST .../turns.")
    model = request.model or session.model
    key = preflight.key
    allowed = key.allowed_models if key is not None else None
    if allowed is not None:
        refused = next((name for name in (model, *(request.models or ())) if name not in allowed), None)
        if refused is not None:
            raise TurnRejected("model_not_allowed", f"This API key may not use the model {refused!r}.")
    if preflight.price is None:
        raise TurnRejected("unknown_model", f"Model {model!r} is not in the price list.")
    try:
        routes = catalogue.candidates(preflight.price, request.models, allowed=allowed)
    except billing.UnknownModel as exc:
        raise TurnRejected("unknown_model", str(exc)) from None
    price = catalogue.dearest(routes)  # the hold covers whichever candidate answers

    rounds, extra_system, tools = turn_rounds(request.tools_enabled), "", None
    if request.tools_enabled:
        extra_system = _tool_system_message(ready_files_for(preflight.user_id))
        tools = [FILE_READ_TOOL]
    anchor, question_id = preflight.anchor, uuid.uuid4()
    titling = request.kind == Turn.Kind.TITLE
    if titling:
        messages, parent, question_id = list(request.context or ()), None, None
    elif request.context is not None:
        messages, parent = list(request.context), None  # each OpenAI call is a conversation of its own
    elif request.content is None:
        # A regenerate: a new answer to an earlier user message, beside the answers it had.
        if anchor is None or anchor[1] != Message.Role.USER:
            raise TurnRejected("invalid_parent", "A regenerate (no content) needs parent_id: a user message of "
                                                 "this session.")
        question_id, parent = anchor[0], None
        messages = build_context(session.system_prompt, preflight.history[1:], anchor[2], extra_system=extra_system)
    else:
        if request.parent_given and request.parent_id is not None and anchor is None:
            raise TurnRejected("invalid_parent", "parent_id is not a message of this session.")
        parent = anchor[0] if anchor is not None else None  # the parent asked for, or the current leaf
        messages = build_context(session.system_prompt, preflight.history, request.content, extra_system=extra_system)
    prompt_estimate = estimate_prompt_tokens(messages, tools or request.client_tools)
    held_prompt = billing.tool_turn_prompt_tokens(prompt_estimate, rounds=rounds,
                                                  tool_output_chars=TOOL_OUTPUT_BUDGET_CHARS)
    turn_id = uuid.uuid4()
    now = timezone.now()

    # Only with limits: the key's (or user's) row lock and counts, one more round trip.
    admits = (key is not None and key.counts_turns) or any(value is not None for value in limits.user_limits())

    def open_turn(in_one_flight: bool) -> tuple[billing.HoldDecision, limits.Admission | None, dict[str, Any]]:
        """The hold, the running turn (its row is returned) and its question: inside the
        transaction below, or alone as one statement (the hold sent in one flight)."""
        if request.idempotency is not None:
            # Inserted first, so a concurrent repeat waits on the unique index here and
            # fails there once this commits: one turn per key, never a second hold.
            idempotency_key, fingerprint = request.idempotency
            sql.execute(_DROP_EXPIRED_KEY, [preflight.user_id, idempotency_key, sql.value(
                IdempotencyKey, "created_at", now - IDEMPOTENCY_TTL)], count=False)
            sql.insert(IdempotencyKey, [{"user_id": preflight.user_id, "key": idempotency_key,
                                         "fingerprint": fingerprint, "turn_id": turn_id, "created_at": now}])
        admission = limits.admit(user_id=preflight.user_id, key=key, now=now) if admits else None
        row = {
            "id": turn_id, "session_id": session.id, "user_id": preflight.user_id,
            "api_key_id": key.id if key is not None else None, "status": Turn.Status.RUNNING,
            "model": model, "served_model": "", "provider_model": "", "streamed": streamed,
            "tools_enabled": request.tools_enabled,
            "max_tokens": 0, "prompt_tokens": prompt_estimate, "completion_tokens": 0,
            "usage_estimated": True, "cost": Decimal(0), "finish_reason": "", "error_code": "",
            "error_message": "", "lease_until": _lease_from(now), "checkpoint": "", "chunk_ends": None,
            "resumable": request.resumable, "cancel_requested": False, "reconciliation": "",
            "generation_id": "", "kind": request.kind, "reply_to_id": question_id, "created_at": now,
            "finished_at": None,
        }
        question = [{
            "id": question_id, "session_id": session.id, "turn_id": turn_id, "user_id": preflight.user_id,
            "parent_id": parent, "role": Message.Role.USER, "content": request.content, "tool_calls": None,
            "tool_call_id": "", "position": 0, "created_at": now,
        }] if request.content is not None and not titling else []  # a regenerate answers a stored question

        def writes(decision: billing.HoldDecision, reservation: str | None) -> list[sql.Write | None]:
            """The rows that go out with the hold. While it runs, the branch ends at its
            question (a reload shows it); the close moves the leaf on to the answer. The
            session's row lock comes after the wallet's, as in the close."""
            row["max_tokens"] = decision.max_tokens
            leaf = None if titling else sql.updating(ChatSession, session.id, {"current_leaf": question_id},
                                                     after=reservation)
            return [sql.inserting(Turn, [row]), sql.inserting(Message, question), leaf]

        decision = billing.hold(user_id=preflight.user_id, turn_id=turn_id, model=model,
                                prompt_tokens=held_prompt, max_tokens=request.max_tokens, rounds=rounds,
                                price=price, wallet=preflight.wallet if in_one_flight else None,
                                budget_left=admission.budget_left if admission is not None else None,
                                in_one_flight=in_one_flight, together=writes)
        if admission is not None:
            admission.admit_tokens(prompt_estimate + decision.max_tokens * rounds)
        if preflight.key_id is not None:  # at most once a minute per key
            sql.execute(_TOUCH_KEY, [sql.value(ApiKey, "last_used_at", now),
                                     sql.value(ApiKey, "id", preflight.key_id)], count=False)
        return decision, admission, row

    # PostgreSQL, sized from the preflight's read of the wallet: the hold and the rows are one
    # statement, alone (a transaction of its own) unless an idempotency key, limits or the
    # key's last use add statements around it; one round trip either way. If a concurrent
    # turn took the credits since that read, that statement fails in the server, and this
    # is tried again the careful way (a fresh read, the hold's UPDATE answering before the
    # inserts).
    for in_one_flight in (True, False):
        alone = (in_one_flight and sql.vendor() == "postgresql" and request.idempotency is None and not admits
                 and preflight.key_id is None)
        try:
            with sql.alone() if alone else sql.transaction():
                decision, admission, row = open_turn(in_one_flight)
            break
        except billing.InsufficientCredits as exc:  # or KeyBudgetExceeded
            amounts = {name: format_money(value) for name, value in (("needed", exc.needed),
                                                                     ("available", exc.available))
                       if value is not None}
            raise TurnRejected(exc.code, str(exc), extra=amounts) from None
        except limits.LimitRefused as exc:
            raise TurnRejected(exc.code, exc.detail, headers=exc.headers) from None
        except IntegrityError as exc:
            if in_one_flight and billing.refused_in_flight(exc):
                continue  # rolled back, nothing committed: again, the careful way
            # A concurrent request with the same Idempotency-Key made its turn first; this
            # transaction (and its hold) was rolled back.
            earlier = find_repeat(preflight.user_id, *request.idempotency) if request.idempotency else None
            if earlier is not None:
                raise AlreadyRequested(earlier) from None
            if not ChatSession.objects.filter(pk=session.id).exists():
                # The session was deleted while this preflight ran (its turn's foreign key failed).
                raise TurnRejected("not_found", "Not found.") from None
            raise
    as_begun = LockedTurn(**{name: row[name] for name in _LOCKED_COLUMNS}, session_titled=session.titled)
    return PreparedTurn(
        turn_id=turn_id, user_id=preflight.user_id, session_id=session.id, model=model, messages=messages,
        max_tokens=decision.max_tokens, price=price, tools=tools, resumable=request.resumable,
        params=request.params, client_tools=request.client_tools, routes=routes,
        rate_headers=admission.headers if admission is not None else {}, as_begun=as_begun,
    )


class Renewal(enum.Enum):
    RUNNING = "running"
    CANCEL_REQUESTED = "cancel_requested"  # POST .../cancel reached another process
    GONE = "gone"  # no longer running: someone else closed it


@dataclasses.dataclass(frozen=True)
class RenewRequest:
    """One running turn's lease renewal and, with `checkpoint`, its partial answer (where
    its deltas end, the provider's generation id and the model serving it, for the sweep to
    bill and reconcile the turn if this process dies)."""

    turn_id: uuid.UUID
    checkpoint: str | None = None
    chunk_ends: list[int] | None = None
    generation_id: str = ""
    served_model: str = ""


# How many renewals one UPDATE carries.
RENEW_BATCH = 200
_RENEWED = ("id", "has_cp", "checkpoint", "chunk_ends", "generation_id", "served_model")


@functools.cache
def _renew_sql(vendor: str, rows: int, *, arrays: bool = False) -> str:
    """One UPDATE for `rows` renewals (their values joined to the turns), which answers for
    each still running turn whether a stop was asked. Without a checkpoint (`has_cp` false)
    a row renews the lease only and leaves the saved answer as it is.

    On PostgreSQL a batch's values come as one array per column (UNNEST), so the statement's
    text is the same for every batch size: prepared once, and not parsed again by psycopg (a
    batch of 200 had 1,400 placeholders to find in 10 kB of text; 16 rows cost the server 9
    ms to plan). One renewal alone (the usual checkpoint) is one VALUES row: its arrays
    would cost more to send than the row. Elsewhere, VALUES rows (`rows` of them)."""
    turn = sql.table(Turn)
    kinds = ("uuid", "boolean", "text", "jsonb", "text", "text")
    cast = "CAST(%s AS {})" if vendor == "postgresql" else "%s"  # (PostgreSQL must be told the types)
    if arrays:
        columns = ", ".join(cast.format(f"{kind}[]") for kind in kinds)
        values = f"SELECT * FROM UNNEST({columns}) AS v({', '.join(_RENEWED)})"
    else:
        values = "VALUES " + ", ".join(["(" + ", ".join(cast.format(kind) for kind in kinds) + ")"] * rows)

    def kept(column: str) -> str:
        return f"{column} = CASE WHEN v.has_cp THEN v.{column} ELSE {turn}.{column} END"

    return (f"WITH v({', '.join(_RENEWED)}) AS ({values}) "
            f"UPDATE {turn} SET lease_until = %s, {kept('checkpoint')}, {kept('chunk_ends')}, "
            f"{kept('generation_id')}, {kept('served_model')} "
            f"FROM v WHERE {turn}.id = v.id AND {turn}.status = 'running' "
            f"RETURNING {turn}.id, {turn}.cancel_requested")


def renew_turns(requests: Sequence[RenewRequest]) -> dict[uuid.UUID, Renewal]:
    """Extend running turns' leases (a hold lives as long as its turn's lease) and save the
    partial answers given: one UPDATE per RENEW_BATCH turns, whatever their number (a
    process's streams renew together: `live_turn.LeaseKeeper`). Each turn's answer: running,
    a stop was asked (POST .../cancel reached another process), or gone (no longer running:
    someone else closed it)."""
    lease = sql.value(Turn, "lease_until", _lease_from(timezone.now()))
    vendor = sql.vendor()
    found: dict[uuid.UUID, Renewal] = {}
    for start in range(0, len(requests), RENEW_BATCH):
        batch = requests[start:start + RENEW_BATCH]
        rows = [(sql.value(Turn, "id", r.turn_id), r.checkpoint is not None, r.checkpoint or "",
                 sql.value(Turn, "chunk_ends", r.chunk_ends if r.checkpoint is not None else None),
                 _fit(Turn, "generation_id", r.generation_id), _fit(Turn, "served_model", r.served_model))
                for r in batch]
        postgresql = vendor == "postgresql"
        arrays = postgresql and len(rows) > 1
        if arrays:
            params: list[Any] = [list(column) for column in zip(*rows, strict=True)]
            statement = _renew_sql(vendor, 0, arrays=True)
        else:
            params = [value for row in rows for value in row]
            statement = _renew_sql(vendor, len(rows))
        # Prepared on PostgreSQL: two texts (one row, arrays). Elsewhere a text per batch size.
        for turn_id, cancel_requested in sql.fetch_all(statement, [*params, lease], prepare=postgresql):
            found[sql.as_uuid(turn_id)] = Renewal.CANCEL_REQUESTED if cancel_requested else Renewal.RUNNING
    return {r.turn_id: found.get(r.turn_id, Renewal.GONE) for r in requests}


def renew_turn(turn_id: uuid.UUID, *, checkpoint: str | None = None,
               chunk_ends: list[int] | None = None, generation_id: str = "", served_model: str = "") -> Renewal:
    """renew_turns() for one turn."""
    return renew_turns([RenewRequest(turn_id, checkpoint, chunk_ends, generation_id, served_model)])[turn_id]


def request_cancel(turn_id: uuid.UUID) -> bool:
    """Mark a running turn for stopping (its serving process stops it at its next lease
    write, or at once when the signal reaches it). False when it is not running."""
    return sql.execute(_REQUEST_CANCEL, [True, sql.value(Turn, "id", turn_id)]) == 1


@dataclasses.dataclass(frozen=True)
class Progress:
    """A turn as another process last saved it."""

    status: str
    text: str  # the partial answer while running (the stored one is read once it ended)
    chunk_ends: list[int] | None
    session_id: uuid.UUID
    model: str


def turn_progress(turn_id: uuid.UUID) -> Progress | None:
    row = sql.fetch_one(_PROGRESS, [sql.value(Turn, "id", turn_id)])
    if row is None:
        return None
    return Progress(status=row[0], text=row[1] or "", chunk_ends=sql.as_json(row[2]),
                    session_id=sql.as_uuid(row[3]), model=row[4])


@dataclasses.dataclass
class TurnOutcome:
    """How the model call ended, as the relay, the plain endpoint or the sweep saw it."""

    status: str  # Turn.Status, not RUNNING
    content: str = ""
    usage: Usage | None = None  # as the provider reported it; None if it never did
    provider_model: str = ""
    records: list[CallRecord] = dataclasses.field(default_factory=list)
    tool_messages: list[ChatMessage] = dataclasses.field(default_factory=list)
    finish_reason: str = ""
    error_code: str = ""
    error_message: str = ""
    # The provider had the prompt and was working on it when the turn was cut off.
    prompt_processed: bool = False
    # Where each streamed delta ends in `content` (the stream's event ids stand on them).
    chunk_ends: list[int] | None = None
    # The client's tools the model asked for (the OpenAI front door), stored with the answer.
    tool_calls: list[ToolCall] = dataclasses.field(default_factory=list)
    # The catalogue model that answered (for a failure, the last one tried): billed at its
    # price. "" when no candidate was reached: the one the turn saved, else the one asked for.
    served_model: str = ""

    @classmethod
    def from_error(cls, exc: GatewayError, *, content: str = "", status: str = Turn.Status.FAILED,
                   served_model: str = "", records: list[CallRecord] | None = None) -> TurnOutcome:
        """`records`: the calls made, when `exc` does not carry them (raised from outside)."""
        records = list(exc.records) if records is None else list(records)
        provider_model = next((r.provider_model for r in reversed(records) if r.provider_model), "")
        return cls(status=status, content=content, usage=exc.usage, provider_model=provider_model,
                   records=records, error_code=exc.code, error_message=exc.message,
                   served_model=exc.model or served_model)


@dataclasses.dataclass
class TurnResult:
    turn: Turn
    message: Message | None
    balance: Decimal
    closed: bool = False  # this call closed the turn (False: it was already closed, returned as stored)


def _fit(model: type[Model], field: str, value: str) -> str:
    """Provider text for a column: storable, and cut to the column's length."""
    value = clean_text(value or "")
    limit = model._meta.get_field(field).max_length
    return value[:limit] if limit else value


def replay_result(turn_id: uuid.UUID, *, turn: Turn | None = None) -> TurnResult | None:
    """An ended turn as its first answer said it: the stored turn (`turn` if the caller
    has it), its answer, and the balance right after its debit (the wallet's balance now if
    it cost nothing)."""
    turn = turn if turn is not None else Turn.objects.filter(pk=turn_id).first()
    if turn is None:
        return None
    message = turn.messages.filter(role=Message.Role.ASSISTANT).order_by("-position").first()
    debit = LedgerEntry.objects.filter(turn_id=turn_id, kind=LedgerEntry.Kind.DEBIT).values_list(
        "balance_after", flat=True).first()
    balance = debit if debit is not None else selectors.current_balance(user_id=turn.user_id)
    return TurnResult(turn=turn, message=message, balance=balance)


def _stored_result(turn_id: uuid.UUID) -> TurnResult:
    turn = Turn.objects.get(pk=turn_id)
    message = turn.messages.filter(role=Message.Role.ASSISTANT).order_by("-position").first()
    return TurnResult(turn=turn, message=message, balance=selectors.current_balance(user_id=turn.user_id))


@dataclasses.dataclass(frozen=True)
class LockedTurn:
    """A turn row as close_turn locked it."""

    id: uuid.UUID
    status: str
    user_id: int
    session_id: uuid.UUID
    model: str
    prompt_tokens: int
    max_tokens: int
    tools_enabled: bool
    streamed: bool
    checkpoint: str
    created_at: datetime
    chunk_ends: list[int] | None
    resumable: bool
    generation_id: str
    served_model: str
    api_key_id: uuid.UUID | None
    reply_to_id: uuid.UUID | None
    kind: str
    # Its session has a title or has asked for one (a title is asked for once), so the
    # close needs no answer from the session's row. A title cleared after this was read
    # is asked for by the session's next turn.
    session_titled: bool


_LOCKED_FIELDS = ("id", "status", "user", "session", "model", "prompt_tokens", "max_tokens", "tools_enabled",
                  "streamed", "checkpoint", "created_at", "chunk_ends", "resumable", "generation_id", "served_model",
                  "api_key", "reply_to", "kind")
# LockedTurn's fields from the turn's row, as the row's dict names them (foreign keys by column).
_LOCKED_COLUMNS = tuple(Turn._meta.get_field(name).attname for name in _LOCKED_FIELDS)


@functools.cache
def _lock_sql(lapsed: bool, vendor: str) -> str:
    columns = ", ".join(f"t.{sql.column(Turn, name)}" for name in _LOCKED_FIELDS)
    query = (f"SELECT {columns}, {_TITLED} FROM {sql.table(Turn)} t "
             f"JOIN {sql.table(ChatSession)} s ON s.id = t.{sql.column(Turn, 'session')} WHERE t.id = %(turn)s")
    if lapsed:
        query += " AND t.status = 'running' AND t.lease_until < %(lapsed)s"
    if connection.features.has_select_for_update:  # the turn's row only (the session's: later)
        query += " FOR UPDATE OF t SKIP LOCKED" if lapsed else " FOR UPDATE OF t"
    return query


def _lock_turn(turn_id: uuid.UUID, *, lapsed_before: datetime | None = None) -> LockedTurn | None:
    """Lock the turn row until the transaction ends (PostgreSQL; SQLite's writers are
    serialised). With `lapsed_before`, only a running turn whose lease lapsed, skipping one
    that another sweeper holds."""
    row = sql.fetch_one(_lock_sql(lapsed_before is not None, sql.vendor()),
                        {"turn": sql.value(Turn, "id", turn_id),
                         "lapsed": sql.value(Turn, "lease_until", lapsed_before)})
    if row is None:
        return None
    return LockedTurn(id=sql.as_uuid(row[0]), status=row[1], user_id=row[2], session_id=sql.as_uuid(row[3]),
                      model=row[4], prompt_tokens=row[5], max_tokens=row[6], tools_enabled=bool(row[7]),
                      streamed=bool(row[8]), checkpoint=row[9], created_at=sql.as_datetime(row[10]),
                      chunk_ends=sql.as_json(row[11]), resumable=bool(row[12]), generation_id=row[13] or "",
                      served_model=row[14] or "", api_key_id=sql.as_uuid(row[15]) if row[15] is not None else None,
                      reply_to_id=sql.as_uuid(row[16]) if row[16] is not None else None, kind=row[17],
                      session_titled=bool(row[18]))


def close_turn(turn_id: uuid.UUID, outcome: TurnOutcome, *, price: ModelPrice | None = None,
               as_begun: LockedTurn | None = None) -> TurnResult:
    """End a turn and pay for it, all in one transaction. Idempotent: a turn that is no
    longer running (closed by another process, the sweep, a retry) is returned as stored.

    Lock order everywhere: the turn row, then (in settle) the hold rows and the wallet row,
    then the session row (its current leaf).

    Two round trips on PostgreSQL: the turn's lock, then everything else with the COMMIT.
    One with `as_begun` (the turn's row as its own process began it: PreparedTurn.as_begun,
    whose fields no one else changes): the turn's UPDATE, sent first, takes the lock and
    fails in the server if the turn is no longer running, and then the turn is closed the
    careful way, which finds it closed.
    """
    # (Without the served model the close needs the one the row's checkpoints saved.)
    if as_begun is not None and outcome.served_model and sql.vendor() == "postgresql":
        try:
            with sql.transaction():
                closed = _close_locked(as_begun, outcome, price=price, if_running=True)
            return closed()
        except DataError as exc:
            if not sql.matched_nothing(exc):
                raise
    with sql.transaction():
        turn = _lock_turn(turn_id)
        if turn is None:
            raise Turn.DoesNotExist(f"no turn {turn_id}")
        closed = _close_locked(turn, outcome, price=price) if turn.status == Turn.Status.RUNNING else None
    return closed() if closed is not None else _stored_result(turn_id)


def _close_locked(turn: LockedTurn, outcome: TurnOutcome, *, price: ModelPrice | None,
                  if_running: bool = False) -> Callable[[], TurnResult]:
    """Close a locked running turn in the caller's transaction; the returned function gives
    the result once it has committed (the new balance is read from the COMMIT's answer).
    `if_running`: the turn is not locked yet; its UPDATE locks it, and fails the
    transaction if it is no longer running (sql.update_or_fail)."""
    served = outcome.served_model or turn.served_model or turn.model
    if price is None or price.model != served:
        price = billing.get_price(served)  # billed at the served model's price (SPEC section 15)
    content = clean_text(outcome.content)
    usage = billing.usage_to_bill(reported=outcome.usage, text=content, prompt_estimate=turn.prompt_tokens,
                                  output_cap=turn.max_tokens * turn_rounds(turn.tools_enabled),
                                  prompt_processed=outcome.prompt_processed)
    cost = billing.compute_cost(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                                price=price)
    now = timezone.now()
    reconciliation = reconciliation_at_close(usage, outcome.records, served_model=served)
    ended = {
        "status": outcome.status, "served_model": _fit(Turn, "served_model", served),
        "provider_model": _fit(Turn, "provider_model", outcome.provider_model),
        "prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
        "usage_estimated": usage.estimated, "cost": cost, "finish_reason": _fit(Turn, "finish_reason",
                                                                                 outcome.finish_reason),
        "error_code": _fit(Turn, "error_code", outcome.error_code), "error_message": clean_text(outcome.error_message),
        "lease_until": None, "checkpoint": "", "finished_at": now,
        "chunk_ends": _fitting_ends(outcome.chunk_ends, content), "reconciliation": reconciliation,
    }
    common = {"session_id": turn.session_id, "turn_id": turn.id, "user_id": turn.user_id, "created_at": now}
    rows = [{**common, "id": uuid.uuid4(), "role": extra["role"], "content": clean_text(extra.get("content") or ""),
             "tool_calls": extra.get("tool_calls"),
             "tool_call_id": _fit(Message, "tool_call_id", extra.get("tool_call_id", "")), "position": position}
            for position, extra in enumerate(outcome.tool_messages, start=1)]
    assistant = {**common, "id": uuid.uuid4(), "role": Message.Role.ASSISTANT, "content": content,
                 "tool_calls": [{"id": call.id, "type": "function",
                                 "function": {"name": call.name, "arguments": call.arguments}}
                                for call in outcome.tool_calls] or None,
                 "tool_call_id": "", "position": len(rows) + 1}
    # The answer continues from the question it answers: a chain of its tool messages, then
    # the answer itself, which becomes the session's current leaf (SPEC section 17).
    previous = turn.reply_to_id
    for row in (*rows, assistant):
        row["parent_id"], previous = previous, row["id"]
    titling = turn.kind == Turn.Kind.TITLE
    usage_row = [{
        "id": uuid.uuid4(), "user_id": turn.user_id, "session_id": turn.session_id, "turn_id": turn.id,
        "api_key_id": turn.api_key_id, "model": turn.model, "served_model": ended["served_model"],
        "provider_model": ended["provider_model"], "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens, "total_tokens": usage.total_tokens,
        "estimated": usage.estimated, "reconciled": False, "cost": cost,
        "provider_cost": provider_cost(billed_records(outcome.records, served)), "created_at": now,
    }] if usage.total_tokens else []
    # None of these waits for an answer: on PostgreSQL they go out with the COMMIT, as one
    # statement with the turn's UPDATE (which takes the turn's row lock, the first).
    inserts = (None if titling else sql.inserting(Message, [*rows, assistant]),
               sql.inserting(UsageRecord, usage_row),
               sql.inserting(LlmEvent, [_event_row(record, turn, now) for record in outcome.records]))
    if if_running:
        sql.update_or_fail(Turn, turn.id, ended, where="status = 'running'", together=inserts)
    else:  # locked already
        sql.write_together(sql.updating(Turn, turn.id, ended), *inserts)
    # The session row after the wallet row (settle), as in the preflight (hold, then the
    # session row): one lock order, so a turn closing and the next one starting never deadlock.
    # With no title to ask for, the leaf needs no answer: it goes in the settlement's
    # statement, joined to the charge.
    moved = not titling and (turn.session_titled or outcome.status != Turn.Status.COMPLETED
                             or not settings.PANTHEON_AUTO_TITLE)
    leaf = sql.updating(ChatSession, turn.session_id, {"updated_at": now, "current_leaf": assistant["id"]},
                        after=billing.CHARGED) if moved else None
    balance = billing.settle_later(user_id=turn.user_id, turn_id=turn.id, cost=cost,
                                   note=f"{outcome.status} title turn" if titling else f"{outcome.status} turn",
                                   together=[leaf])
    ask_for_title = False
    if titling:
        # The title is the answer, stored on the session (if nobody named it meanwhile).
        if outcome.status == Turn.Status.COMPLETED and content.strip():
            sql.execute(_SET_TITLE, [_fit(ChatSession, "title", clean_title(content)), now,
                                     sql.value(ChatSession, "id", turn.session_id)], count=False)
    elif not moved:
        row = sql.fetch_one(_MOVE_LEAF, [sql.value(ChatSession, "updated_at", now),
                                         sql.value(ChatSession, "current_leaf", assistant["id"]),
                                         sql.value(ChatSession, "id", turn.session_id)])
        ask_for_title = row is not None and row[0] == "" and not row[1]  # untitled
    if reconciliation == Turn.Reconciliation.PENDING:
        # In this transaction: a turn that closed as pending always has its task queued.
        from sessions_app.tasks import schedule_reconciliation  # the tasks import this module

        schedule_reconciliation(turn.id)
    if ask_for_title:
        from sessions_app.tasks import schedule_title

        # SPEC section 17: after the first completed turn. Once: the session's next turns
        # (which close before the task runs, or after it failed) see title_requested. The
        # leaf's UPDATE locked the session's row, so nobody asked meanwhile: no answer awaited.
        sql.execute(_ASK_TITLE, [True, sql.value(ChatSession, "id", turn.session_id), False], count=False)
        schedule_title(turn.session_id)
    stored = Turn(id=turn.id, session_id=turn.session_id, user_id=turn.user_id, api_key_id=turn.api_key_id,
                  model=turn.model,
                  streamed=turn.streamed, tools_enabled=turn.tools_enabled, max_tokens=turn.max_tokens,
                  resumable=turn.resumable, created_at=turn.created_at, **ended)
    return lambda: TurnResult(turn=stored, message=Message(**assistant), balance=balance(), closed=True)


def billed_records(records: list[CallRecord], served_model: str) -> list[CallRecord]:
    """The calls a turn is billed for: the served model's (a candidate abandoned for a
    fallback failed before any output, and costs nothing: SPEC section 15)."""
    return [r for r in records if not r.model or r.model == served_model]


_MOVE_LEAF = (f"UPDATE {sql.table(ChatSession)} SET updated_at = %s, {sql.column(ChatSession, 'current_leaf')} = %s "
              f"WHERE id = %s RETURNING title, title_requested")
_ASK_TITLE = f"UPDATE {sql.table(ChatSession)} SET title_requested = %s WHERE id = %s AND title_requested = %s"
_SET_TITLE = f"UPDATE {sql.table(ChatSession)} SET title = %s, updated_at = %s WHERE id = %s AND title = ''"
TITLE_WORDS, TITLE_CHARS = 8, 80


def clean_title(text: str) -> str:
    """A model's title made one: one line, no surrounding quotes or final full stop, at most
    TITLE_WORDS words and TITLE_CHARS characters."""
    line = next((part.strip() for part in text.splitlines() if part.strip()), "")
    line = line.strip(" \t\"'`*#").removeprefix("Title:").strip(" \"'").rstrip(".")
    words = line.split()[:TITLE_WORDS]
    title = " ".join(words)
    return title[:TITLE_CHARS].rstrip()


def reconciliation_at_close(usage: Usage, records: list[CallRecord], *, served_model: str = "") -> str:
    """Whether a closing turn will be checked against the provider's record (SPEC section 13).

    Only a turn billed on an estimate is. It can be reconciled when the provider can be asked
    about every call that may have cost something (the served model's): each call the
    provider accepted (2xx) has a generation id, or reported its own usage. Otherwise the
    estimate stands, visibly.
    """
    if not usage.estimated:
        return Turn.Reconciliation.NOT_NEEDED
    accepted = [r for r in billed_records(records, served_model)
                if r.http_status is not None and 200 <= r.http_status < 300]
    if any(r.generation_id for r in accepted) and all(
            r.generation_id or (r.usage is not None and not r.usage.estimated) for r in accepted):
        return Turn.Reconciliation.PENDING
    return Turn.Reconciliation.UNRECONCILED


def provider_cost(records: list[CallRecord]) -> Decimal | None:
    """What the provider said the calls cost, summed; None if it never said."""
    costs = [r.provider_cost for r in records if r.provider_cost is not None]
    return sum(costs, Decimal(0)) if costs else None


def _fitting_ends(ends: list[int] | None, content: str) -> list[int] | None:
    """The deltas' ends if they cut exactly `content` (rising, ending at its length)."""
    if not ends or ends[0] <= 0 or ends[-1] != len(content):
        return None
    if any(b <= a for a, b in zip(ends, ends[1:], strict=False)):
        return None
    return ends


def _event_row(record: CallRecord, turn: LockedTurn, now: datetime) -> dict[str, Any]:
    return {
        "id": uuid.uuid4(), "user_id": turn.user_id, "turn_id": turn.id,
        "model": _fit(LlmEvent, "model", record.model), "upstream": _fit(LlmEvent, "upstream", record.upstream),
        "requested_model": _fit(LlmEvent, "requested_model", record.requested_model),
        "provider_model": _fit(LlmEvent, "provider_model", record.provider_model),
        "provider": _fit(LlmEvent, "provider", record.provider), "status": _fit(LlmEvent, "status", record.status),
        "http_status": record.http_status, "streamed": record.stream, "latency_ms": record.latency_ms,
        "ttft_ms": record.ttft_ms, "prompt_tokens": record.usage.prompt_tokens if record.usage else None,
        "completion_tokens": record.usage.completion_tokens if record.usage else None,
        "error": clean_text(record.error), "generation_id": _fit(LlmEvent, "generation_id", record.generation_id),
        "provider_cost": record.provider_cost, "created_at": now,
    }


def _interrupted(turn: LockedTurn) -> TurnOutcome:
    """How the sweep ends a turn whose process died: billed from its last checkpoint, and
    with the provider's generation id it saved (the call's only trace), so it is reconciled."""
    records = []
    if turn.generation_id:
        served = turn.served_model or turn.model
        records.append(CallRecord(requested_model=served, model=served, status="cancelled", http_status=200,
                                  stream=turn.streamed, generation_id=turn.generation_id,
                                  error="the process serving this turn stopped"))
    return TurnOutcome(status=Turn.Status.INTERRUPTED, content=turn.checkpoint, chunk_ends=turn.chunk_ends,
                       records=records, error_code="interrupted",
                       error_message="The process serving this turn stopped; closed by the sweep.")


@dataclasses.dataclass(frozen=True)
class SweepReport:
    interrupted: int
    holds_released: int


def sweep_lapsed_turns(*, now: datetime | None = None) -> SweepReport:
    """Close every running turn whose lease lapsed as `interrupted`, billed from its last
    checkpoint, and release holds left without a running turn.

    Idempotent, and safe in several processes at once: each turn is claimed with
    `SELECT ... FOR UPDATE SKIP LOCKED` and closed only if still running and lapsed, in its
    own transaction, through the same close_turn path as every other ending.
    """
    now = now or timezone.now()
    lapsed = Turn.objects.filter(status=Turn.Status.RUNNING, lease_until__lt=now)
    interrupted = failed = 0
    while True:
        ids = list(lapsed.order_by("lease_until").values_list("id", flat=True)[:SWEEP_BATCH])
        closed_before = interrupted
        for turn_id in ids:
            try:
                with sql.transaction():
                    turn = _lock_turn(turn_id, lapsed_before=now)
                    if turn is None:  # closed meanwhile, or another sweeper has it
                        continue
                    closing = _close_locked(turn, _interrupted(turn), price=None)
                closed = closing()
            except Exception:
                # One turn that cannot be closed (its model's price was deleted) must not stop
                # the others; it stays running, and in the log, until an operator fixes it.
                logger.exception("sweep: turn %s could not be closed", turn_id)
                failed += 1
                continue
            metrics.observe_closed_turn(closed.turn)  # committed; its calls were the dead process's
            interrupted += 1
        if len(ids) < SWEEP_BATCH or interrupted == closed_before or failed:
            break
    released = billing.release_holds_without_turn(
        live_turn_ids=Turn.objects.filter(status=Turn.Status.RUNNING).values("id"),
        created_before=now - timedelta(seconds=settings.PANTHEON_TURN_LEASE_SECONDS),
    )
    # Idempotency keys are kept 24 hours (SPEC section 11).
    IdempotencyKey.objects.filter(created_at__lt=now - IDEMPOTENCY_TTL).delete()
    return SweepReport(interrupted=interrupted, holds_released=released)
