"""Background work of turns, run by `python manage.py db_worker`."""

from __future__ import annotations

import uuid
from datetime import timedelta

from django.conf import settings
from django.tasks import task
from django.utils import timezone

from billing_app.services import UnknownModel
from core.tasks import enqueue, schedule_once
from sessions_app import reconciliation
from sessions_app.models import Turn
from sessions_app.turns import sweep_lapsed_turns

# Waits between lookups of a lagging provider record: the delay, doubling, at most this.
RECONCILE_MAX_BACKOFF = timedelta(minutes=10)
# A pending turn whose task was lost (it crashed) is given up this long after its window.
RECONCILE_ORPHAN_SLACK = timedelta(minutes=15)


@task()
def sweep_turns(every_seconds: float = 0) -> dict[str, int]:
    """Close turns whose lease lapsed (their process died) and release holds left without a
    turn. With `every_seconds`, queue the next sweep, so one enqueue keeps it going."""
    try:
        report = sweep_lapsed_turns()
        orphans = Turn.objects.filter(
            reconciliation=Turn.Reconciliation.PENDING,
            finished_at__lt=timezone.now() - reconciliation.RECONCILE_WINDOW - RECONCILE_ORPHAN_SLACK,
        ).update(reconciliation=Turn.Reconciliation.UNRECONCILED)
    finally:
        if every_seconds:
            schedule_sweep(every_seconds, delay=every_seconds)
    return {"interrupted": report.interrupted, "holds_released": report.holds_released,
            "reconciliations_given_up": orphans}


def schedule_sweep(every_seconds: float | None = None, *, delay: float = 0) -> bool:
    """Queue the periodic sweep (every PANTHEON_TURN_LEASE_SECONDS by default) unless one is
    already waiting. Returns whether it queued."""
    every = every_seconds or settings.PANTHEON_TURN_LEASE_SECONDS
    return schedule_once(sweep_turns, every, delay=delay)


@task()
def reconcile_turn_task(turn_id: str, attempt: int = 0) -> str:
    """Reconcile one estimated turn (SPEC section 13). While the provider's record is not
    there, look again with backoff until RECONCILE_WINDOW after the turn ended; then the
    estimate stands (`unreconciled`)."""
    turn_uuid = uuid.UUID(turn_id)
    try:
        outcome = reconciliation.reconcile_turn(turn_uuid)
    except UnknownModel:  # its model's price was deleted since: nothing to bill it at
        reconciliation.give_up(turn_uuid)
        return "unreconciled"
    if outcome is not reconciliation.Reconciled.NOT_YET:
        return outcome.value
    finished = Turn.objects.filter(pk=turn_uuid).values_list("finished_at", flat=True).first()
    now = timezone.now()
    deadline = (finished or now) + reconciliation.RECONCILE_WINDOW
    if now >= deadline:
        reconciliation.give_up(turn_uuid)
        return "unreconciled"
    wait = min(reconcile_backoff(attempt), deadline - now)
    enqueue(reconcile_turn_task, turn_id, attempt + 1, run_after=now + wait)
    return outcome.value


def reconcile_backoff(attempt: int) -> timedelta:
    """The wait after the `attempt`-th lookup found nothing (0 is the first)."""
    base = max(settings.PANTHEON_RECONCILE_DELAY_SECONDS, 1.0)
    return min(timedelta(seconds=base * 2 ** min(attempt, 20)), RECONCILE_MAX_BACKOFF)


def schedule_reconciliation(turn_id: uuid.UUID) -> None:
    """Queue the reconciliation of a turn that just closed on an estimate."""
    delay = timedelta(seconds=settings.PANTHEON_RECONCILE_DELAY_SECONDS)
    enqueue(reconcile_turn_task, str(turn_id), run_after=timezone.now() + delay)


@task()
def title_session_task(session_id: str) -> str:
    """Give an untitled session a title written by a model (SPEC section 17)."""
    from sessions_app.titles import write_title  # it imports the turn lifecycle, as this module does

    return write_title(uuid.UUID(session_id))


def schedule_title(session_id: uuid.UUID) -> None:
    """Queue the title of a session whose first turn just completed (in that close's transaction)."""
    enqueue(title_session_task, str(session_id))
