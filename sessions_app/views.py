from django.db import transaction
from django.shortcuts import get_object_or_404
from django.utils import timezone
from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_view
from rest_framework import generics, status
from rest_framework.response import Response

from accounts.models import ApiKey
from core.api import ApiError
from core.schema import errors
from sessions_app import tree
from sessions_app.models import ChatSession, Turn
from sessions_app.serializers import (
    MessageSerializer,
    SessionCreateSerializer,
    SessionSerializer,
    SessionUpdateSerializer,
    TurnSerializer,
)


@extend_schema_view(
    get=extend_schema(operation_id="sessions_list", tags=["sessions"], description="Newest first.",
                      responses={200: SessionSerializer(many=True), **errors(401, (404, "No such page."))}),
    post=extend_schema(operation_id="sessions_create", tags=["sessions"], request=SessionCreateSerializer,
                       responses={201: SessionSerializer,
                                  **errors((400, "Invalid body; a model not in the price list is `unknown_model`."),
                                           401, (403, "`model_not_allowed`: the API key's allow-list excludes "
                                                      "the model; or `csrf_failed`."))}),
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
        key = request.auth if isinstance(request.auth, ApiKey) else None
        model = incoming.validated_data["model"]
        if key is not None and key.allowed_models is not None and model not in key.allowed_models:
            raise ApiError(403, "model_not_allowed", f"This API key may not use the model {model!r}.")
        session = ChatSession.objects.create(user=request.user, **incoming.validated_data)
        return Response(SessionSerializer(session).data, status=status.HTTP_201_CREATED)


@extend_schema_view(
    get=extend_schema(operation_id="sessions_retrieve", tags=["sessions"],
                      responses={200: SessionSerializer, **errors(401, 404)}),
)
class SessionDetailView(generics.RetrieveAPIView):
    serializer_class = SessionSerializer
    lookup_url_kwarg = "session_id"

    def get_queryset(self):
        return ChatSession.objects.filter(user=self.request.user)

    @extend_schema(operation_id="sessions_partial_update", tags=["sessions"], request=SessionUpdateSerializer,
                   description="Rename a session, change its system prompt or switch branch "
                               "(`current_leaf_id`); fields left out stay as they are.",
                   responses={200: SessionSerializer,
                              **errors((400, "Invalid body (`invalid_text`, `invalid_max_length`, ...); a "
                                             "`current_leaf_id` that is not a message of this session is "
                                             "`invalid_parent`."), 401, 403, 404)})
    def patch(self, request, session_id):
        session = self.get_object()
        incoming = SessionUpdateSerializer(data=request.data)
        incoming.is_valid(raise_exception=True)
        changes = dict(incoming.validated_data)
        if "current_leaf_id" in changes:
            # A branch switch: free (SPEC section 17), it only moves the session's pointer.
            leaf = tree.leaf_below(session, changes.pop("current_leaf_id"))
            if leaf is None:
                raise ApiError(400, "invalid_parent", "current_leaf_id is not a message of this session.")
            changes["current_leaf_id"] = leaf
        if changes:
            for field, value in changes.items():
                setattr(session, field, value)
            session.updated_at = timezone.now()
            session.save(update_fields=[*changes, "updated_at"])
        return Response(SessionSerializer(session).data)

    @extend_schema(operation_id="sessions_destroy", tags=["sessions"],
                   description="Delete a session with its turns and messages. Its ledger entries and usage "
                               "records stay (they name the turn and session by id).",
                   responses={204: None, **errors(401, 403, 404, (409, "A turn of the session is still running "
                                                                       "(`turn_running`): stop it or let it end."))})
    def delete(self, request, session_id):
        with transaction.atomic():
            # The row lock orders this against a turn starting in the session (its insert
            # checks the session row): either that turn is seen running here, or it fails.
            session = get_object_or_404(self.get_queryset().select_for_update(), pk=session_id)
            if Turn.objects.filter(session=session, status=Turn.Status.RUNNING).exists():
                # A running turn holds credits and settles into this session's rows.
                raise ApiError(409, "turn_running", "A turn of this session is still running; stop it "
                                                    "(POST /turns/{id}/cancel) or wait for it to end.")
            session.delete()
        return Response(status=status.HTTP_204_NO_CONTENT)


class _SessionChildList(generics.ListAPIView):
    """A page of one of the caller's sessions' children; someone else's session is a 404."""

    def session(self) -> ChatSession:
        return get_object_or_404(ChatSession, pk=self.kwargs["session_id"], user=self.request.user)


@extend_schema_view(get=extend_schema(
    operation_id="sessions_messages_list", tags=["sessions"],
    description="The current branch, root to leaf (SPEC section 17), each message with its parent and its "
                "position among its siblings; `?all=true`: every message of the session, oldest first.",
    parameters=[OpenApiParameter("all", bool, description="Every message of the session, not only the current "
                                                          "branch.")],
    responses={200: MessageSerializer(many=True), **errors(401, (404, "No such session (or not yours), or page."))}))
class SessionMessagesView(_SessionChildList):
    serializer_class = MessageSerializer

    def get_queryset(self):
        session = self.session()
        if self.request.query_params.get("all") in ("true", "1"):
            return tree.everything(session)
        return tree.branch(session)


class SessionTurnsView(_SessionChildList):
    serializer_class = TurnSerializer

    def get_queryset(self):
        return Turn.objects.filter(session=self.session()).order_by("created_at", "id")
