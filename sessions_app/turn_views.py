"""The endpoints that talk to the model or follow a turn while it runs (SPEC sections 5,
11, 12). Plain async views: DRF has no async views, and the request must not hold a thread
while it waits on the provider.

The view layer authenticates, parses the body and maps refusals to statuses; the turn's
life is sessions_app.turns (database) and sessions_app.live_turn (while the model runs).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import uuid

from django.conf import settings
from django.db import InterfaceError, OperationalError
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from accounts.authentication import parse_bearer, request_key_hash, session_user, user_for_key
from core.db import db_call
from core.errors import AuthFailure, error_response
from core.json_body import InvalidJson, load_json
from core.money import format_money
from core.text import find_unstorable
from files_app.tools import make_file_read_executor
from llm_gateway import GatewayError, UpstreamTimeout, routing
from sessions_app import turn_signals
from sessions_app.live_turn import (
    LeaseKeeper,
    PersistenceFailed,
    done_serving,
    finish_turn,
    in_background,
    serve_locally,
    start_turn,
    stop_local,
)
from sessions_app.models import Turn
from sessions_app.openai_format import MAX_MODELS
from sessions_app.serializers import MessageSerializer, turn_data, turn_usage
from sessions_app.streaming import LiveTurn, TurnStreamResponse, follow, stream_response
from sessions_app.turns import (
    AlreadyRequested,
    PreparedTurn,
    TurnInput,
    TurnOutcome,
    TurnRejected,
    TurnResult,
    begin_turn,
    find_repeat,
    load_preflight,
    replay_result,
    request_cancel,
    turn_progress,
)
from sessions_app.views import SessionTurnsView

logger = logging.getLogger(__name__)
_list_turns = db_call(SessionTurnsView.as_view())

# Refusals that are not a plain 400.
REJECTION_STATUS = {"not_found": 404, "insufficient_credits": 402, "tools_not_supported_in_stream": 422,
                    "idempotency_key_reused": 422, "key_budget_exceeded": 402, "rate_limited": 429,
                    "model_not_allowed": 403}
# How often a repeated non-streaming request looks whether the first one's turn ended.
REPEAT_POLL_SECONDS = 0.2


def with_headers(response: HttpResponse, headers: dict[str, str]) -> HttpResponse:
    """`response` with `headers` (a key's `x-ratelimit-*`, SPEC section 16) set on it."""
    for name, value in headers.items():
        response[name] = value
    return response


def _refuse_unstorable(name: str, value: str) -> None:
    if find_unstorable(value) >= 0:
        raise TurnRejected("invalid_text", f"{name} contains a NUL character or an unpaired surrogate.")


def idempotency(request: HttpRequest, endpoint: str, canonical_body: str) -> tuple[str, str] | None:
    """(key, fingerprint of this request: the endpoint and its canonical body) when an
    Idempotency-Key came (SPEC section 11); TurnRejected (400) if it is malformed. Every
    front door's."""
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not 1 <= len(key) <= 200 or not all(" " <= ch <= "~" for ch in key):
        raise TurnRejected("invalid_idempotency_key", "Idempotency-Key must be 1 to 200 printable ASCII characters.")
    return key, hashlib.sha256(f"{endpoint}\n{canonical_body}".encode()).hexdigest()


def _idempotency(request: HttpRequest, session_id: uuid.UUID, data: dict, *, streamed: bool) -> tuple[str, str] | None:
    body = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return idempotency(request, "stream" if streamed else "turns", f"{session_id}\n{body}")


def parse_turn_input(body: bytes, request: HttpRequest | None = None, session_id: uuid.UUID | None = None, *,
                     streamed: bool = False) -> TurnInput:
    """Validate a turn request body (and its Idempotency-Key); raises TurnRejected naming
    the problem (a 400)."""
    try:
        data = load_json(body)
    except InvalidJson as exc:
        raise TurnRejected(exc.code, exc.detail) from None
    if not isinstance(data, dict):
        raise TurnRejected("invalid_body", "The body must be a JSON object.")
    parent_given = "parent_id" in data
    parent_id = _parent_id(data.get("parent_id")) if parent_given else None
    content = data.get("content")
    if content is None and parent_id is not None:
        pass  # a regenerate: a new answer to the user message `parent_id` (SPEC section 17)
    elif not isinstance(content, str):
        raise TurnRejected("invalid_content", "content is required and must be a string (without it, "
                                              "parent_id names the user message to answer again).")
    elif not content.strip():
        raise TurnRejected("empty_content", "content must not be empty.")
    elif len(content) > settings.PANTHEON_MAX_MESSAGE_CHARS:
        raise TurnRejected("content_too_long",
                           f"content is longer than {settings.PANTHEON_MAX_MESSAGE_CHARS} characters.")
    else:
        _refuse_unstorable("content", content)
    model = data.get("model")
    if model is not None:
        if not isinstance(model, str) or not model:
            raise TurnRejected("invalid_model", "model must be a non-empty string.")
        _refuse_unstorable("model", model)
    models = _models(data.get("models", None), present="models" in data)
    if model is None and models:
        model = models[0]  # SPEC section 15: without `model`, the list's first is the one asked for
    tools_enabled = data.get("tools_enabled", False)
    if not isinstance(tools_enabled, bool):
        raise TurnRejected("invalid_tools_enabled", "tools_enabled must be true or false.")
    max_tokens = data.get("max_tokens")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise TurnRejected("invalid_max_tokens", "max_tokens must be a positive integer.")
    resumable = data.get("resumable", False)
    if not isinstance(resumable, bool):
        raise TurnRejected("invalid_resumable", "resumable must be true or false.")
    idempotency = _idempotency(request, session_id, data, streamed=streamed) if request is not None else None
    return TurnInput(content=content, model=model, tools_enabled=tools_enabled, max_tokens=max_tokens,
                     resumable=resumable, idempotency=idempotency, models=models, parent_id=parent_id,
                     parent_given=parent_given)


def _parent_id(value) -> uuid.UUID | None:
    """A request's `parent_id`: null (a new root) or a message id; else 400 `invalid_parent`."""
    if value is None:
        return None
    try:
        if isinstance(value, str):
            return uuid.UUID(value)
    except ValueError:
        pass
    raise TurnRejected("invalid_parent", "parent_id must be a message id of this session, or null.")


def _models(value, *, present: bool) -> tuple[str, ...] | None:
    """A request's `models` (SPEC section 15): None when absent (the configured fallbacks
    apply); else a list of at most MAX_MODELS model names, [] meaning no fallbacks."""
    if not present or value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(name, str) and name for name in value):
        raise TurnRejected("invalid_models", "models must be a list of non-empty strings.")
    if len(value) > MAX_MODELS:
        raise TurnRejected("invalid_models", f"models must have at most {MAX_MODELS} entries.")
    for name in value:
        _refuse_unstorable("models", name)
    return tuple(value)


