"""Upload -> ready through a real `db_worker` run.

The test commits its rows (transaction=True) so a worker in another process sees them. That
worker is `manage.py db_worker --batch` in a subprocess pointed at the test database. The
one case that cannot work that way is SQLite's in-memory test database (another process
cannot open it): there the same worker loop runs in this process instead.
"""

import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import pytest
from django.conf import settings
from django.db import connection
from django.tasks import TaskResultStatus
from django_tasks_db.models import DBTaskResult

from files_app.models import UploadedFile
from files_app.tasks import extract_file_text
from tests.files_app.helpers import upload


def worker_database_url() -> str | None:
    """A DATABASE_URL for the test database, or None for SQLite in memory."""
    params = connection.settings_dict
    if connection.vendor == "postgresql":
        auth = quote(params["USER"] or "", safe="")
        if params["PASSWORD"]:
            auth += ":" + quote(params["PASSWORD"], safe="")
        host = params["HOST"] or "localhost"
        port = f":{params['PORT']}" if params["PORT"] else ""
        return f"postgres://{auth}{'@' if auth else ''}{host}{port}/{quote(params['NAME'], safe='')}"
    if connection.vendor == "sqlite" and not connection.is_in_memory_db():
        return f"sqlite:///{Path(params['NAME']).resolve()}"
    if connection.vendor == "sqlite":
        return None
    pytest.fail(f"no worker set-up for the {connection.vendor} backend")


def run_worker(media_root: Path) -> str:
    url = worker_database_url()
    if url is None:
        from django_tasks_db.management.commands.db_worker import Worker

        Worker(queue_names=["*"], interval=0, batch=True, backend_name="default", startup_delay=False,
               max_tasks=None, worker_id="files-test-worker", excluded_queue_names=[]).run()
        return "in-process"
    env = {**os.environ, "DATABASE_URL": url, "PANTHEON_MEDIA_ROOT": str(media_root),
           "DJANGO_SETTINGS_MODULE": os.environ.get("DJANGO_SETTINGS_MODULE", "pantheon.settings")}
    done = subprocess.run(
        [sys.executable, "manage.py", "db_worker", "--batch", "--no-startup-delay", "--no-reload", "-v", "2"],
        cwd=settings.BASE_DIR, env=env, capture_output=True, text=True, timeout=90, check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


@pytest.mark.django_db(transaction=True)
def test_uploads_are_extracted_by_a_real_worker(alice_api, media_root):
    good = upload(alice_api, "notes.md", "# Notes\nsome ünïcode\n".encode(), "text/markdown")
    bad = upload(alice_api, "broken.json", b'{"a": ', "application/json")
    assert good.status_code == bad.status_code == 201
    assert good.json()["status"] == "pending"
    # Committed with the rows, queued after the commit.
    assert DBTaskResult.objects.filter(status=TaskResultStatus.READY).count() == 2

    log = run_worker(media_root)
    if connection.vendor == "postgresql":
        assert log != "in-process"  # on the production database: a real second process

    ready = alice_api.get(f"/api/v1/files/{good.json()['id']}").json()
    failed = alice_api.get(f"/api/v1/files/{bad.json()['id']}").json()
    assert ready["status"] == "ready", log
    assert failed["status"] == "failed", log
    row = UploadedFile.objects.get(pk=ready["id"])
    assert row.text == "# Notes\nsome ünïcode\n"
    assert row.text_length == len(row.text)
    assert "invalid JSON" in UploadedFile.objects.get(pk=failed["id"]).failure_reason
    # (The worker also ran its periodic turn sweep, which queued its next run.)
    results = DBTaskResult.objects.filter(task_path=extract_file_text.module_path)
    assert {r.status for r in results} == {TaskResultStatus.SUCCESSFUL}
    assert sorted(r.return_value for r in results) == ["failed", "ready"]
