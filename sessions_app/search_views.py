"""`GET /api/v1/search` and `GET /api/v1/sessions/{id}/export` (SPEC section 17).

Both are DRF views, authenticated like the rest of the API. The export reads `?format=`
itself: DRF takes that parameter (`URL_FORMAT_OVERRIDE`) as its renderer switch, which
would answer `?format=md` with a 404 before the view ran. Rather than move the setting for
every view (`/api/schema/?format=json` relies on it), the export's content negotiation
ignores the parameter: its downloads are plain `HttpResponse`s, its errors JSON whatever
the `Accept` header says (so it never answers 406).
"""

from __future__ import annotations

from django.http import HttpResponse
from django.shortcuts import get_object_or_404
from django.utils.http import content_disposition_header
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import generics, serializers
from rest_framework.negotiation import DefaultContentNegotiation
from rest_framework.views import APIView

from core.api import ApiError
from core.schema import errors
from sessions_app import export, search
from sessions_app.models import ChatSession, Message, Turn
from sessions_app.serializers import TurnSerializer

# --- Search ------------------------------------------------------------------------------


class SearchQuerySerializer(serializers.Serializer):
    """`?q=`: 1 to 200 characters once trimmed, no NUL (`invalid_required`, `invalid_blank`,
    `invalid_max_length`, `invalid_text`)."""

    q = serializers.CharField(max_length=search.MAX_QUERY_CHARS)


class SearchHitSerializer(serializers.Serializer):
    """One hit of `GET /search`: a message of yours, or a session title of yours."""

    session_id = serializers.UUIDField()
    message_id = serializers.UUIDField(allow_null=True, help_text="The message that matched; null when the "
                                                                  "session's title did.")
    title = serializers.CharField(allow_blank=True, help_text="The session's title (empty: untitled).")
    snippet = serializers.CharField(allow_blank=True, help_text=(
        f"Plain text around the match, at most {search.SNIPPET_CHARS} characters (whitespace collapsed, "
        f"`{search.ELLIPSIS}` where the text was cut); no markup."))
    created_at = serializers.DateTimeField(help_text="When the message was written (for a title hit: when the "
                                                     "session was made). Hits are newest first.")


_Q = OpenApiParameter("q", {"type": "string", "minLength": 1, "maxLength": search.MAX_QUERY_CHARS}, required=True,
                      description=(
    "What to look for. On PostgreSQL, full-text search in English: every word must occur (stemmed: `plans` "
    "finds `plan`), `\"a phrase\"` in order, `-word` excludes, `or` between alternatives. On SQLite, a "
    "case-insensitive substring."))


class SearchView(generics.GenericAPIView):
    serializer_class = SearchHitSerializer

    @extend_schema(
        operation_id="search_list", tags=["search"], parameters=[_Q],
        description=("Your own user and assistant messages and your session titles that match `q`, newest first. "
                     "Deleted sessions are not searched."),
        responses={200: SearchHitSerializer(many=True),
                   **errors((400, "`q` missing (`invalid_required`), empty or only spaces (`invalid_blank`), "
                                  f"longer than {search.MAX_QUERY_CHARS} characters (`invalid_max_length`) or "
                                  "with a NUL (`invalid_text`)."), 401, (404, "No such page."))})
    def get(self, request):
        incoming = SearchQuerySerializer(data={"q": request.query_params["q"]} if "q" in request.query_params else {})
        incoming.is_valid(raise_exception=True)
        q = incoming.validated_data["q"]
        page = self.paginate_queryset(search.search_rows(request.user, q))
        hits = [search.hit(row, q) for row in page]
        return self.get_paginated_response(SearchHitSerializer(hits, many=True).data)


# --- Export ------------------------------------------------------------------------------


class _OwnFormatParameter(DefaultContentNegotiation):
    """`?format=` belongs to the view (see the module's docstring); errors are JSON."""

    def select_renderer(self, request, renderers, format_suffix=None):
        return renderers[0], renderers[0].media_type


class ExportMessageSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    parent_id = serializers.UUIDField(allow_null=True, help_text="The message this one follows; null for a root.")
    turn_id = serializers.UUIDField()
    role = serializers.ChoiceField(choices=Message.Role.choices)
    content = serializers.CharField(allow_blank=True)
    tool_calls = serializers.JSONField(allow_null=True, help_text="An assistant message's tool calls "
                                                                  "(OpenAI format), else null.")
    tool_call_id = serializers.CharField(allow_blank=True, help_text="The call a tool message answers.")
    created_at = serializers.DateTimeField()


class ExportTurnSerializer(TurnSerializer):
    kind = serializers.ChoiceField(choices=Turn.Kind.choices, help_text=(
        "`chat`: an exchange of the conversation; `title`: the model call that wrote the session's title."))


class ExportSessionSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    title = serializers.CharField(allow_blank=True)
    model = serializers.CharField()
    system_prompt = serializers.CharField(allow_blank=True)
    current_leaf_id = serializers.UUIDField(allow_null=True, help_text="The end of the current branch.")
    created_at = serializers.DateTimeField()
    updated_at = serializers.DateTimeField()


class ExportSerializer(serializers.Serializer):
    """Declares the schema of the JSON export (the view sends `sessions_app.export.tree`): the
    whole message tree and every turn, with usage and cost."""

    session = ExportSessionSerializer()
    messages = ExportMessageSerializer(many=True, help_text="Every message of the session, every branch, "
                                                            "oldest first.")
    turns = ExportTurnSerializer(many=True, help_text="Every turn of the session, oldest first.")
    exported_at = serializers.DateTimeField()


_FORMAT = OpenApiParameter("format", str, enum=list(export.FORMATS), default="md", description=(
    "`md`: Markdown of the current branch; `json`: the whole tree with every turn's usage and cost."))


_DOWNLOAD = ("The download, with `Content-Disposition: attachment`: `format=md`, the current branch as Markdown "
             "(`text/markdown`); `format=json`, the whole tree (`application/json`).")


class SessionExportView(APIView):
    content_negotiation_class = _OwnFormatParameter
    # core.schema.drf_refusals: no DRF-side 406 (Accept is not negotiated) and no body to refuse.
    drf_methods = frozenset()

    @extend_schema(
        operation_id="sessions_export", tags=["sessions"], parameters=[_FORMAT],
        description=("Download the session (`Content-Disposition: attachment; "
                     "filename=\"pantheon-<title>.<format>\"`). The Markdown has the title as its heading, then "
                     "each message of the current branch (`**User**`, `**Assistant**`), its content as stored; "
                     "a tool result is one line."),
        responses={
            (200, "text/markdown"): OpenApiResponse(OpenApiTypes.STR, description=_DOWNLOAD),
            (200, "application/json"): OpenApiResponse(ExportSerializer, description=_DOWNLOAD),
            **errors((400, "`format` is neither `md` nor `json` (`invalid_format`)."), 401,
                     (404, "No such session, or not yours.")),
        })
    def get(self, request, session_id):
        fmt = request.query_params.get("format", "md")
        if fmt not in export.FORMATS:
            raise ApiError(400, "invalid_format", "format must be `md` or `json`.")
        session = get_object_or_404(ChatSession, pk=session_id, user=request.user)
        response = HttpResponse(export.render(session, fmt), content_type=export.CONTENT_TYPES[fmt])
        response["Content-Disposition"] = content_disposition_header(True, export.filename(session, fmt))
        response["Cache-Control"] = "private, no-store"
        return response
