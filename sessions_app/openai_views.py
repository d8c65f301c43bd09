"""The OpenAI-compatible front door (SPEC section 14): `GET /v1/models` and
`POST /v1/chat/completions`, for any OpenAI SDK or tool with a Pantheon key.

A thin adapter: the body is parsed by `openai_format`, and the call is a turn like any
other, through the same lifecycle as the turn endpoints (`begin_turn` in the same preflight,
`run_plain_turn`, `open_live_turn` and the stream's producer, one close-time transaction,
reconciliation, `Idempotency-Key`). Only the rendering differs: OpenAI bodies, chunks and
errors. Calls land in the key's own session, `API: <key name or prefix>`.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncGenerator

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.db import InterfaceError, OperationalError
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils import timezone
from django.views.decorators.csrf import csrf_exempt

from accounts.authentication import request_key_hash
from accounts.models import ApiKey
from billing_app.models import ModelPrice
from core import sql
from core.db import db_call
from core.money import format_money
from llm_gateway import GatewayError, ToolCall, Usage
from sessions_app import openai_format as fmt
from sessions_app.live_turn import PersistenceFailed, start_turn
from sessions_app.models import ChatSession, Turn
from sessions_app.streaming import Heartbeat, LiveTurn, TurnStreamResponse
from sessions_app.turn_views import ended_result, idempotency, open_live_turn, run_plain_turn, with_headers
from sessions_app.turns import (
    AlreadyRequested,
    PreparedTurn,
    TurnInput,
    TurnRejected,
    TurnResult,
    begin_turn,
    find_repeat,
    load_preflight,
)

logger = logging.getLogger(__name__)

# A refusal of the turn preflight, as the OpenAI error it is (status, code).
_REJECTIONS = {
    "unknown_model": (404, "model_not_found"),
    "insufficient_credits": (402, "insufficient_credits"),
    "key_budget_exceeded": (402, "key_budget_exceeded"),
    "rate_limited": (429, "rate_limited"),
    "model_not_allowed": (403, "model_not_allowed"),
    "idempotency_key_reused": (422, "idempotency_key_reused"),
    "not_found": (404, "not_found"),
}
_BAD_KEY = fmt.OpenAIError(401, "invalid_api_key", "Incorrect or revoked API key.")


def _error(error: fmt.OpenAIError) -> JsonResponse:
    response = JsonResponse(error.body(), status=error.status)
    for name, value in (error.headers or {}).items():
        response[name] = value
    if error.status == 401:
        response["WWW-Authenticate"] = 'Bearer realm="api"'
    return response


def _rejected(exc: TurnRejected) -> fmt.OpenAIError:
    status, code = _REJECTIONS.get(exc.code, (400, exc.code))
    param = "model" if code in ("model_not_found", "model_not_allowed") else None
    return fmt.OpenAIError(status, code, exc.detail, param, headers=exc.headers)


def _key(request: HttpRequest) -> ApiKey:
    """The request's active API key (of an active user); raises the 401."""
    key_hash = request_key_hash(request)
    key = ApiKey.objects.active().select_related("user").filter(key_hash=key_hash).first() if key_hash else None
    if key is None or not key.user.is_active:
        raise _BAD_KEY
    return key


def _api_session_sql() -> str:
    session, key = sql.table(ChatSession), sql.table(ApiKey)
    columns = ", ".join(sql.column(ChatSession, name) for name in (
        "id", "user", "title", "model", "system_prompt", "api_key", "current_leaf", "title_requested",
        "created_at", "updated_at"))
    longest = ChatSession._meta.get_field("title").max_length
    title = f"SUBSTR('API: ' || COALESCE(NULLIF(k.name, ''), k.prefix), 1, {longest})"
    # ON CONFLICT: a racing first call of the same key made it (api_key is unique).
    return (f"INSERT INTO {session} ({columns}) SELECT %s, k.user_id, {title}, %s, '', k.id, NULL, %s, %s, %s "
            f"FROM {key} k WHERE k.key_hash = %s ON CONFLICT DO NOTHING")


def make_api_session(key_hash: str, model: str) -> None:
    """The key's session of OpenAI-compatible calls, made at its first call (a racing first
    call of the same key makes nothing: the other's is found). One plain INSERT, so the
    preflight it is part of stays on the event loop (core.db_on_loop: no ORM there); the
    caller has just found the key active."""
    now = timezone.now()
    sql.execute(_api_session_sql(), [sql.value(ChatSession, "id", uuid.uuid4()), model, False,
                                     sql.value(ChatSession, "created_at", now),
                                     sql.value(ChatSession, "updated_at", now), key_hash])


