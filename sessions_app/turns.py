"""The life of a turn, in the database. Every front door (the plain and the streaming turn
endpoint) goes through these, and nothing here knows of HTTP:

    begin_turn()          the preflight, one transaction: hold, the `running` turn row with
                          its lease, the user message
    renew_turn()          while the model call runs: one UPDATE extending the lease (and so
                          the hold) and saving the partial answer
    close_turn()          however the turn ends: the one close-time transaction (turn,
                          messages, usage, LLM events, debit, hold release); idempotent
    sweep_lapsed_turns()  closes turns whose lease lapsed (their process died) as
                          `interrupted`, through close_turn()

All are sync; async callers use `core.db.db_call` (sessions_app.live_turn does).
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Model
from django.utils import timezone

from billing_app import selectors
from billing_app import services as billing
from billing_app.models import ModelPrice, UsageRecord
from core.text import clean_text
from files_app.services import FILE_READ_TOOL, ready_files_for
from files_app.tools import TOOL_OUTPUT_BUDGET_CHARS
from llm_gateway import CallRecord, ChatMessage, GatewayError, Usage
from llm_gateway.tokens import estimate_prompt_tokens
from sessions_app.models import ChatSession, LlmEvent, Message, Turn

logger = logging.getLogger(__name__)

# Most earlier messages looked at when building the context (the budget trims further).
HISTORY_LIMIT = 200
# Lapsed turns closed per sweep transaction batch.
SWEEP_BATCH = 100


class TurnRejected(Exception):
    """The request cannot start a turn; nothing was stored and no credits were held.
    `code` says why (`not_found`, `insufficient_credits`, `unknown_model`, ...); the view
    layer maps it to a status."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code, self.detail = code, detail


@dataclasses.dataclass(frozen=True)
class TurnInput:
    content: str
    model: str | None = None
    tools_enabled: bool = False
    max_tokens: int | None = None


def owned_session(*, user, session_id: uuid.UUID) -> ChatSession:
    """The user's session, or TurnRejected("not_found") (someone else's is missing too)."""
    session = ChatSession.objects.filter(pk=session_id, user=user).first()
    if session is None:
        raise TurnRejected("not_found", "Not found.")
    return session


def build_context(session: ChatSession, content: str, *, extra_system: str = "") -> list[ChatMessage]:
    """The messages sent upstream: system prompt, earlier messages (oldest dropped first to
    fit PANTHEON_CONTEXT_BUDGET_TOKENS), then the new user message. One query."""
    head: list[ChatMessage] = []
    if session.system_prompt:
        head.append({"role": "system", "content": session.system_prompt})
    if extra_system:
        head.append({"role": "system", "content": extra_system})
    tail: list[ChatMessage] = [{"role": "user", "content": content}]
    budget = settings.PANTHEON_CONTEXT_BUDGET_TOKENS - estimate_prompt_tokens(head + tail)
    earlier: list[ChatMessage] = []
    recent = (
        Message.objects.filter(session=session, role__in=[Message.Role.USER, Message.Role.ASSISTANT])
        .exclude(content="")
        .order_by("-created_at", "-position")
        .values_list("role", "content")[:HISTORY_LIMIT]
    )
    for role, text in recent:  # newest first, so the oldest are the ones left out
        cost = estimate_prompt_tokens([{"role": role, "content": text}])
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
    price: ModelPrice
    tools: list[dict[str, Any]] | None


def _tool_system_message(files: list[dict[str, Any]]) -> str:
    if not files:
        return "You can call file_read to read the user's uploaded files, but the user has no ready files."
    listing = "\n".join(f"- id {f['id']}: {f['filename']} ({f['size']} bytes)" for f in files)
    return ("You can call file_read to read the user's uploaded files. "
            f"The user's ready files:\n{listing}")


def _rounds(tools_enabled: bool) -> int:
    """Model calls a turn may make: tool rounds, then the answer."""
    return settings.PANTHEON_MAX_TOOL_ROUNDS + 1 if tools_enabled else 1


def _lease_from(now: datetime) -> datetime:
    return now + timedelta(seconds=settings.PANTHEON_TURN_LEASE_SECONDS)


