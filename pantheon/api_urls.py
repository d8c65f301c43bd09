from django.urls import path

from billing_app import key_views
from billing_app import views as billing
from core.schema import documented
from files_app import views as files
from sessions_app import search_views, turn_schema, turn_views
from sessions_app import views as sessions

urlpatterns = [
    path("models", billing.ModelListView.as_view(), name="models"),
    path("wallet", billing.WalletView.as_view(), name="wallet"),
    path("wallet/ledger", billing.LedgerView.as_view(), name="ledger"),
    path("usage", billing.UsageView.as_view(), name="usage"),
    path("keys", key_views.KeyListCreateView.as_view(), name="keys"),
    path("keys/<uuid:key_id>", key_views.KeyDetailView.as_view(), name="key-detail"),
    path("sessions", sessions.SessionListCreateView.as_view(), name="sessions"),
    path("sessions/<uuid:session_id>", sessions.SessionDetailView.as_view(), name="session-detail"),
    path("sessions/<uuid:session_id>/messages", sessions.SessionMessagesView.as_view(), name="session-messages"),
    path("sessions/<uuid:session_id>/export", search_views.SessionExportView.as_view(), name="session-export"),
    path("search", search_views.SearchView.as_view(), name="search"),
    # Plain async views; each documented() by its stand-in in sessions_app.turn_schema.
    path("sessions/<uuid:session_id>/turns", documented(turn_views.turns, by=turn_schema.SessionTurnsSchema),
         name="session-turns"),
    path("sessions/<uuid:session_id>/turns/stream",
         documented(turn_views.stream_turn, by=turn_schema.SessionTurnStreamSchema), name="session-turns-stream"),
    path("turns/<uuid:turn_id>", documented(turn_views.turn_detail, by=turn_schema.TurnDetailSchema),
         name="turn-detail"),
    path("turns/<uuid:turn_id>/events", documented(turn_views.turn_events, by=turn_schema.TurnEventsSchema),
         name="turn-events"),
    path("turns/<uuid:turn_id>/cancel", documented(turn_views.turn_cancel, by=turn_schema.TurnCancelSchema),
         name="turn-cancel"),
    path("files", files.FileListCreateView.as_view(), name="files"),
    path("files/<uuid:file_id>", files.FileDetailView.as_view(), name="file-detail"),
]
