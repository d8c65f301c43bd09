"""Periodic money housekeeping, run by `manage.py db_worker`."""

from datetime import timedelta

from django.tasks import task
from django.utils import timezone

from billing_app import services


@task()
def sweep_expired_holds(every_seconds: int = 0) -> int:
    """Release holds whose stream never settled (its process was killed). With
    `every_seconds`, queue the next sweep, so one enqueue keeps it going."""
    released = services.release_expired_holds()
    if every_seconds:
        schedule_sweep(every_seconds, delay=every_seconds)
    return released


def schedule_sweep(every_seconds: int, *, delay: int = 0) -> bool:
    """Queue the periodic sweep unless one is already waiting. Returns whether it queued."""
    from django_tasks_db.models import DBTaskResult

    waiting = DBTaskResult.objects.filter(task_path=sweep_expired_holds.module_path, status="READY")
    if waiting.exists():
        return False
    sweep_expired_holds.using(run_after=timezone.now() + timedelta(seconds=delay)).enqueue(every_seconds)
    return True