def begin_turn(*, user, session: ChatSession, request: TurnInput, streamed: bool) -> PreparedTurn:
    """The preflight after authentication and the session lookup: 422, 400, then 402.

    One transaction takes the hold and creates the `running` turn (with its lease) and the
    user message, so from here on the turn cannot be lost: whoever ends it, and the sweep
    if nobody does, goes through close_turn(). Raises TurnRejected.
    """
    if streamed and request.tools_enabled:
        raise TurnRejected("tools_not_supported_in_stream",
                           "Tools are not supported in streamed turns; use POST .../turns.")
    model = request.model or session.model
    try:
        price = billing.get_price(model)
    except billing.UnknownModel as exc:
        raise TurnRejected("unknown_model", str(exc)) from None

    rounds, extra_system, tools = _rounds(request.tools_enabled), "", None
    if request.tools_enabled:
        extra_system = _tool_system_message(ready_files_for(user.pk))
        tools = [FILE_READ_TOOL]
    messages = build_context(session, request.content, extra_system=extra_system)
    prompt_estimate = estimate_prompt_tokens(messages, tools)
    held_prompt = billing.tool_turn_prompt_tokens(prompt_estimate, rounds=rounds,
                                                  tool_output_chars=TOOL_OUTPUT_BUDGET_CHARS)
    turn_id = uuid.uuid4()
    now = timezone.now()
    try:
        with transaction.atomic():
            decision = billing.hold(user_id=user.pk, turn_id=turn_id, model=model, prompt_tokens=held_prompt,
                                    max_tokens=request.max_tokens, rounds=rounds, price=price)
            turn = Turn.objects.create(
                id=turn_id, session=session, user=user, status=Turn.Status.RUNNING, model=model,
                streamed=streamed, tools_enabled=request.tools_enabled, max_tokens=decision.max_tokens,
                prompt_tokens=prompt_estimate, usage_estimated=True, lease_until=_lease_from(now),
                created_at=now,
            )
            Message.objects.create(session=session, turn=turn, user=user, role=Message.Role.USER,
                                   content=request.content, position=0, created_at=now)
    except billing.InsufficientCredits as exc:
        raise TurnRejected("insufficient_credits", str(exc)) from None
    return PreparedTurn(
        turn_id=turn_id, user_id=user.pk, session_id=session.pk, model=model, messages=messages,
        max_tokens=decision.max_tokens, price=price, tools=tools,
    )


def renew_turn(turn_id: uuid.UUID, *, checkpoint: str | None = None) -> bool:
    """Extend a running turn's lease (its hold lives as long) and, if given, save the partial
    answer. One UPDATE. False when the turn is no longer running (someone else closed it)."""
    fields: dict[str, Any] = {"lease_until": _lease_from(timezone.now())}
    if checkpoint is not None:
        fields["checkpoint"] = checkpoint
    return Turn.objects.filter(pk=turn_id, status=Turn.Status.RUNNING).update(**fields) == 1


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

    @classmethod
    def from_error(cls, exc: GatewayError, *, content: str = "", status: str = Turn.Status.FAILED) -> TurnOutcome:
        provider_model = next((r.provider_model for r in reversed(exc.records) if r.provider_model), "")
        return cls(status=status, content=content, usage=exc.usage, provider_model=provider_model,
                   records=list(exc.records), error_code=exc.code, error_message=exc.message)


@dataclasses.dataclass
class TurnResult:
    turn: Turn
    message: Message | None
    balance: Decimal


def _fit(model: type[Model], field: str, value: str) -> str:
    """Provider text for a column: storable, and cut to the column's length."""
    value = clean_text(value or "")
    limit = model._meta.get_field(field).max_length
    return value[:limit] if limit else value


def _stored_result(turn: Turn) -> TurnResult:
    message = turn.messages.filter(role=Message.Role.ASSISTANT).order_by("-position").first()
    return TurnResult(turn=turn, message=message, balance=selectors.current_balance(user_id=turn.user_id))


def close_turn(turn_id: uuid.UUID, outcome: TurnOutcome, *, price: ModelPrice | None = None) -> TurnResult:
    """End a turn and pay for it, all in one transaction. Idempotent: a turn that is no
    longer running (closed by another process, the sweep, a retry) is returned as stored.

    Lock order everywhere: the turn row, then the wallet row.
    """
    with transaction.atomic():
        turn = Turn.objects.select_for_update().filter(pk=turn_id).first()
        if turn is None:
            raise Turn.DoesNotExist(f"no turn {turn_id}")
        if turn.status != Turn.Status.RUNNING:
            return _stored_result(turn)
        return _close_locked(turn, outcome, price=price)


