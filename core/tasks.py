"""Periodic work on the db_worker: a task that queues its own next run."""

from datetime import timedelta

from django.tasks import Task
from django.utils import timezone


def schedule_once(task: Task, *args, delay: int = 0) -> bool:
    """Queue `task(*args)` to run after `delay` seconds, unless a run of it is already
    waiting. Returns whether it queued."""
    from django_tasks_db.models import DBTaskResult

    if DBTaskResult.objects.filter(task_path=task.module_path, status="READY").exists():
        return False
    task.using(run_after=timezone.now() + timedelta(seconds=delay)).enqueue(*args)
    return True
