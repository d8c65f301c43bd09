"""Periodic work on the db_worker: tasks that queue their own next run, started by the
worker itself (`core`'s `db_worker` command), so no operator has to schedule them."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

from django.tasks import Task
from django.utils import timezone

# Each app registers, in its AppConfig.ready(), a function that queues its periodic task.
_starters: list[Callable[[], bool]] = []


def schedule_once(task: Task, *args, delay: float = 0) -> bool:
    """Queue `task(*args)` to run after `delay` seconds, unless a run of it is already
    waiting. Returns whether it queued."""
    from django_tasks_db.models import DBTaskResult

    if DBTaskResult.objects.filter(task_path=task.module_path, status="READY").exists():
        return False
    task.using(run_after=timezone.now() + timedelta(seconds=delay)).enqueue(*args)
    return True


def register_periodic(start: Callable[[], bool]) -> None:
    """Have every db_worker call `start()` (which queues a self-requeuing task, at most once)
    when it starts."""
    if start not in _starters:
        _starters.append(start)


def start_periodic_tasks() -> int:
    """Queue every registered periodic task that is not already waiting; returns how many."""
    return sum(1 for start in _starters if start())
