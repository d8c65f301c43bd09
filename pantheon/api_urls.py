from django.urls import path

from billing_app import views as billing
from files_app import views as files
from sessions_app import turn_views
from sessions_app import views as sessions

urlpatterns = [
    path("models", billing.ModelListView.as_view(), name="models"),
    path("wallet", billing.WalletView.as_view(), name="wallet"),
    path("wallet/ledger", billing.LedgerView.as_view(), name="ledger"),
    path("usage", billing.UsageView.as_view(), name="usage"),
    path("sessions", sessions.SessionListCreateView.as_view(), name="sessions"),
    path("sessions/<uuid:session_id>", sessions.SessionDetailView.as_view(), name="session-detail"),
    path("sessions/<uuid:session_id>/messages", sessions.SessionMessagesView.as_view(), name="session-messages"),
    path("sessions/<uuid:session_id>/turns", turn_views.turns, name="session-turns"),
    path("sessions/<uuid:session_id>/turns/stream", turn_views.stream_turn, name="session-turns-stream"),
    path("turns/<uuid:turn_id>", turn_views.turn_detail, name="turn-detail"),
    path("turns/<uuid:turn_id>/events", turn_views.turn_events, name="turn-events"),
    path("turns/<uuid:turn_id>/cancel", turn_views.turn_cancel, name="turn-cancel"),
    path("files", files.FileListCreateView.as_view(), name="files"),
    path("files/<uuid:file_id>", files.FileDetailView.as_view(), name="file-detail"),
]
