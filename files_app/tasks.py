"""Background work of uploaded files, run by `python manage.py db_worker`."""

from datetime import timedelta

from django.tasks import task

from core.tasks import schedule_once
from files_app import services

# Its own queue: an extraction may take up to PANTHEON_EXTRACT_TIMEOUT_SECONDS, and the turn
# sweep and reconciliation (queue "default") must not wait behind a row of uploads.
FILES_QUEUE = "files"


@task(queue_name=FILES_QUEUE)
def extract_file_text(file_id: str) -> str:
    """Extract the text of an uploaded file; marks it `ready` or `failed`. Safe to run twice."""
    return services.run_extraction(file_id)


@task()
def requeue_stale_uploads(every_seconds: int = 0, older_than_seconds: int = 600) -> int:
    """Queue extraction again for uploads pending longer than `older_than_seconds` (a task
    lost after the commit, a worker killed mid-run). With `every_seconds`, queue the next
    run, so one enqueue keeps it going."""
    count = services.requeue_stale_pending(older_than=timedelta(seconds=older_than_seconds))
    if every_seconds:
        schedule_requeue(every_seconds, older_than_seconds=older_than_seconds, delay=every_seconds)
    return count


def schedule_requeue(every_seconds: int, *, older_than_seconds: int, delay: int = 0) -> bool:
    """Queue the periodic requeue unless one is already waiting. Returns whether it queued."""
    return schedule_once(requeue_stale_uploads, every_seconds, older_than_seconds, delay=delay)
