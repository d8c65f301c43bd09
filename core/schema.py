"""The OpenAPI vocabulary every app's views share (drf-spectacular, `/api/schema/`): the
error body of SPEC section 4, the error responses each status stands for, and `documented`,
which puts a plain (non-DRF) view in the schema.

    @extend_schema(responses={200: ThingSerializer, **errors(400, 401, 404)})
"""

from __future__ import annotations

import functools
import inspect

from drf_spectacular.utils import OpenApiResponse
from rest_framework import serializers

from core.errors import error_response


class ErrorSerializer(serializers.Serializer):
    """Every error answer of the API: `{"detail", "code"}`."""

    detail = serializers.CharField(help_text="A message for humans.")
    code = serializers.CharField(help_text="A stable machine code naming the problem, e.g. `not_found`, "
                                           "`invalid_json`, `insufficient_credits`.")


class CreditErrorSerializer(ErrorSerializer):
    """A 402 of a turn's credit preflight: what the turn needs at least and what is available."""

    needed = serializers.DecimalField(max_digits=20, decimal_places=6, required=False, coerce_to_string=True,
                                      help_text="The least this turn can cost: its prompt and the minimum output.")
    available = serializers.DecimalField(max_digits=20, decimal_places=6, required=False, coerce_to_string=True,
                                         help_text="Credits available now (balance less open holds).")


class TurnErrorSerializer(ErrorSerializer):
    """An error about a turn that exists (the provider failed, or storing it did): the turn's id too."""

    turn_id = serializers.UUIDField(help_text="The turn, stored as `failed` (502, 504) or closed later by the "
                                              "sweep (503 `persistence_failed`).")


# What each status means on every endpoint that answers it (SPEC section 4); an endpoint may
# say more with `errors((400, "..."))`.
ERROR_DESCRIPTIONS = {
    400: "Malformed or invalid request; `code` names the problem (e.g. `invalid_json`, `invalid`, "
         "`invalid_content_type`).",
    401: "No credentials, or an invalid, revoked or expired API key (`not_authenticated`, "
         "`authentication_failed`). Sent with `WWW-Authenticate: Bearer`.",
    402: "Not enough credits for this request (`insufficient_credits`).",
    403: "A browser-session (cookie) write without a valid CSRF token (`permission_denied`, `csrf_failed`). "
         "Requests with an API key never get it.",
    404: "Not found, or not yours (`not_found`): another user's object answers exactly like a missing one.",
    413: "The upload is larger than the limit (`file_too_large`).",
    422: "Understood but refused (`code` says why).",
    406: "The `Accept` header rules out JSON (`not_acceptable`).",
    415: "The body's `Content-Type` is not one this operation reads (`unsupported_media_type`).",
    502: "The model provider failed before anything was sent (`upstream_error`).",
    503: "The service is briefly unavailable (`code` says which part); try again.",
    504: "The model provider timed out before anything was sent (`upstream_timeout`).",
}


def errors(*statuses: int | tuple[int, str], body: type[serializers.Serializer] = ErrorSerializer
           ) -> dict[int, OpenApiResponse]:
    """Error responses for `extend_schema(responses=...)`: a status (its standard
    description) or `(status, description)`; each answers `body`."""
    responses = {}
    for item in statuses:
        status, description = item if isinstance(item, tuple) else (item, ERROR_DESCRIPTIONS[item])
        responses[status] = OpenApiResponse(response=body, description=description)
    return responses


def documented(view, *, by: type):
    """The plain async view `view`, described in the schema by `by`: a DRF view class whose
    methods carry the `@extend_schema` of each method `view` serves (they never run).

    drf-spectacular lists only DRF views (a callback with a `cls`); the returned callback
    has `by` as its `cls`. It answers a method `by` does not declare with a JSON 405
    (`method_not_allowed`, with `Allow`) itself, and passes every other request to `view`.
    """
    assert inspect.iscoroutinefunction(view), view
    allowed = frozenset(method for method in by().allowed_methods if method != "OPTIONS")
    allow = ", ".join(sorted(allowed))

    @functools.wraps(view)
    async def endpoint(request, *args, **kwargs):
        if request.method not in allowed:
            response = error_response(405, "method_not_allowed", f'Method "{request.method}" not allowed.')
            response["Allow"] = allow
            return response
        return await view(request, *args, **kwargs)

    endpoint.cls = by
    endpoint.initkwargs = {}
    return endpoint


def require_response_fields(result, generator, request, public):
    """drf-spectacular postprocessing hook: every property of a response body is `required`.

    The API's serializers always send every field (null when it has no value), but
    drf-spectacular marks only the fields a request must carry, so a field with a model
    default (`title`, `status`, ...) would look optional to a generated client. Request
    bodies (`...Request` components, COMPONENT_SPLIT_REQUEST) are left as they are.
    """
    schemas = result.get("components", {}).get("schemas", {})
    used: set[str] = set()

    def visit(node) -> None:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/components/schemas/") and (name := ref.rsplit("/", 1)[1]) not in used:
                used.add(name)
                visit(schemas.get(name))
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    for operations in result.get("paths", {}).values():
        for operation in operations.values():
            if isinstance(operation, dict):
                visit(operation.get("responses", {}))
    for name in used:
        schema = schemas.get(name, {})
        if schema.get("type") == "object" and schema.get("properties"):
            schema["required"] = sorted(schema["properties"])
    return result


def drf_refusals(result, generator, request, public):
    """drf-spectacular postprocessing hook: the refusals DRF itself answers on every
    operation of its views, before the view runs: 406 for an `Accept` that rules out JSON,
    and, where a body is read, 415 for a `Content-Type` no parser reads. The plain views
    (`documented`) do neither, except where their class names DRF-served methods in
    `drf_methods`."""
    def refusal(status: int) -> dict:
        return {"description": ERROR_DESCRIPTIONS[status],
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}

    for path, _regex, method, callback in generator.endpoints:
        drf_methods = getattr(callback.cls, "drf_methods", None)
        operation = result["paths"].get(path, {}).get(method.lower())
        if operation is None or (drf_methods is not None and method not in drf_methods):
            continue
        responses = operation["responses"]
        responses.setdefault("406", refusal(406))
        if "requestBody" in operation:
            responses.setdefault("415", refusal(415))
    return result
