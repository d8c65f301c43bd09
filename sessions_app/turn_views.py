"""The two endpoints that talk to the model. Plain async views: DRF has no async views,
and the request must not hold a thread while it waits on the provider."""

import asyncio
import uuid

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt

from core.db import db_call
from core.errors import AuthFailure, error_response
from core.money import format_money
from files_app.services import FILE_READ_TOOL
from llm_gateway import GatewayError, get_gateway
from sessions_app.models import Turn
from sessions_app.serializers import MessageSerializer, turn_data, turn_usage
from sessions_app.streaming import relay
from sessions_app.turns import PreparedTurn, TurnOutcome, TurnRejected, begin_turn, make_tool_executor, record_turn
from sessions_app.views import SessionTurnsView

_list_turns = db_call(SessionTurnsView.as_view())
_begin_turn = db_call(begin_turn)
_record_turn = db_call(record_turn)


async def _prepare(request: HttpRequest, session_id: uuid.UUID, *, streamed: bool) -> PreparedTurn | HttpResponse:
    if request.method != "POST":
        return error_response(405, "method_not_allowed", f"Method {request.method} not allowed.")
    try:
        return await _begin_turn(request, session_id, streamed=streamed)
    except AuthFailure as exc:
        return exc.response()
    except TurnRejected as exc:
        return error_response(exc.status, exc.code, exc.detail)


def _upstream_failure(exc: GatewayError, turn_id: uuid.UUID) -> JsonResponse:
    status = 504 if exc.code == "upstream_timeout" else 502
    return JsonResponse({"detail": exc.message, "code": exc.code, "turn_id": str(turn_id)}, status=status)


@csrf_exempt  # CSRF is checked in authenticate_request for cookie sessions; keys need none
async def turns(request: HttpRequest, session_id: uuid.UUID) -> HttpResponse:
    """GET: the session's turns (a page). POST: run one non-streaming turn."""
    if request.method == "GET":
        return await _list_turns(request, session_id=session_id)
    prepared = await _prepare(request, session_id, streamed=False)
    if isinstance(prepared, HttpResponse):
        return prepared
    tools = executor = None
    if prepared.tools_enabled:
        tools, executor = [FILE_READ_TOOL], make_tool_executor(prepared.user_id)
    try:
        completion = await get_gateway().generate(
            model=prepared.model, messages=prepared.messages, max_tokens=prepared.max_tokens,
            tools=tools, tool_executor=executor, max_tool_rounds=settings.PANTHEON_MAX_TOOL_ROUNDS,
        )
    except GatewayError as exc:
        await _record_turn(prepared, TurnOutcome.from_error(exc))
        return _upstream_failure(exc, prepared.turn_id)
    except asyncio.CancelledError:
        # The client went away mid-call: the provider bills the request anyway, so store
        # the turn as cancelled with an estimate rather than leave its hold to expire.
        await asyncio.shield(_record_turn(prepared, TurnOutcome(status=Turn.Status.CANCELLED)))
        raise
    outcome = TurnOutcome(status=Turn.Status.COMPLETED, content=completion.content, usage=completion.usage,
                          provider_model=completion.provider_model, records=completion.records,
                          tool_messages=completion.tool_messages)
    result = await _record_turn(prepared, outcome)
    return JsonResponse({
        "turn": turn_data(result.turn),
        "message": MessageSerializer(result.message).data,
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
    try:
        # Opened before the response starts: a provider that fails at once gets a JSON error.
        ctx = await get_gateway().stream(model=prepared.model, messages=prepared.messages,
                                         max_tokens=prepared.max_tokens)
    except GatewayError as exc:
        await _record_turn(prepared, TurnOutcome.from_error(exc))
        return _upstream_failure(exc, prepared.turn_id)
    response = StreamingHttpResponse(relay(prepared, ctx, record=_record_turn),
                                     content_type="text/event-stream; charset=utf-8")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"
    return response
