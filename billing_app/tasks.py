"""Periodic money housekeeping, run by `manage.py db_worker`."""

from django.tasks import task

from billing_app import services
from core.tasks import schedule_once


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
    return schedule_once(sweep_expired_holds, every_seconds, delay=delay)
