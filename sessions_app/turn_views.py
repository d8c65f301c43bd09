"""The two endpoints that talk to the model. Plain async views: DRF has no async views,
and the request must not hold a thread while it waits on the provider.

The view layer authenticates, parses the body and maps refusals to statuses; the turn's
life is sessions_app.turns (database) and sessions_app.live_turn (while the model runs).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from django.conf import settings
from django.db import InterfaceError, OperationalError
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from accounts.authentication import request_key_hash, session_user
from core.db import db_call
from core.errors import AuthFailure, error_response
from core.json_body import InvalidJson, load_json
from core.money import format_money
from core.text import find_unstorable
from files_app.tools import make_file_read_executor
from llm_gateway import GatewayError, get_gateway
from sessions_app.live_turn import LeaseKeeper, PersistenceFailed, finish_turn, in_background, start_turn
from sessions_app.models import Turn
from sessions_app.serializers import MessageSerializer, turn_data, turn_usage
from sessions_app.streaming import Relay, TurnStreamResponse
from sessions_app.turns import PreparedTurn, TurnInput, TurnOutcome, TurnRejected, begin_turn, load_preflight
from sessions_app.views import SessionTurnsView

logger = logging.getLogger(__name__)
_list_turns = db_call(SessionTurnsView.as_view())

# Refusals that are not a plain 400.
REJECTION_STATUS = {"not_found": 404, "insufficient_credits": 402, "tools_not_supported_in_stream": 422}


def _refuse_unstorable(name: str, value: str) -> None:
    if find_unstorable(value) >= 0:
        raise TurnRejected("invalid_text", f"{name} contains a NUL character or an unpaired surrogate.")


def parse_turn_input(body: bytes) -> TurnInput:
    """Validate a turn request body; raises TurnRejected naming the problem (a 400)."""
    try:
        data = load_json(body)
    except InvalidJson as exc:
        raise TurnRejected(exc.code, exc.detail) from None
    if not isinstance(data, dict):
        raise TurnRejected("invalid_body", "The body must be a JSON object.")
    content = data.get("content")
    if not isinstance(content, str):
        raise TurnRejected("invalid_content", "content is required and must be a string.")
    if not content.strip():
        raise TurnRejected("empty_content", "content must not be empty.")
    if len(content) > settings.PANTHEON_MAX_MESSAGE_CHARS:
        raise TurnRejected("content_too_long",
                           f"content is longer than {settings.PANTHEON_MAX_MESSAGE_CHARS} characters.")
    _refuse_unstorable("content", content)
    model = data.get("model")
    if model is not None:
        if not isinstance(model, str) or not model:
            raise TurnRejected("invalid_model", "model must be a non-empty string.")
        _refuse_unstorable("model", model)
    tools_enabled = data.get("tools_enabled", False)
    if not isinstance(tools_enabled, bool):
        raise TurnRejected("invalid_tools_enabled", "tools_enabled must be true or false.")
    max_tokens = data.get("max_tokens")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise TurnRejected("invalid_max_tokens", "max_tokens must be a positive integer.")
    return TurnInput(content=content, model=model, tools_enabled=tools_enabled, max_tokens=max_tokens)


@db_call
def _preflight(request: HttpRequest, session_id: uuid.UUID, streamed: bool) -> PreparedTurn:
    """Everything before the model call, in one database call and in this order: 401, 404,
    400, 422, 402. Raises AuthFailure or TurnRejected."""
    try:
        data, problem = parse_turn_input(request.body), None
    except TurnRejected as exc:  # reported after 401 and 404
        data, problem = None, exc
    model = data.model if data is not None else None
    key_hash = request_key_hash(request)
    if key_hash is None:  # no key: the browser session (CSRF-checked)
        user = session_user(request)
        preflight = load_preflight(session_id=session_id, model=model, user_id=user.pk)
    else:
        preflight = load_preflight(session_id=session_id, model=model, key_hash=key_hash) if key_hash else None
        if preflight is None:
            raise AuthFailure("Invalid or revoked API key.", code="authentication_failed")
    if preflight.session is None:
        raise TurnRejected("not_found", "Not found.")
    if problem is not None:
        raise problem
    return begin_turn(preflight, data, streamed=streamed)


async def _prepare(request: HttpRequest, session_id: uuid.UUID, *, streamed: bool) -> PreparedTurn | HttpResponse:
    if request.method != "POST":
        return error_response(405, "method_not_allowed", f"Method {request.method} not allowed.")
    try:
        return await start_turn(lambda: _preflight(request, session_id, streamed))
    except AuthFailure as exc:
        return exc.response()
    except TurnRejected as exc:
        return error_response(REJECTION_STATUS.get(exc.code, 400), exc.code, exc.detail)
    except (OperationalError, InterfaceError):
        # The database is unreachable (or the pool exhausted): nothing was held or stored.
        logger.exception("turn preflight: the database is unavailable")
        return error_response(503, "database_unavailable", "The service is briefly unavailable; try again.")


def _upstream_failure(exc: GatewayError, turn_id: uuid.UUID) -> JsonResponse:
    status = 504 if exc.code == "upstream_timeout" else 502
    return JsonResponse({"detail": exc.message, "code": exc.code, "turn_id": str(turn_id)}, status=status)


def _persistence_failure(turn_id: uuid.UUID) -> JsonResponse:
    return JsonResponse({"detail": "The turn could not be stored yet; it will be closed and billed from what "
                                   "was saved.", "code": "persistence_failed", "turn_id": str(turn_id)}, status=503)


async def _finish_shielded(prepared: PreparedTurn, outcome: TurnOutcome):
    return await asyncio.shield(in_background(finish_turn(prepared, outcome)))


@csrf_exempt  # CSRF is checked in session_user for cookie sessions; keys need none
async def turns(request: HttpRequest, session_id: uuid.UUID) -> HttpResponse:
    """GET: the session's turns (a page). POST: run one non-streaming turn."""
    if request.method == "GET":
        return await _list_turns(request, session_id=session_id)
    prepared = await _prepare(request, session_id, streamed=False)
    if isinstance(prepared, HttpResponse):
        return prepared
    executor = make_file_read_executor(prepared.user_id) if prepared.tools else None
    keeper = LeaseKeeper(prepared.turn_id).start()
    try:
        async with asyncio.timeout(settings.PANTHEON_MAX_TURN_SECONDS):
            completion = await get_gateway().generate(
                model=prepared.model, messages=prepared.messages, max_tokens=prepared.max_tokens,
                tools=prepared.tools, tool_executor=executor, max_tool_rounds=settings.PANTHEON_MAX_TOOL_ROUNDS,
            )
    except GatewayError as exc:
        outcome = TurnOutcome.from_error(exc)
    except TimeoutError:
        # A provider that keeps the connection alive without answering must not hold the
        # turn forever; it had the prompt, so that is billed (an estimate).
        outcome = TurnOutcome(status=Turn.Status.FAILED, error_code="upstream_timeout", prompt_processed=True,
                              error_message=f"The answer took longer than {settings.PANTHEON_MAX_TURN_SECONDS:g} "
                                            "seconds.")
    except asyncio.CancelledError:
        # The client went away mid-call: the provider bills the request anyway, so store
        # the turn as cancelled with an estimate of the prompt.
        in_background(finish_turn(prepared, TurnOutcome(status=Turn.Status.CANCELLED, prompt_processed=True)))
        raise
    else:
        outcome = TurnOutcome(status=Turn.Status.COMPLETED, content=completion.content, usage=completion.usage,
                              provider_model=completion.provider_model, records=completion.records,
                              tool_messages=completion.tool_messages, finish_reason=completion.finish_reason,
                              prompt_processed=True)
    finally:
        await keeper.stop()
    try:
        result = await _finish_shielded(prepared, outcome)
    except PersistenceFailed:
        return _persistence_failure(prepared.turn_id)
    if result.turn.status == Turn.Status.FAILED:
        code = result.turn.error_code or "upstream_error"
        return JsonResponse({"detail": result.turn.error_message, "code": code, "turn_id": str(prepared.turn_id)},
                            status=504 if code == "upstream_timeout" else 502)
    # What is returned is what was stored (if the turn was closed elsewhere meanwhile, that).
    return JsonResponse({
        "turn": turn_data(result.turn),
        "message": MessageSerializer(result.message).data if result.message else None,
        "usage": turn_usage(result.turn),
        "cost": format_money(result.turn.cost),
        "balance": format_money(result.balance),
    }, status=201)


