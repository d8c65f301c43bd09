import pytest
from django.db.migrations.recorder import MigrationRecorder
from django.test import Client


@pytest.mark.django_db
def test_healthz_ok_without_auth():
    response = Client().get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"database": "ok", "migrations": "ok"}


@pytest.mark.django_db
def test_healthz_503_while_a_migration_is_unapplied():
    applied = MigrationRecorder.Migration.objects.filter(app="sessions_app").order_by("-name").first()
    applied.delete()  # rolled back with the test's transaction
    response = Client().get("/healthz")
    assert response.status_code == 503
    assert response.json() == {"database": "ok", "migrations": "1 unapplied"}