@db_call(on_loop=True)
def _preflight(request: HttpRequest, session_id: uuid.UUID, streamed: bool) -> PreparedTurn:
    """Everything before the model call, in one database call and in this order: 401, 404,
    400, 422, 402. Raises AuthFailure, TurnRejected, or AlreadyRequested (a repeat of an
    earlier request with the same Idempotency-Key: nothing new is made)."""
    try:
        data, problem = parse_turn_input(request.body, request, session_id, streamed=streamed), None
    except TurnRejected as exc:  # reported after 401 and 404
        data, problem = None, exc
    model = data.model if data is not None else None
    # Where the turn continues (SPEC section 17): the parent asked for, a new root, or the leaf.
    branch = ({"parent_id": data.parent_id, "root": data.parent_given and data.parent_id is None}
              if data is not None else {})
    key_hash = request_key_hash(request)
    if key_hash is None:  # no key: the browser session (CSRF-checked)
        user = session_user(request)
        preflight = load_preflight(session_id=session_id, model=model, user_id=user.pk, **branch)
    else:
        preflight = load_preflight(session_id=session_id, model=model, key_hash=key_hash,
                                   **branch) if key_hash else None
        if preflight is None:
            raise AuthFailure("Invalid or revoked API key.", code="authentication_failed")
    if preflight.session is None:
        raise TurnRejected("not_found", "Not found.")
    if problem is not None:
        raise problem
    if data.idempotency is not None:
        earlier = find_repeat(preflight.user_id, *data.idempotency)
        if earlier is not None:
            raise AlreadyRequested(earlier)
    return begin_turn(preflight, data, streamed=streamed)


