from django.shortcuts import get_object_or_404
from rest_framework import generics, status
from rest_framework.response import Response

from sessions_app.models import ChatSession, Message, Turn
from sessions_app.serializers import (
    MessageSerializer,
    SessionCreateSerializer,
    SessionSerializer,
    TurnSerializer,
)


class SessionListCreateView(generics.GenericAPIView):
    serializer_class = SessionSerializer

    def get_queryset(self):
        return ChatSession.objects.filter(user=self.request.user).order_by("-created_at", "-id")

    def get(self, request):
        page = self.paginate_queryset(self.get_queryset())
        return self.get_paginated_response(SessionSerializer(page, many=True).data)

    def post(self, request):
        incoming = SessionCreateSerializer(data=request.data)
        incoming.is_valid(raise_exception=True)
        session = ChatSession.objects.create(user=request.user, **incoming.validated_data)
        return Response(SessionSerializer(session).data, status=status.HTTP_201_CREATED)


class SessionDetailView(generics.RetrieveAPIView):
    serializer_class = SessionSerializer
    lookup_url_kwarg = "session_id"

    def get_queryset(self):
        return ChatSession.objects.filter(user=self.request.user)


class _SessionChildList(generics.ListAPIView):
    """A page of one of the caller's sessions' children; someone else's session is a 404."""

    def session(self) -> ChatSession:
        return get_object_or_404(ChatSession, pk=self.kwargs["session_id"], user=self.request.user)


class SessionMessagesView(_SessionChildList):
    serializer_class = MessageSerializer

    def get_queryset(self):
        return Message.objects.filter(session=self.session()).order_by("created_at", "position")


class SessionTurnsView(_SessionChildList):
    serializer_class = TurnSerializer

    def get_queryset(self):
        return Turn.objects.filter(session=self.session()).order_by("created_at", "id")
