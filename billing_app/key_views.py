"""The keys users make themselves (SPEC section 16): `GET/POST /api/v1/keys`,
`PATCH/DELETE /api/v1/keys/{id}`.

Authenticated by an API key or the browser session (its writes CSRF-checked), like every
DRF view. A key that carries any limit, allow-list or expiry (`ApiKey.is_restricted`) is
refused on all four with 403 `restricted_key`: a script's restricted key cannot mint an
unrestricted one, nor lift its own limits. The limits themselves are enforced in each
turn's preflight (sessions_app.limits).
"""

from __future__ import annotations

from decimal import Decimal

from django.db import transaction
from django.shortcuts import get_object_or_404
from django.utils import timezone
from drf_spectacular.utils import OpenApiExample, OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import generics, permissions, status
from rest_framework.response import Response

from accounts.models import ApiKey
from billing_app import selectors
from billing_app.serializers import (
    ApiKeyCreatedSerializer,
    ApiKeyCreateSerializer,
    ApiKeySerializer,
    ApiKeyUpdateSerializer,
)
from core.parsers import JSONParser
from core.schema import errors


class NotRestrictedKey(permissions.BasePermission):
    """Refuses a request made with a restricted key (the browser session has no key)."""

    message = "This API key has limits, an allow-list or an expiry: it cannot manage keys."
    code = "restricted_key"

    def has_permission(self, request, view) -> bool:
        key = request.auth
        return not (isinstance(key, ApiKey) and key.is_restricted)


FORBIDDEN = (403, "The request's API key is restricted (`restricted_key`): it carries a limit, an allow-list or "
                  "an expiry. Or a browser-session write without a valid CSRF token (`csrf_failed`, "
                  "`permission_denied`).")
INVALID = (400, (
    "Invalid body; `code` names the problem: `invalid` (e.g. not a number), `invalid_min_value`, "
    "`invalid_max_value`, `max_decimal_places`, `invalid_budget_period`, `invalid_null`, `unknown_model` "
    "(a model not in the price list), `invalid_expires_at` (not in the future, or both `expires_at` and "
    "`expires_in_days`), `invalid_budget` (`budget` without `budget_period`, or the other way round)."))

KEY_EXAMPLE = {
    "id": "3f9c2d1e-8a4b-4c6d-9e0f-1a2b3c4d5e6f", "name": "nightly script", "prefix": "pk_AbCdEfG",
    "created_at": "2026-12-01T09:30:00Z", "last_used_at": None, "expires_at": "2026-12-31T09:30:00Z",
    "rpm": 10, "tpm": None, "max_parallel": 2, "budget": "5.000000", "budget_period": "day",
    "models": ["openai/gpt-4o-mini"], "spent_this_period": "0.000000",
}


def _own_keys(request):
    """The requester's keys not revoked (expired ones included: they can be extended)."""
    return ApiKey.objects.filter(user=request.user, revoked_at__isnull=True)


def _with_spend(key: ApiKey) -> ApiKey:
    key.spent_this_period = selectors.key_spend_this_period(key, timezone.now())
    return key


class _KeyView(generics.GenericAPIView):
    serializer_class = ApiKeySerializer
    permission_classes = [permissions.IsAuthenticated, NotRestrictedKey]
    parser_classes = [JSONParser]


@extend_schema_view(
    get=extend_schema(
        operation_id="keys_list", tags=["keys"],
        description="Your API keys that are not revoked (expired ones too), newest first; never a key itself "
                    "nor its hash. Limits are null when unset.",
        responses={200: ApiKeySerializer(many=True), **errors(401, FORBIDDEN, (404, "No such page."))}),
    post=extend_schema(
        operation_id="keys_create", tags=["keys"], request=ApiKeyCreateSerializer,
        description="Make an API key, optionally with limits (SPEC section 16). The answer carries the key "
                    "itself in `key`: the only time it is ever shown.",
        examples=[OpenApiExample("a key with a daily budget", request_only=True, value={
            "name": "nightly script", "rpm": 10, "max_parallel": 2, "budget": "5", "budget_period": "day",
            "models": ["openai/gpt-4o-mini"], "expires_in_days": 30}),
            OpenApiExample("created", response_only=True, status_codes=["201"],
                           value={**KEY_EXAMPLE, "key": "pk_AbCdEfGh…"})],
        responses={201: ApiKeyCreatedSerializer, **errors(INVALID, 401, FORBIDDEN)}),
)
class KeyListCreateView(_KeyView):
    def get_queryset(self):
        return _own_keys(self.request).order_by("-created_at", "-id")

    def get(self, request):
        keys = selectors.with_spend_this_period(self.get_queryset(), timezone.now())
        page = self.paginate_queryset(keys)
        return self.get_paginated_response(ApiKeySerializer(page, many=True).data)

    def post(self, request):
        incoming = ApiKeyCreateSerializer(data=request.data)
        incoming.is_valid(raise_exception=True)
        limits = dict(incoming.validated_data)
        name = limits.pop("name", "")
        with transaction.atomic():
            key, raw = ApiKey.issue(user=request.user, name=name)
            if limits:
                for field, value in limits.items():
                    setattr(key, field, value)
                key.save(update_fields=list(limits))
        key.spent_this_period = Decimal(0)  # a new key spent nothing yet
        # ApiKeyCreatedSerializer describes this answer: the key object and the key itself.
        response = Response({**ApiKeySerializer(key).data, "key": raw}, status=status.HTTP_201_CREATED)
        response["Cache-Control"] = "no-store"  # it carries the key
        return response


@extend_schema_view(
    patch=extend_schema(
        operation_id="keys_partial_update", tags=["keys"], request=ApiKeyUpdateSerializer,
        description="Rename a key or change its limits and expiry; fields left out stay as they are, null "
                    "clears a limit. `budget` and `budget_period` come together (both, or both null).",
        responses={200: ApiKeySerializer, **errors(INVALID, 401, FORBIDDEN, 404)}),
    delete=extend_schema(
        operation_id="keys_destroy", tags=["keys"],
        description="Revoke a key: from this moment every request with it is a 401, on every worker.",
        responses={204: OpenApiResponse(description="Revoked."), **errors(401, FORBIDDEN, 404)}),
)
class KeyDetailView(_KeyView):
    lookup_url_kwarg = "key_id"
    http_method_names = ["patch", "delete", "options"]

    def get_queryset(self):
        return _own_keys(self.request)

    def patch(self, request, key_id):
        incoming = ApiKeyUpdateSerializer(data=request.data)
        incoming.is_valid(raise_exception=True)
        changes = incoming.validated_data
        with transaction.atomic():
            # Locked, so a revoke racing this answers first or makes this a 404.
            key = get_object_or_404(self.get_queryset().select_for_update(), pk=key_id)
            if changes:
                for field, value in changes.items():
                    setattr(key, field, value)
                key.save(update_fields=list(changes))
        return Response(ApiKeySerializer(_with_spend(key)).data)

    def delete(self, request, key_id):
        key = get_object_or_404(self.get_queryset(), pk=key_id)
        key.revoke()
        return Response(status=status.HTTP_204_NO_CONTENT)
