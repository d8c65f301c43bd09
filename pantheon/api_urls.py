from django.urls import include, path

from billing_app import views as billing
from sessions_app import views as sessions

urlpatterns = [
    path("models", billing.ModelListView.as_view(), name="models"),
    path("wallet", billing.WalletView.as_view(), name="wallet"),
    path("wallet/ledger", billing.LedgerView.as_view(), name="ledger"),
    path("usage", billing.UsageView.as_view(), name="usage"),
    path("sessions", sessions.SessionListCreateView.as_view(), name="sessions"),
    path("sessions/<uuid:session_id>", sessions.SessionDetailView.as_view(), name="session-detail"),
    path("sessions/<uuid:session_id>/messages", sessions.SessionMessagesView.as_view(), name="session-messages"),
    path("sessions/<uuid:session_id>/turns", sessions.SessionTurnsView.as_view(), name="session-turns"),
    path("files", include("files_app.urls")),
]
