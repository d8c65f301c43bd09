"""The OpenAPI description of the plain async turn endpoints (sessions_app.turn_views).

drf-spectacular documents only DRF views, and these are plain Django views (they must not
hold a thread while the model answers). Each class below is a documentation stand-in: the
URL conf serves the real view through `core.schema.documented(view, by=<class>)`, and the
schema generator reads the class. Their methods never run.
"""

from __future__ import annotations

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiExample, OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework.parsers import JSONParser
from rest_framework.views import APIView

from core.schema import CreditErrorSerializer, TurnErrorSerializer, errors
from sessions_app.serializers import TurnRequestSerializer, TurnResultSerializer, TurnSerializer
from sessions_app.views import SessionTurnsView

EVENT_STREAM = "text/event-stream"

EVENTS_DESCRIPTION = """\
Server-Sent Events. Each event is an `id:` line, an `event:` line and one `data:` line of
JSON; ids rise within the turn and are the same live and in every replay (`start` is 1, the
n-th `chunk` n + 1, the ending the next). While the provider is silent a comment line
`: ping` goes out every `PANTHEON_HEARTBEAT_SECONDS`. Events, in order:

- `start`: `{"turn_id", "session_id", "model"}`.
- `chunk` (any number): `{"delta"}`, the next piece of the answer; the deltas concatenate
  to the stored assistant message.
- then exactly one of
  - `done`: `{"turn_id", "message_id" (null when no answer was stored), "status"
    (`completed`, `cancelled` or `interrupted`), "usage": {"prompt_tokens",
    "completion_tokens", "total_tokens", "estimated", "reconciled"}, "cost", "balance",
    "served_model" (the catalogue model that answered: `model` or a fallback), "provider_model",
    "finish_reason" (null when unknown)}`;
  - `error`: `{"code", "message", "turn_id"}`: `upstream_error` or `upstream_timeout` (the
    provider failed after the stream started; the turn is stored as `failed` with the text
    that had arrived), or `persistence_failed` (the turn could not be stored yet; it is
    closed and billed later from what was saved).

Money (`cost`, `balance`) is a decimal string with 6 places. On the wire:

```
id: 1
event: start
data: {"turn_id": "6f1c…", "session_id": "0b8e…", "model": "openai/gpt-4o-mini"}

id: 2
event: chunk
data: {"delta": "Hel"}

id: 3
event: chunk
data: {"delta": "lo"}

id: 4
event: done
data: {"turn_id": "6f1c…", "message_id": "9d2a…", "status": "completed", "usage": {…}, "cost": "0.000014", …}
```
"""

_DONE_DATA = ('{"turn_id": "6f1c…", "message_id": "9d2a…", "status": "completed", "usage": {"prompt_tokens": 12, '
              '"completion_tokens": 2, "total_tokens": 14, "estimated": false, "reconciled": false}, '
              '"cost": "0.000014", "balance": "9.999986", "served_model": "openai/gpt-4o-mini", '
              '"provider_model": "openai/gpt-4o-mini", '
              '"finish_reason": "stop"}')
EVENT_EXAMPLES = [
    OpenApiExample("start", media_type=EVENT_STREAM, value={
        "id": "1", "event": "start",
        "data": '{"turn_id": "6f1c…", "session_id": "0b8e…", "model": "openai/gpt-4o-mini"}'}),
    OpenApiExample("chunk", media_type=EVENT_STREAM, value={"id": "2", "event": "chunk", "data": '{"delta": "Hel"}'}),
    OpenApiExample("done", media_type=EVENT_STREAM, value={"id": "4", "event": "done", "data": _DONE_DATA}),
    OpenApiExample("error", media_type=EVENT_STREAM, value={
        "id": "3", "event": "error",
        "data": '{"code": "upstream_error", "message": "The provider closed the connection.", "turn_id": "6f1c…"}'}),
]


# The schema of one event, as OpenAPI 3.2's `itemSchema` of an event stream has it (and
# tools such as schemathesis read `schema` of a 3.0 `text/event-stream`): its fields.
SSE_EVENT = {
    "type": "object",
    "description": "One Server-Sent Event of the stream.",
    "properties": {
        "id": {"type": "string", "pattern": "^[0-9]+$",
               "description": "Rises within the turn; send the last one back as `Last-Event-ID` to resume."},
        "event": {"type": "string", "enum": ["start", "chunk", "done", "error"]},
        "data": {"type": "string", "description": "One line of JSON; its fields per event are in the response's "
                                                  "description."},
    },
    "required": ["id", "event", "data"],
}


def _event_stream(description: str) -> OpenApiResponse:
    return OpenApiResponse(response=SSE_EVENT, description=f"{description}\n\n{EVENTS_DESCRIPTION}",
                           examples=EVENT_EXAMPLES)


IDEMPOTENCY_KEY = OpenApiParameter(
    "Idempotency-Key", OpenApiTypes.STR, OpenApiParameter.HEADER, required=False,
    description="1 to 200 printable ASCII characters (else 400 `invalid_idempotency_key`), scoped to you and kept "
                "24 h. A repeat with the same body never calls the model or pays again: it answers the first "
                "request's turn. The same key with another body: 422 `idempotency_key_reused`.",
)

