import pytest
from django.db.migrations.recorder import MigrationRecorder
from django.test import Client

from pantheon import views


@pytest.fixture(autouse=True)
def _fresh_migration_check(monkeypatch):
    """Each test starts with no cached "every migration applied"."""
    monkeypatch.setattr(views, "_migrations_ok_at", None)


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
    assert response.json() == {"detail": "1 migration(s) not applied yet: run manage.py migrate.",
                               "code": "migrations_pending", "database": "ok", "migrations": "1 unapplied"}


@pytest.mark.django_db
def test_the_migration_check_is_cached_once_it_passed_and_repeated_while_it_fails(monkeypatch):
    built = []
    real = views.MigrationExecutor

    def counting(connection):
        built.append(1)
        return real(connection)

    monkeypatch.setattr(views, "MigrationExecutor", counting)
    applied = MigrationRecorder.Migration.objects.filter(app="sessions_app").order_by("-name").first()
    applied.delete()
    assert [Client().get("/healthz").status_code for _ in range(3)] == [503] * 3
    assert len(built) == 3  # pending: checked on every probe, so traffic resumes right after migrate
    applied.save()
    assert [Client().get("/healthz").status_code for _ in range(3)] == [200] * 3
    assert len(built) == 4  # applied: cached for MIGRATIONS_RECHECK_SECONDS
    monkeypatch.setattr(views, "_migrations_ok_at", views._migrations_ok_at - views.MIGRATIONS_RECHECK_SECONDS)
    assert Client().get("/healthz").status_code == 200
    assert len(built) == 5  # and checked again after that


def test_healthz_503_when_the_database_is_unreachable(monkeypatch):
    from django.db import connections

    def refuse(*args, **kwargs):
        from django.db import OperationalError

        raise OperationalError("connection refused")

    monkeypatch.setattr(connections["default"], "cursor", refuse)
    status, body = views.health_status()
    assert status == 503
    assert body["code"] == "database_unavailable" and body["database"] == "error: OperationalError"