async def _prepare(request: HttpRequest, session_id: uuid.UUID, *,
                   streamed: bool) -> PreparedTurn | AlreadyRequested | HttpResponse:
    if request.method != "POST":
        return error_response(405, "method_not_allowed", f"Method {request.method} not allowed.")
    try:
        return await start_turn(lambda: _preflight(request, session_id, streamed))
    except AlreadyRequested as exc:
        return exc
    except AuthFailure as exc:
        return exc.response()
    except TurnRejected as exc:
        return with_headers(error_response(REJECTION_STATUS.get(exc.code, 400), exc.code, exc.detail, **exc.extra),
                            exc.headers)
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


def _turn_body(result: TurnResult) -> JsonResponse:
    """The non-streaming endpoint's answer for a closed turn (also for its repeats)."""
    turn = result.turn
    if turn.status == Turn.Status.FAILED:
        code = turn.error_code or "upstream_error"
        return JsonResponse({"detail": turn.error_message, "code": code, "turn_id": str(turn.id)},
                            status=504 if code == "upstream_timeout" else 502)
    return JsonResponse({
        "turn": turn_data(turn),
        "message": MessageSerializer(result.message).data if result.message else None,
        "usage": turn_usage(turn),
        "cost": format_money(turn.cost),
        "balance": format_money(result.balance),
    }, status=201)


_replay = db_call(replay_result)
_progress = db_call(turn_progress)


async def ended_result(turn_id: uuid.UUID) -> TurnResult | None:
    """A turn once it ended, as its first answer said it (a repeated request's: the first
    request may be served by another process, so the turn row says when). None if none."""
    while True:
        progress = await _progress(turn_id)
        if progress is None or progress.status != Turn.Status.RUNNING:
            break
        await asyncio.sleep(REPEAT_POLL_SECONDS)
    return await _replay(turn_id)


async def _repeat_answer(turn_id: uuid.UUID) -> HttpResponse:
    """A repeated non-streaming request: the first request's answer, once its turn ended."""
    result = await ended_result(turn_id)
    if result is None:
        return error_response(404, "not_found", "Not found.")
    return _turn_body(result)


@csrf_exempt  # CSRF is checked in session_user for cookie sessions; keys need none
async def turns(request: HttpRequest, session_id: uuid.UUID) -> HttpResponse:
    """GET: the session's turns (a page). POST: run one non-streaming turn."""
    if request.method == "GET":
        return await _list_turns(request, session_id=session_id)
    prepared = await _prepare(request, session_id, streamed=False)
    if isinstance(prepared, HttpResponse):
        return prepared
    if isinstance(prepared, AlreadyRequested):
        return await _repeat_answer(prepared.turn_id)
    try:
        result = await run_plain_turn(prepared)
    except PersistenceFailed:
        return with_headers(_persistence_failure(prepared.turn_id), prepared.rate_headers)
    # What is returned is what was stored (if the turn was closed elsewhere meanwhile, that).
    return with_headers(_turn_body(result), prepared.rate_headers)


def _cut_short(attempts: routing.Attempts, **fields) -> TurnOutcome:
    """The outcome of a routed call stopped from outside (the client left, a stop, the time
    limit): the failed attempts so far are stored (the one in flight left no record), and it
    is billed at the price of the candidate being tried."""
    current = attempts.current
    return TurnOutcome(records=list(attempts.records), served_model=current.model if current else "", **fields)