@db_call(on_loop=True)
def _preflight(request: HttpRequest, parsed: list[fmt.ChatRequest]) -> PreparedTurn:
    """Everything before the model call, in one database call: 401, 400, 404, 402. The
    parsed body is appended to `parsed`. Raises OpenAIError, or AlreadyRequested."""
    key_hash = request_key_hash(request)
    if not key_hash:
        raise _BAD_KEY
    try:
        chat = fmt.parse_chat_request(request.body)
    except fmt.OpenAIError:
        _key(request)  # a bad key is a 401 whatever the body
        raise
    parsed.append(chat)
    try:
        key = idempotency(request, "v1/chat/completions", chat.canonical())
    except TurnRejected as exc:
        raise _rejected(exc) from None
    # One read: the key, its user, its API session, the price, the wallet.
    preflight = load_preflight(session_id=None, model=chat.model, key_hash=key_hash)
    if preflight is not None and preflight.session is None:  # the key's first call
        make_api_session(key_hash, chat.model)
        preflight = load_preflight(session_id=None, model=chat.model, key_hash=key_hash)
    if preflight is None or preflight.session is None:
        raise _BAD_KEY
    try:
        if key is not None:
            earlier = find_repeat(preflight.user_id, *key)
            if earlier is not None:
                raise AlreadyRequested(earlier)
        params = {name: value for name, value in chat.passthrough.items() if name != "tools"}
        return begin_turn(preflight, TurnInput(
            content=chat.last_message_text, model=chat.model, max_tokens=chat.max_tokens, idempotency=key,
            context=chat.chat_messages(), params=params, client_tools=chat.tools, models=chat.models,
        ), streamed=chat.stream)
    except TurnRejected as exc:
        raise _rejected(exc) from None


async def _prepare(request: HttpRequest) -> tuple[fmt.ChatRequest, PreparedTurn | AlreadyRequested] | HttpResponse:
    if request.method != "POST":
        return _error(fmt.OpenAIError(405, "method_not_allowed", f"Method {request.method} not allowed."))
    parsed: list[fmt.ChatRequest] = []
    try:
        turn = await start_turn(lambda: _preflight(request, parsed))
        return parsed[0], turn
    except AlreadyRequested as exc:
        return parsed[0], exc
    except fmt.OpenAIError as exc:
        return _error(exc)
    except RequestDataTooBig:
        return _error(fmt.OpenAIError(413, "request_too_large", "The request body is too large."))
    except (OperationalError, InterfaceError):
        logger.exception("chat completions preflight: the database is unavailable")
        return _error(fmt.OpenAIError(503, "database_unavailable", "The service is briefly unavailable; try again."))


def _stored_tool_calls(result: TurnResult) -> list[ToolCall]:
    calls = (result.message.tool_calls if result.message else None) or []
    return [ToolCall(id=c["id"], name=c["function"]["name"], arguments=c["function"]["arguments"]) for c in calls]


def _served_model(turn: Turn) -> str:
    """The facade's `model`: the catalogue model that answered (SPEC sections 14, 15)."""
    return turn.served_model or turn.model


def _created(turn: Turn) -> int:
    return int(turn.created_at.timestamp())


def _usage(turn: Turn) -> Usage:
    return Usage(prompt_tokens=turn.prompt_tokens, completion_tokens=turn.completion_tokens)


def _failure(turn: Turn) -> fmt.OpenAIError:
    code = turn.error_code or "upstream_error"
    if code == "persistence_failed":
        return fmt.OpenAIError(503, code, turn.error_message)
    return fmt.OpenAIError(504 if code == "upstream_timeout" else 502, code, turn.error_message or "upstream error")


def _completion(result: TurnResult) -> HttpResponse:
    """The non-streaming answer of a closed turn (also of its repeats)."""
    turn = result.turn
    if turn.status == Turn.Status.FAILED:
        return _error(_failure(turn))
    body = fmt.completion_body(turn.id, _created(turn), _served_model(turn),
                               result.message.content if result.message else "", _stored_tool_calls(result),
                               turn.finish_reason or "stop", _usage(turn), turn.cost)
    response = JsonResponse(body)
    response["X-Pantheon-Turn-Id"] = str(turn.id)
    response["X-Pantheon-Cost"] = format_money(turn.cost)
    response["X-Pantheon-Balance"] = format_money(result.balance)
    return response


@csrf_exempt  # API keys only: no cookie is read
async def chat_completions(request: HttpRequest) -> HttpResponse:
    prepared = await _prepare(request)
    if isinstance(prepared, HttpResponse):
        return prepared
    chat, turn = prepared
    if isinstance(turn, AlreadyRequested):
        result = await ended_result(turn.turn_id)
        if result is None:
            return _error(fmt.OpenAIError(404, "not_found", "Not found."))
        if chat.stream:
            response = _stream_response(_stored_chunks(result, chat.include_usage))
            response["X-Pantheon-Turn-Id"] = str(result.turn.id)
            return response
        return _completion(result)
    return with_headers(await _answer(chat, turn), turn.rate_headers)


async def _answer(chat: fmt.ChatRequest, turn: PreparedTurn) -> HttpResponse:
    """The answer of a new call, streamed or not."""
    if not chat.stream:
        try:
            return _completion(await run_plain_turn(turn))
        except PersistenceFailed:
            return _error(_persistence_failed())
    try:
        live = await open_live_turn(turn)
    except PersistenceFailed:
        return _error(_persistence_failed())
    except GatewayError as exc:
        return _error(fmt.OpenAIError(504 if exc.code == "upstream_timeout" else 502, exc.code, exc.message))
    response = _stream_response(_live_chunks(live, chat.include_usage), on_close=live.requester_closed)
    response["X-Pantheon-Turn-Id"] = str(turn.turn_id)
    return response


