import uuid

from django.http import Http404
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_view
from rest_framework import generics
from rest_framework.permissions import IsAuthenticated
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts.models import ApiKey
from billing_app import selectors
from billing_app.models import LedgerEntry, ModelPrice, UsageRecord
from billing_app.serializers import (
    LedgerEntrySerializer,
    ModelPriceSerializer,
    UsageRecordSerializer,
    WalletSerializer,
)
from core.api import ApiError
from core.schema import errors


@extend_schema_view(get=extend_schema(operation_id="models_list", tags=["models"],
                                      responses={200: ModelPriceSerializer(many=True), **errors(401)}))
class ModelListView(generics.ListAPIView):
    """The priced catalogue: the models a session may use."""

    serializer_class = ModelPriceSerializer
    pagination_class = None
    queryset = ModelPrice.objects.order_by("model")


class WalletView(APIView):
    permission_classes = [IsAuthenticated]

    @extend_schema(operation_id="wallet_retrieve", tags=["wallet"], responses={200: WalletSerializer, **errors(401)})
    def get(self, request):
        summary = selectors.wallet_summary(user_id=request.user.pk)
        return Response(WalletSerializer(summary).data)


@extend_schema_view(get=extend_schema(
    operation_id="wallet_ledger_list", tags=["wallet"],
    responses={200: LedgerEntrySerializer(many=True), **errors(401, (404, "No such page."))}))
class LedgerView(generics.ListAPIView):
    serializer_class = LedgerEntrySerializer

    def get_queryset(self):
        return LedgerEntry.objects.filter(user=self.request.user).order_by("-created_at", "-id")


@extend_schema_view(get=extend_schema(
    operation_id="usage_list", tags=["usage"],
    parameters=[OpenApiParameter("session", OpenApiTypes.UUID, description="Only this session's usage."),
                OpenApiParameter("key", OpenApiTypes.UUID, description="Only the usage of this API key of yours "
                                                                       "(revoked ones too).")],
    responses={200: UsageRecordSerializer(many=True),
               **errors((400, "`session` or `key` is not a UUID (`invalid_session`, `invalid_key`)."), 401,
                        (404, "No such page, or `key` is not one of your keys."))},
))
class UsageView(generics.ListAPIView):
    serializer_class = UsageRecordSerializer

    def get_queryset(self):
        qs = UsageRecord.objects.filter(user=self.request.user).order_by("-created_at", "-id")
        session = self.request.query_params.get("session")
        if session is not None:
            try:
                qs = qs.filter(session_id=uuid.UUID(session))
            except ValueError:
                raise ApiError(400, "invalid_session", "session must be a session id (UUID).") from None
        key = self.request.query_params.get("key")
        if key is not None:
            try:
                key_id = uuid.UUID(key)
            except ValueError:
                raise ApiError(400, "invalid_key", "key must be an API key id (UUID).") from None
            if not ApiKey.objects.filter(pk=key_id, user=self.request.user).exists():
                raise Http404  # another user's key answers like a missing one
            qs = qs.filter(api_key_id=key_id)
        return qs