@csrf_exempt
async def stream_turn(request: HttpRequest, session_id: uuid.UUID) -> HttpResponse:
    """One turn streamed as Server-Sent Events (SPEC section 5)."""
    prepared = await _prepare(request, session_id, streamed=True)
    if isinstance(prepared, HttpResponse):
        return prepared
    # Opened before the response starts, so a provider that fails at once gets a JSON error;
    # the lease is kept while retries wait.
    deadline = time.monotonic() + settings.PANTHEON_MAX_TURN_SECONDS
    keeper = LeaseKeeper(prepared.turn_id).start()
    try:
        ctx = await get_gateway().stream(model=prepared.model, messages=prepared.messages,
                                         max_tokens=prepared.max_tokens)
    except GatewayError as exc:
        await keeper.stop()
        try:
            await _finish_shielded(prepared, TurnOutcome.from_error(exc))
        except PersistenceFailed:
            return _persistence_failure(prepared.turn_id)
        return _upstream_failure(exc, prepared.turn_id)
    except asyncio.CancelledError:
        # The client left while the upstream was being opened or retried: nothing was
        # produced, so the cancelled turn costs nothing.
        await keeper.stop()
        in_background(finish_turn(prepared, TurnOutcome(status=Turn.Status.CANCELLED)))
        raise
    await keeper.stop()
    return TurnStreamResponse(Relay(prepared, ctx, deadline=deadline))
