"""The life of a turn, shared by the plain and the streaming endpoint.

    begin_turn()   one sync call before the model: auth, session, validation, context, hold
    (the model call: gateway.generate() or gateway.stream(), plain async code)
    record_turn()  one sync call at the end: turn, messages, usage, LLM events, debit and
                   hold release in one transaction.atomic, idempotent by turn id

Neither touches the database more than once per call site, so a streamed turn costs two
database round trips whatever its length.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from datetime import datetime
from decimal import Decimal
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import IntegrityError, transaction
from django.http import HttpRequest
from django.utils import timezone

from accounts.authentication import authenticate_request
from billing_app import selectors
from billing_app import services as billing
from billing_app.models import ModelPrice, UsageRecord
from files_app.services import FILE_READ_TOOL, read_file_for_tool, ready_files_for
from llm_gateway import CallRecord, ChatMessage, GatewayError, Usage
from llm_gateway.tokens import estimate_prompt_tokens, estimate_tokens
from sessions_app.models import ChatSession, LlmEvent, Message, Turn

# Most earlier messages looked at when building the context (the budget trims further).
HISTORY_LIMIT = 200
# What all file_read results of one turn may add up to (bounds the prompt growth the hold covers).
TOOL_OUTPUT_BUDGET_CHARS = 40_000


class TurnRejected(Exception):
    """The request cannot start a turn; nothing was stored and no credits were held."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail


@dataclasses.dataclass(frozen=True)
class TurnInput:
    content: str
    model: str | None
    tools_enabled: bool
    max_tokens: int | None


