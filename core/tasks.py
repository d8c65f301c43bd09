"""Periodic work on the db_worker: tasks that queue their own next run, started by the
worker itself (`core`'s `db_worker` command), so no operator has to schedule them."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from django.db import DEFAULT_DB_ALIAS
from django.db.models import signals
from django.tasks import Task
from django.tasks.signals import task_enqueued
from django.utils import timezone

from core import sql

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


def enqueue(task: Task, *args: Any, run_after: datetime | None = None) -> None:
    """Queue `task(*args)` in the caller's transaction. With django-tasks-db's backend the
    row is core.sql's INSERT, not the ORM's: so the turn's close, a unit of work on the event
    loop (core.db_on_loop, where the ORM is refused), queues a title or a reconciliation
    without going back to the threads, and the INSERT goes out with the close's other
    statements without being waited for. The row is the one the backend's own enqueue
    writes: the model's defaults and `pre_save` (run_after), its signals sent as the ORM
    sends them, then `task_enqueued`. Any other backend: its own enqueue."""
    from django_tasks_db.backend import DatabaseBackend
    from django_tasks_db.compat import normalize_json
    from django_tasks_db.models import DBTaskResult

    if run_after is not None:
        task = task.using(run_after=run_after)
    backend = task.get_backend()
    if not isinstance(backend, DatabaseBackend):
        task.enqueue(*args)
        return
    backend.validate_task(task)
    row = DBTaskResult(id=backend._get_id(), args_kwargs=normalize_json({"args": args, "kwargs": {}}),
                       priority=task.priority, task_path=task.module_path, queue_name=task.queue_name,
                       run_after=task.run_after, backend_name=backend.alias)
    signals.pre_save.send(sender=DBTaskResult, instance=row, raw=False, using=DEFAULT_DB_ALIAS, update_fields=None)
    sql.insert(DBTaskResult, [{field.name: field.pre_save(row, True) for field in DBTaskResult._meta.concrete_fields}])
    row._state.adding = False
    signals.post_save.send(sender=DBTaskResult, instance=row, created=True, update_fields=None, raw=False,
                           using=DEFAULT_DB_ALIAS)
    task_enqueued.send(type(backend), task_result=row.task_result)


def register_periodic(start: Callable[[], bool]) -> None:
    """Have every db_worker call `start()` (which queues a self-requeuing task, at most once)
    when it starts."""
    if start not in _starters:
        _starters.append(start)


def start_periodic_tasks() -> int:
    """Queue every registered periodic task that is not already waiting; returns how many."""
    return sum(1 for start in _starters if start())