async def run_plain_turn(prepared: PreparedTurn) -> TurnResult:
    """A prepared non-streaming turn, from the model call to the stored result; every front
    door's plain turn. Raises PersistenceFailed; the client going away (the calling task
    cancelled) stores the turn as cancelled and re-raises."""
    executor = make_file_read_executor(prepared.user_id) if prepared.tools else None
    attempts = routing.Attempts()
    call = asyncio.ensure_future(routing.generate(
        prepared.candidates(), attempts=attempts, messages=prepared.messages, max_tokens=prepared.max_tokens,
        tools=prepared.tools, tool_executor=executor, max_tool_rounds=settings.PANTHEON_MAX_TOOL_ROUNDS,
        params=prepared.params, client_tools=prepared.client_tools,
    ))
    serve_locally(prepared.turn_id, call.cancel)  # POST .../cancel stops the call
    keeper = LeaseKeeper(prepared.turn_id, on_cancel=call.cancel).start()
    try:
        async with asyncio.timeout(settings.PANTHEON_MAX_TURN_SECONDS):
            completion, served = await asyncio.shield(call)
    except GatewayError as exc:
        outcome = TurnOutcome.from_error(exc)
    except TimeoutError:
        # A provider that keeps the connection alive without answering must not hold the
        # turn forever; it had the prompt, so that is billed (an estimate).
        call.cancel()
        outcome = _cut_short(attempts, status=Turn.Status.FAILED, error_code="upstream_timeout", prompt_processed=True,
                              error_message=f"The answer took longer than {settings.PANTHEON_MAX_TURN_SECONDS:g} "
                                            "seconds.")
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            # The client went away mid-call: the provider bills the request anyway, so
            # store the turn as cancelled with an estimate of the prompt.
            call.cancel()
            done_serving(prepared.turn_id)
            in_background(finish_turn(prepared, _cut_short(attempts, status=Turn.Status.CANCELLED,
                                                           prompt_processed=True)))
            raise
        # Stopped with POST .../cancel: answered like any other ending.
        outcome = _cut_short(attempts, status=Turn.Status.CANCELLED, prompt_processed=True)
    else:
        outcome = TurnOutcome(status=Turn.Status.COMPLETED, content=completion.content, usage=completion.usage,
                              provider_model=completion.provider_model, records=completion.records,
                              tool_messages=completion.tool_messages, finish_reason=completion.finish_reason,
                              prompt_processed=True, tool_calls=list(completion.tool_calls),
                              served_model=served.model)
    finally:
        await keeper.stop()
    done_serving(prepared.turn_id)
    return await _finish_shielded(prepared, outcome)


@csrf_exempt
async def stream_turn(request: HttpRequest, session_id: uuid.UUID) -> HttpResponse:
    """One turn streamed as Server-Sent Events (SPEC sections 5, 11, 12)."""
    prepared = await _prepare(request, session_id, streamed=True)
    if isinstance(prepared, HttpResponse):
        return prepared
    if isinstance(prepared, AlreadyRequested):  # the first request's stream, from its start
        return TurnStreamResponse(follow(prepared.turn_id, 0))
    try:
        live = await open_live_turn(prepared)
    except PersistenceFailed:
        return with_headers(_persistence_failure(prepared.turn_id), prepared.rate_headers)
    except GatewayError as exc:
        return with_headers(_upstream_failure(exc, prepared.turn_id), prepared.rate_headers)
    return with_headers(stream_response(live), prepared.rate_headers)


async def open_live_turn(prepared: PreparedTurn) -> LiveTurn:
    """Open the upstream stream of a prepared turn and start its producer; every front
    door's streamed turn. The upstream is opened before the response starts, so a provider
    that fails at once gets an HTTP error: the GatewayError is raised once the failed turn
    is stored (or PersistenceFailed). The lease is kept while retries wait. The client going
    away meanwhile (the calling task cancelled) is handled as SPEC section 10 says, and
    re-raised."""
    deadline = asyncio.get_running_loop().time() + settings.PANTHEON_MAX_TURN_SECONDS
    keeper = LeaseKeeper(prepared.turn_id).start()
    attempts = routing.Attempts()
    opening = asyncio.ensure_future(routing.stream(prepared.candidates(), attempts=attempts,
                                                   messages=prepared.messages,
                                                   max_tokens=prepared.max_tokens, params=prepared.params,
                                                   client_tools=prepared.client_tools))
    try:
        # Retries and fallbacks included, no longer than a whole turn may take (SPEC 15).
        async with asyncio.timeout_at(deadline):
            ctx, served = await asyncio.shield(opening)
    except GatewayError as exc:
        await keeper.stop()
        await _finish_shielded(prepared, TurnOutcome.from_error(exc))
        raise
    except TimeoutError:
        opening.cancel()
        await keeper.stop()
        exc = UpstreamTimeout(f"No model answered within {settings.PANTHEON_MAX_TURN_SECONDS:g} seconds.")
        # Nothing was produced: free.
        await _finish_shielded(prepared, _cut_short(attempts, status=Turn.Status.FAILED, error_code=exc.code,
                                                    error_message=exc.message))
        raise exc from None
    except asyncio.CancelledError:
        if prepared.resumable:
            # The client left (a reload right after sending): the turn goes on without it,
            # for the grace period, like a resumable turn whose client left later.
            in_background(_run_unattended(prepared, opening, keeper, deadline))
            raise
        # The client left while the upstream was being opened or retried: nothing was
        # produced, so the cancelled turn costs nothing.
        opening.cancel()
        await keeper.stop()
        in_background(finish_turn(prepared, _cut_short(attempts, status=Turn.Status.CANCELLED)))
        raise
    await keeper.stop()
    return LiveTurn(prepared, ctx, deadline=deadline, resumable=prepared.resumable, served_model=served.model).begin()


