"""Background work of turns, run by `python manage.py db_worker`."""

from django.conf import settings
from django.tasks import task

from core.tasks import schedule_once
from sessions_app.turns import sweep_lapsed_turns


@task()
def sweep_turns(every_seconds: float = 0) -> dict[str, int]:
    """Close turns whose lease lapsed (their process died) and release holds left without a
    turn. With `every_seconds`, queue the next sweep, so one enqueue keeps it going."""
    try:
        report = sweep_lapsed_turns()
    finally:
        if every_seconds:
            schedule_sweep(every_seconds, delay=every_seconds)
    return {"interrupted": report.interrupted, "holds_released": report.holds_released}


def schedule_sweep(every_seconds: float | None = None, *, delay: float = 0) -> bool:
    """Queue the periodic sweep (every PANTHEON_TURN_LEASE_SECONDS by default) unless one is
    already waiting. Returns whether it queued."""
    every = every_seconds or settings.PANTHEON_TURN_LEASE_SECONDS
    return schedule_once(sweep_turns, every, delay=delay)