_PREFLIGHT_ERRORS = errors(
    (400, "Invalid body or header; `code` names the problem (`invalid_json`, `invalid_body`, `invalid_content`, "
          "`empty_content`, `content_too_long`, `invalid_text`, `invalid_model`, `invalid_models`, "
          "`unknown_model`, `invalid_tools_enabled`, `invalid_max_tokens`, `invalid_resumable`, "
          "`invalid_idempotency_key`)."),
    401,
    (403, "The API key's allow-list excludes a model the request names (`model_not_allowed`), or the CSRF check "
          "failed (`csrf_failed`)."),
    (404, "No such session, or not yours (`not_found`)."),
    (429, "A limit of the API key or of the user (`rate_limited`: rpm, tpm, max_parallel; SPEC section 16), with "
          "`Retry-After` in seconds. Keys with an rpm (tpm) also get `x-ratelimit-*-requests` "
          "(`-tokens`) headers on every turn answer."),
) | errors((402, "Not enough credits for a useful answer (`insufficient_credits`), or the API key's budget is "
                 "spent (`key_budget_exceeded`), with what the turn needs at least and what is available."),
           body=CreditErrorSerializer)
_PROVIDER_ERRORS = {
    **errors(502, 504, body=TurnErrorSerializer),
    **errors((503, "The database is briefly unavailable (`database_unavailable`; nothing was held or stored), or "
                   "the turn could not be stored yet (`persistence_failed`, with `turn_id`: it is closed and billed "
                   "later from what was saved).")),
}


class _PlainView:
    parser_classes = [JSONParser]  # the views read JSON bodies only
    drf_methods: frozenset[str] = frozenset()  # none of DRF's refusals (core.schema.drf_refusals)


class SessionTurnsSchema(_PlainView, SessionTurnsView):
    """`/sessions/{id}/turns`: GET is SessionTurnsView's page; POST runs one turn."""

    drf_methods = frozenset({"GET"})  # turn_views.turns serves GET with SessionTurnsView

    @extend_schema(operation_id="sessions_turns_list", tags=["turns"], description="Oldest first.",
                   responses={200: TurnSerializer(many=True),
                              **errors(401, (404, "No such session (or not yours), or page."))})
    def get(self, request, *args, **kwargs):
        raise NotImplementedError  # documentation only: turn_views.turns serves it

    @extend_schema(
        operation_id="sessions_turns_create", tags=["turns"],
        summary="Run one turn (non-streaming)",
        description="Sends the message to the model and answers once the turn is closed and billed. "
                    "With `tools_enabled` the model may read your ready files (`file_read`).",
        parameters=[IDEMPOTENCY_KEY], request=TurnRequestSerializer,
        responses={201: TurnResultSerializer, **_PREFLIGHT_ERRORS,
                   **errors((422, "The Idempotency-Key was used with another body (`idempotency_key_reused`).")),
                   **_PROVIDER_ERRORS},
    )
    def post(self, request, *args, **kwargs):
        raise NotImplementedError  # documentation only


class SessionTurnStreamSchema(_PlainView, APIView):
    @extend_schema(
        operation_id="sessions_turns_stream", tags=["turns"],
        summary="Run one turn, streamed as Server-Sent Events",
        description="Everything that can refuse the turn (401, 404, 400, 422, 402) is answered as JSON before the "
                    "stream starts. The response is not buffered (`Cache-Control: no-cache`, `X-Accel-Buffering: no`)."
                    " The client going away cancels the turn unless it is `resumable`.",
        parameters=[IDEMPOTENCY_KEY], request=TurnRequestSerializer,
        responses={(200, EVENT_STREAM): _event_stream("The turn's events (a repeated Idempotency-Key: that turn's "
                                                      "events from the start)."),
                   **_PREFLIGHT_ERRORS,
                   **errors((422, "`tools_enabled: true` (`tools_not_supported_in_stream`), or the Idempotency-Key "
                                  "was used with another body (`idempotency_key_reused`).")),
                   **_PROVIDER_ERRORS},
    )
    def post(self, request, *args, **kwargs):
        raise NotImplementedError  # documentation only


_NO_TURN = (404, "No such turn, or not yours (`not_found`).")


class TurnDetailSchema(_PlainView, APIView):
    @extend_schema(operation_id="turns_retrieve", tags=["turns"], responses={200: TurnSerializer,
                                                                            **errors(401, _NO_TURN)})
    def get(self, request, *args, **kwargs):
        raise NotImplementedError  # documentation only


class TurnEventsSchema(_PlainView, APIView):
    @extend_schema(
        operation_id="turns_events", tags=["turns"], summary="Follow a turn's events",
        description="The events after the client's last one (`Last-Event-ID`, else `?after=`; default: from the "
                    "start), then live until the turn ends. An ended turn is replayed from what is stored.",
        parameters=[
            OpenApiParameter("Last-Event-ID", OpenApiTypes.STR, OpenApiParameter.HEADER, required=False,
                             description="The id of the last event received (digits)."),
            OpenApiParameter("after", OpenApiTypes.STR, OpenApiParameter.QUERY, required=False,
                             description="As `Last-Event-ID`, for clients that cannot set headers."),
        ],
        responses={(200, EVENT_STREAM): _event_stream("The turn's events after the given id."),
                   **errors((400, "`Last-Event-ID` or `after` is not an event id (`invalid_last_event_id`)."),
                            401, _NO_TURN)},
    )
    def get(self, request, *args, **kwargs):
        raise NotImplementedError  # documentation only


class TurnCancelSchema(_PlainView, APIView):
    @extend_schema(
        operation_id="turns_cancel", tags=["turns"], summary="Stop a turn", request=None,
        description="Stops a running turn, whichever process serves it: its listeners get `done` with "
                    "`\"status\": \"cancelled\"`.",
        responses={202: OpenApiResponse(TurnSerializer, description="The turn was running: it is being stopped "
                                                                    "(cancelled within 2 seconds)."),
                   200: OpenApiResponse(TurnSerializer, description="The turn had already ended: as stored."),
                   **errors(401, 403, _NO_TURN)},
    )
    def post(self, request, *args, **kwargs):
        raise NotImplementedError  # documentation only