def _persistence_failed() -> fmt.OpenAIError:
    return fmt.OpenAIError(503, "persistence_failed", "The call could not be stored yet; it will be closed and "
                                                      "billed from what was saved.")


def _stream_response(chunks: AsyncGenerator[bytes, None], *, on_close=None) -> TurnStreamResponse:
    return TurnStreamResponse(chunks, on_close=on_close)


def _ending_chunks(result: TurnResult, model: str, created: int, include_usage: bool, *,
                   tool_calls: bool) -> list[bytes]:
    """After the last delta: the finish chunk, the usage chunk if asked, `[DONE]`; or the
    one error line of a failed turn."""
    turn = result.turn
    if turn.status == Turn.Status.FAILED:
        return [fmt.error_line(_failure(turn))]
    reason = fmt.normalize_finish_reason(turn.finish_reason or "stop", tool_calls=tool_calls)
    lines = [fmt.chunk(turn.id, created, model, {}, reason)]
    if include_usage:
        lines.append(fmt.usage_chunk(turn.id, created, model, _usage(turn), turn.cost))
    lines.append(fmt.DONE)
    return lines




async def _live_chunks(live: LiveTurn, include_usage: bool) -> AsyncGenerator[bytes, None]:
    """The requester's chunks of a turn this process serves, live to its end; its client
    leaving cancels the turn (SPEC section 14), as on the turn stream."""
    prepared = live.prepared
    live.attach()
    live.requester_followed = True
    beat = Heartbeat(settings.PANTHEON_HEARTBEAT_SECONDS)
    created = int(time.time())
    model = live.served_model  # known before the first chunk: a fallback answered, or the model asked for
    tool_calls = False
    content = fmt.ContentChunks(prepared.turn_id, created, model)
    try:
        yield fmt.chunk(prepared.turn_id, created, model, fmt.role_delta())
        sent = 0
        while True:
            items = live.items
            if sent < len(items):
                lines = []  # what arrived since the last wake, in one write (as on the turn stream)
                for item in items[sent:]:
                    if item.__class__ is str:
                        lines.append(content(item))
                    else:
                        tool_calls = True
                        lines.append(fmt.chunk(prepared.turn_id, created, model, fmt.tool_call_delta(
                            item.index, id=item.id, name=item.name, arguments=item.arguments)))
                sent = len(items)
                yield b"".join(lines)
                beat.sent()
            if live.ending is not None:
                if live.result is None:
                    yield fmt.error_line(_persistence_failed())
                else:
                    for line in _ending_chunks(live.result, model, created, include_usage, tool_calls=tool_calls):
                        yield line
                return
            beat.waiter = live.wait()
            if await beat.waiter:
                yield fmt.ping()
                beat.sent()
    finally:
        beat.close()
        live.detach(requester=True)


async def _stored_chunks(result: TurnResult, include_usage: bool) -> AsyncGenerator[bytes, None]:
    """A repeated streamed call (the same Idempotency-Key): the first call's answer, as
    chunks, once its turn ended."""
    turn = result.turn
    created, model = _created(turn), _served_model(turn)
    yield fmt.chunk(turn.id, created, model, fmt.role_delta())
    content = result.message.content if result.message else ""
    if content:
        yield fmt.chunk(turn.id, created, model, fmt.content_delta(content))
    calls = _stored_tool_calls(result)
    for index, call in enumerate(calls):
        yield fmt.chunk(turn.id, created, model, fmt.tool_call_delta(index, id=call.id, name=call.name,
                                                                      arguments=call.arguments))
    for line in _ending_chunks(result, model, created, include_usage, tool_calls=bool(calls)):
        yield line


@db_call
def _models(request: HttpRequest) -> dict:
    key = _key(request)
    prices = ModelPrice.objects.order_by("model")
    if key.allowed_models is not None:  # SPEC section 16: only what the key may use
        prices = prices.filter(model__in=key.allowed_models)
    prices = list(prices.values_list("model", "updated_at"))
    created = int(min((updated for _, updated in prices), default=timezone.now()).timestamp())
    return fmt.models_list([model for model, _ in prices], created)


@csrf_exempt
async def models(request: HttpRequest) -> HttpResponse:
    if request.method != "GET":
        return _error(fmt.OpenAIError(405, "method_not_allowed", f"Method {request.method} not allowed."))
    try:
        return JsonResponse(await _models(request))
    except fmt.OpenAIError as exc:
        return _error(exc)


@csrf_exempt
async def not_found(request: HttpRequest, path: str = "") -> HttpResponse:
    """Any other path under /v1/: an OpenAI error body, not Django's page."""
    return _error(fmt.OpenAIError(404, "not_found", f"Unknown path /v1/{path[:100]}."))

