from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import call_command
from django.utils import timezone
from django_tasks_db.models import DBTaskResult

from files_app import services
from files_app.models import UploadedFile
from files_app.tasks import extract_file_text, requeue_stale_uploads

pytestmark = pytest.mark.django_db


@pytest.fixture
def stale(alice, make_file):
    """One file pending for an hour, one just uploaded, one already extracted."""
    row = make_file(alice, "stale.txt", b"a", extract=False)
    make_file(alice, "fresh.txt", b"b", extract=False)
    make_file(alice, "done.txt", b"c")
    UploadedFile.objects.filter(pk=row.pk).update(updated_at=timezone.now() - timedelta(hours=1))
    return row


def queued(task) -> list[list]:
    return [t.args_kwargs["args"] for t in DBTaskResult.objects.filter(task_path=task.module_path)]


def test_requeue_stale_pending(stale):
    assert services.requeue_stale_pending(older_than=timedelta(minutes=10)) == 1
    assert queued(extract_file_text) == [[str(stale.id)]]
    # Requeued files are not requeued again straight away.
    assert services.requeue_stale_pending(older_than=timedelta(minutes=10)) == 0

    assert services.run_extraction(stale.id) == "ready"


def test_command_requeues_and_schedules_one_periodic_run(stale):
    out = StringIO()
    call_command("requeue_pending_files", "--older-than", "600", "--every", "300", stdout=out)
    assert "Queued extraction of 1 pending file(s)." in out.getvalue()
    assert "Periodic requeue queued." in out.getvalue()
    assert queued(extract_file_text) == [[str(stale.id)]]
    periodic = DBTaskResult.objects.get(task_path=requeue_stale_uploads.module_path)
    assert periodic.args_kwargs["args"] == [300, 600]
    assert periodic.run_after > timezone.now() + timedelta(seconds=250)

    out = StringIO()
    call_command("requeue_pending_files", "--every", "300", stdout=out)
    assert "already queued" in out.getvalue()
    assert DBTaskResult.objects.filter(task_path=requeue_stale_uploads.module_path).count() == 1


def test_periodic_task_requeues_and_queues_its_next_run(stale):
    assert requeue_stale_uploads.call(120, 600) == 1
    nxt = DBTaskResult.objects.get(task_path=requeue_stale_uploads.module_path)
    assert nxt.args_kwargs["args"] == [120, 600]
    assert queued(extract_file_text) == [[str(stale.id)]]


def test_a_file_still_waiting_in_the_queue_is_not_queued_twice(stale):
    """A backlog on the files queue is not a lost task: no duplicates pile up behind it."""
    services.enqueue_extraction(stale.id)
    assert services.requeue_stale_pending(older_than=timedelta(minutes=10)) == 0
    assert queued(extract_file_text) == [[str(stale.id)]]

    # Its worker claimed it and died mid-run: now it is lost, and queued again.
    DBTaskResult.objects.filter(task_path=extract_file_text.module_path).update(status="RUNNING")
    assert services.requeue_stale_pending(older_than=timedelta(minutes=10)) == 1
    assert queued(extract_file_text) == [[str(stale.id)], [str(stale.id)]]