def parse_turn_input(body: bytes) -> TurnInput:
    """Validate a turn request body; raises TurnRejected(400, code) naming the problem."""
    try:
        data = json.loads(body or b"null")
    except (ValueError, UnicodeDecodeError):
        raise TurnRejected(400, "parse_error", "The body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise TurnRejected(400, "invalid_body", "The body must be a JSON object.")
    content = data.get("content")
    if not isinstance(content, str):
        raise TurnRejected(400, "invalid_content", "content is required and must be a string.")
    if not content.strip():
        raise TurnRejected(400, "empty_content", "content must not be empty.")
    if len(content) > settings.PANTHEON_MAX_MESSAGE_CHARS:
        raise TurnRejected(400, "content_too_long",
                           f"content is longer than {settings.PANTHEON_MAX_MESSAGE_CHARS} characters.")
    model = data.get("model")
    if model is not None and (not isinstance(model, str) or not model):
        raise TurnRejected(400, "invalid_model", "model must be a non-empty string.")
    tools_enabled = data.get("tools_enabled", False)
    if not isinstance(tools_enabled, bool):
        raise TurnRejected(400, "invalid_tools_enabled", "tools_enabled must be true or false.")
    max_tokens = data.get("max_tokens")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise TurnRejected(400, "invalid_max_tokens", "max_tokens must be a positive integer.")
    return TurnInput(content=content, model=model, tools_enabled=tools_enabled, max_tokens=max_tokens)


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
    """Everything decided before the model is called."""

    turn_id: uuid.UUID
    user_id: int
    session_id: uuid.UUID
    model: str
    content: str
    messages: list[ChatMessage]
    max_tokens: int
    price: ModelPrice
    streamed: bool
    tools_enabled: bool
    started_at: datetime
    prompt_estimate: int


def _tool_system_message(files: list[dict[str, Any]]) -> str:
    if not files:
        return "You can call file_read to read the user's uploaded files, but the user has no ready files."
    listing = "\n".join(f"- id {f['id']}: {f['filename']} ({f['size']} bytes)" for f in files)
    return ("You can call file_read to read the user's uploaded files. "
            f"The user's ready files:\n{listing}")


def begin_turn(request: HttpRequest, session_id: uuid.UUID, *, streamed: bool) -> PreparedTurn:
    """Everything before the model call, in order: 401, 404, 400, 422, 402.

    Sync, run in one `sync_to_async` call. Raises AuthFailure or TurnRejected.
    """
    user = authenticate_request(request)
    session = ChatSession.objects.filter(pk=session_id, user=user).first()
    if session is None:
        raise TurnRejected(404, "not_found", "Not found.")
    data = parse_turn_input(request.body)
    if streamed and data.tools_enabled:
        raise TurnRejected(422, "tools_not_supported_in_stream",
                           "Tools are not supported in streamed turns; use POST .../turns.")
    model = data.model or session.model
    try:
        price = billing.get_price(model)
    except billing.UnknownModel as exc:
        raise TurnRejected(400, "unknown_model", str(exc)) from None

    rounds, extra_system, tools = 1, "", None
    if data.tools_enabled:
        rounds = settings.PANTHEON_MAX_TOOL_ROUNDS + 1
        extra_system = _tool_system_message(ready_files_for(user.pk))
        tools = [FILE_READ_TOOL]
    messages = build_context(session, data.content, extra_system=extra_system)
    prompt_estimate = estimate_prompt_tokens(messages, tools)
    held_prompt = prompt_estimate
    if rounds > 1:
        # Round k resends the prompt plus what the loop added before it: at most all tool
        # results of the turn and k earlier outputs.
        tool_output = estimate_tokens("x" * TOOL_OUTPUT_BUDGET_CHARS)
        earlier_outputs = settings.PANTHEON_MAX_OUTPUT_TOKENS * rounds * (rounds - 1) // 2
        held_prompt = rounds * (prompt_estimate + tool_output) + earlier_outputs

    turn_id = uuid.uuid4()
    try:
        decision = billing.hold(user_id=user.pk, turn_id=turn_id, model=model, prompt_tokens=held_prompt,
                                max_tokens=data.max_tokens, rounds=rounds)
    except billing.InsufficientCredits as exc:
        raise TurnRejected(402, "insufficient_credits", str(exc)) from None
    return PreparedTurn(
        turn_id=turn_id, user_id=user.pk, session_id=session.pk, model=model, content=data.content,
        messages=messages, max_tokens=decision.max_tokens, price=price, streamed=streamed,
        tools_enabled=data.tools_enabled, started_at=timezone.now(), prompt_estimate=prompt_estimate,
    )


@dataclasses.dataclass
class TurnOutcome:
    """How the model call ended, as the relay or the plain endpoint saw it."""

    status: str  # Turn.Status
    content: str = ""
    usage: Usage | None = None  # as the provider reported it; None if it never did
    provider_model: str = ""
    records: list[CallRecord] = dataclasses.field(default_factory=list)
    tool_messages: list[ChatMessage] = dataclasses.field(default_factory=list)
    error_code: str = ""
    error_message: str = ""

    @classmethod
    def from_error(cls, exc: GatewayError, *, content: str = "", status: str = Turn.Status.FAILED) -> TurnOutcome:
        provider_model = next((r.provider_model for r in reversed(exc.records) if r.provider_model), "")
        return cls(status=status, content=content, usage=exc.usage, provider_model=provider_model,
                   records=list(exc.records), error_code=exc.code, error_message=exc.message)


@dataclasses.dataclass
class TurnResult:
    turn: Turn
    message: Message
    balance: Decimal


def settled_usage(prepared: PreparedTurn, outcome: TurnOutcome) -> Usage:
    """What the turn is billed for: the provider's count when it gave one. Without one, a
    failed turn is billed nothing, and any other turn an estimate from the text (marked)."""
    if outcome.usage is not None:
        return outcome.usage
    if outcome.status == Turn.Status.FAILED:
        return Usage(prompt_tokens=0, completion_tokens=0)
    completion = min(estimate_tokens(outcome.content), prepared.max_tokens)
    return Usage(prompt_tokens=prepared.prompt_estimate, completion_tokens=completion, estimated=True)


def _existing_result(turn_id: uuid.UUID) -> TurnResult | None:
    turn = Turn.objects.filter(pk=turn_id).first()
    if turn is None:
        return None
    message = turn.messages.filter(role=Message.Role.ASSISTANT).order_by("-position").first()
    return TurnResult(turn=turn, message=message, balance=selectors.current_balance(user_id=turn.user_id))


def record_turn(prepared: PreparedTurn, outcome: TurnOutcome) -> TurnResult:
    """Store a finished turn and pay for it, all at once. Idempotent by turn id: a second
    call (a late `finally`, a retry) returns what the first stored and changes nothing."""
    existing = _existing_result(prepared.turn_id)
    if existing is not None:
        return existing
    usage = settled_usage(prepared, outcome)
    cost = billing.compute_cost(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                                price=prepared.price)
    now = timezone.now()
    try:
        with transaction.atomic():
            turn = Turn.objects.create(
                id=prepared.turn_id, session_id=prepared.session_id, user_id=prepared.user_id,
                status=outcome.status, model=prepared.model, provider_model=outcome.provider_model,
                streamed=prepared.streamed, tools_enabled=prepared.tools_enabled,
                prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                usage_estimated=usage.estimated, cost=cost, error_code=outcome.error_code,
                error_message=outcome.error_message, created_at=prepared.started_at, finished_at=now,
            )
            common = {"session_id": prepared.session_id, "turn": turn, "user_id": prepared.user_id}
            rows = [Message(role=Message.Role.USER, content=prepared.content, position=0,
                            created_at=prepared.started_at, **common)]
            for extra in outcome.tool_messages:
                rows.append(Message(role=extra["role"], content=extra.get("content") or "",
                                    tool_calls=extra.get("tool_calls"), tool_call_id=extra.get("tool_call_id", ""),
                                    position=len(rows), created_at=now, **common))
            assistant = Message(role=Message.Role.ASSISTANT, content=outcome.content, position=len(rows),
                                created_at=now, **common)
            rows.append(assistant)
            Message.objects.bulk_create(rows)
            if usage.total_tokens:
                UsageRecord.objects.create(
                    user_id=prepared.user_id, session_id=prepared.session_id, turn_id=turn.id,
                    model=prepared.model, provider_model=outcome.provider_model,
                    prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                    total_tokens=usage.total_tokens, estimated=usage.estimated, cost=cost, created_at=now,
                )
            LlmEvent.objects.bulk_create([_event_row(r, prepared, turn) for r in outcome.records])
            ChatSession.objects.filter(pk=prepared.session_id).update(updated_at=now)
            balance = billing.settle(user_id=prepared.user_id, turn_id=turn.id, cost=cost,
                                     note=f"{outcome.status} turn")
    except IntegrityError:
        # Another call stored this turn between our check and our insert.
        existing = _existing_result(prepared.turn_id)
        if existing is None:
            raise
        return existing
    return TurnResult(turn=turn, message=assistant, balance=balance)


def _event_row(record: CallRecord, prepared: PreparedTurn, turn: Turn) -> LlmEvent:
    return LlmEvent(
        user_id=prepared.user_id, turn=turn, requested_model=record.requested_model,
        provider_model=record.provider_model, provider=record.provider, status=record.status,
        http_status=record.http_status, streamed=record.stream, latency_ms=record.latency_ms,
        ttft_ms=record.ttft_ms, prompt_tokens=record.usage.prompt_tokens if record.usage else None,
        completion_tokens=record.usage.completion_tokens if record.usage else None, error=record.error,
    )


def make_tool_executor(user_id: int):
    """The `file_read` tool for one turn: only this user's ready files, and at most
    TOOL_OUTPUT_BUDGET_CHARS of results in all (what the hold was sized for)."""
    left = TOOL_OUTPUT_BUDGET_CHARS

    async def execute(name: str, arguments: dict[str, Any]) -> str:
        nonlocal left
        if name != "file_read":
            return f"error: unknown tool {name!r}"
        if left <= 0:
            return "error: the file output budget of this turn is used up"
        result = await sync_to_async(read_file_for_tool)(user_id=user_id, arguments=arguments)
        result = result[:left]
        left -= len(result)
        return result

    return execute