def _close_locked(turn: Turn, outcome: TurnOutcome, *, price: ModelPrice | None) -> TurnResult:
    price = price or billing.get_price(turn.model)
    content = clean_text(outcome.content)
    usage = billing.usage_to_bill(reported=outcome.usage, text=content, prompt_estimate=turn.prompt_tokens,
                                  output_cap=turn.max_tokens * _rounds(turn.tools_enabled),
                                  prompt_processed=outcome.prompt_processed)
    cost = billing.compute_cost(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                                price=price)
    now = timezone.now()
    provider_model = _fit(Turn, "provider_model", outcome.provider_model)
    turn.status = outcome.status
    turn.provider_model = provider_model
    turn.prompt_tokens, turn.completion_tokens = usage.prompt_tokens, usage.completion_tokens
    turn.usage_estimated = usage.estimated
    turn.cost = cost
    turn.finish_reason = _fit(Turn, "finish_reason", outcome.finish_reason)
    turn.error_code = _fit(Turn, "error_code", outcome.error_code)
    turn.error_message = clean_text(outcome.error_message)
    turn.lease_until = None
    turn.checkpoint = ""
    turn.finished_at = now
    turn.save()

    common = {"session_id": turn.session_id, "turn": turn, "user_id": turn.user_id, "created_at": now}
    rows = []
    for extra in outcome.tool_messages:
        rows.append(Message(role=extra["role"], content=clean_text(extra.get("content") or ""),
                            tool_calls=extra.get("tool_calls"),
                            tool_call_id=_fit(Message, "tool_call_id", extra.get("tool_call_id", "")),
                            position=len(rows) + 1, **common))
    assistant = Message(role=Message.Role.ASSISTANT, content=content, position=len(rows) + 1, **common)
    rows.append(assistant)
    Message.objects.bulk_create(rows)
    if usage.total_tokens:
        UsageRecord.objects.create(
            user_id=turn.user_id, session_id=turn.session_id, turn_id=turn.id, model=turn.model,
            provider_model=provider_model, prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens, total_tokens=usage.total_tokens,
            estimated=usage.estimated, cost=cost, created_at=now,
        )
    LlmEvent.objects.bulk_create([_event_row(record, turn) for record in outcome.records])
    ChatSession.objects.filter(pk=turn.session_id).update(updated_at=now)
    balance = billing.settle(user_id=turn.user_id, turn_id=turn.id, cost=cost, note=f"{outcome.status} turn")
    return TurnResult(turn=turn, message=assistant, balance=balance)


def _event_row(record: CallRecord, turn: Turn) -> LlmEvent:
    return LlmEvent(
        user_id=turn.user_id, turn=turn, requested_model=_fit(LlmEvent, "requested_model", record.requested_model),
        provider_model=_fit(LlmEvent, "provider_model", record.provider_model),
        provider=_fit(LlmEvent, "provider", record.provider), status=_fit(LlmEvent, "status", record.status),
        http_status=record.http_status, streamed=record.stream, latency_ms=record.latency_ms,
        ttft_ms=record.ttft_ms, prompt_tokens=record.usage.prompt_tokens if record.usage else None,
        completion_tokens=record.usage.completion_tokens if record.usage else None,
        error=clean_text(record.error),
    )


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
                with transaction.atomic():
                    turn = lapsed.select_for_update(skip_locked=True).filter(pk=turn_id).first()
                    if turn is None:  # closed meanwhile, or another sweeper has it
                        continue
                    _close_locked(turn, TurnOutcome(
                        status=Turn.Status.INTERRUPTED, content=turn.checkpoint, error_code="interrupted",
                        error_message="The process serving this turn stopped; closed by the sweep.",
                    ), price=None)
            except Exception:
                # One turn that cannot be closed (its model's price was deleted) must not stop
                # the others; it stays running, and in the log, until an operator fixes it.
                logger.exception("sweep: turn %s could not be closed", turn_id)
                failed += 1
                continue
            interrupted += 1
        if len(ids) < SWEEP_BATCH or interrupted == closed_before or failed:
            break
    released = billing.release_holds_without_turn(
        live_turn_ids=Turn.objects.filter(status=Turn.Status.RUNNING).values("id"),
        created_before=now - timedelta(seconds=settings.PANTHEON_TURN_LEASE_SECONDS),
    )
    return SweepReport(interrupted=interrupted, holds_released=released)
