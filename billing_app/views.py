import uuid

from rest_framework import generics
from rest_framework.permissions import IsAuthenticated
from rest_framework.response import Response
from rest_framework.views import APIView

from billing_app import selectors
from billing_app.models import LedgerEntry, ModelPrice, UsageRecord
from billing_app.serializers import (
    LedgerEntrySerializer,
    ModelPriceSerializer,
    UsageRecordSerializer,
    WalletSerializer,
)
from core.api import ApiError


class ModelListView(generics.ListAPIView):
    """The priced catalogue: the models a session may use."""

    serializer_class = ModelPriceSerializer
    pagination_class = None
    queryset = ModelPrice.objects.order_by("model")


class WalletView(APIView):
    permission_classes = [IsAuthenticated]

    def get(self, request):
        summary = selectors.wallet_summary(user_id=request.user.pk)
        return Response(WalletSerializer(summary).data)


class LedgerView(generics.ListAPIView):
    serializer_class = LedgerEntrySerializer

    def get_queryset(self):
        return LedgerEntry.objects.filter(user=self.request.user).order_by("-created_at", "-id")


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
        return qs