async def _run_unattended(prepared: PreparedTurn, opening: asyncio.Future, keeper: LeaseKeeper,
                          deadline: float) -> None:
    """A resumable turn whose client left while its upstream was being opened."""
    try:
        ctx, served = await opening
    except GatewayError as exc:
        await keeper.stop()
        with contextlib.suppress(PersistenceFailed):
            await finish_turn(prepared, TurnOutcome.from_error(exc))
        return
    await keeper.stop()
    LiveTurn(prepared, ctx, deadline=deadline, resumable=True, served_model=served.model).begin().requester_closed()


# --- one turn: GET /turns/{id}, GET /turns/{id}/events, POST /turns/{id}/cancel -----------

def _user(request: HttpRequest):
    """The request's user: its Bearer key's, else the browser session's (CSRF-checked for
    unsafe methods). Raises AuthFailure."""
    raw = parse_bearer(request.META.get("HTTP_AUTHORIZATION", ""))
    if raw is None:
        return session_user(request)
    user = user_for_key(raw)
    if user is None:
        raise AuthFailure("Invalid or revoked API key.", code="authentication_failed")
    return user


@db_call
def _owned_turn(request: HttpRequest, turn_id: uuid.UUID) -> Turn | None:
    """The turn if it is the requester's (None answers 404: not found or not yours)."""
    user = _user(request)
    return Turn.objects.filter(pk=turn_id, user=user).first()


@db_call
def _cancel_elsewhere(turn_id: uuid.UUID) -> bool:
    """Ask the process serving the turn to stop it: the flag on the row (read at its next
    lease write) and a signal (at once). False when the turn is not running."""
    if not request_cancel(turn_id):
        return False
    turn_signals.notify("cancel", turn_id)
    return True


async def _turn_or_error(request: HttpRequest, turn_id: uuid.UUID, method: str) -> Turn | HttpResponse:
    if request.method != method:
        return error_response(405, "method_not_allowed", f"Method {request.method} not allowed.")
    try:
        turn = await _owned_turn(request, turn_id)
    except AuthFailure as exc:
        return exc.response()
    if turn is None:
        return error_response(404, "not_found", "Not found.")
    return turn


async def turn_detail(request: HttpRequest, turn_id: uuid.UUID) -> HttpResponse:
    """GET /turns/{id}: the turn."""
    turn = await _turn_or_error(request, turn_id, "GET")
    if isinstance(turn, HttpResponse):
        return turn
    return JsonResponse(turn_data(turn))


def _after(request: HttpRequest) -> int | None:
    """The last event id the client has: `Last-Event-ID`, else `?after=`; None if malformed."""
    raw = request.headers.get("Last-Event-ID")
    if raw is None:
        raw = request.GET.get("after", "0")
    raw = raw.strip()
    if not raw.isascii() or not raw.isdigit() or len(raw) > 9:
        return None
    return int(raw)


async def turn_events(request: HttpRequest, turn_id: uuid.UUID) -> HttpResponse:
    """GET /turns/{id}/events: the turn's events after the client's last one, live to the end."""
    turn = await _turn_or_error(request, turn_id, "GET")
    if isinstance(turn, HttpResponse):
        return turn
    after = _after(request)
    if after is None:
        return error_response(400, "invalid_last_event_id", "Last-Event-ID (or after) must be an event id.")
    return TurnStreamResponse(follow(turn_id, after, known=turn))


@csrf_exempt  # CSRF is checked in session_user for cookie sessions; keys need none
async def turn_cancel(request: HttpRequest, turn_id: uuid.UUID) -> HttpResponse:
    """POST /turns/{id}/cancel: 202 while running (stopped within a moment, whichever
    process serves it); 200 with the turn if it had already ended."""
    turn = await _turn_or_error(request, turn_id, "POST")
    if isinstance(turn, HttpResponse):
        return turn
    if turn.status == Turn.Status.RUNNING and (stop_local(turn_id) or await _cancel_elsewhere(turn_id)):
        return JsonResponse(turn_data(turn), status=202)
    ended = await _replay(turn_id)
    return JsonResponse(turn_data(ended.turn if ended else turn), status=200)
