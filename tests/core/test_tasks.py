"""core.tasks.enqueue: the row django-tasks-db's own enqueue writes, with core.sql's INSERT
(so the turn's close can queue a task on the event loop, core.db_on_loop)."""

from datetime import timedelta

import pytest
from django.tasks.signals import task_enqueued
from django.utils import timezone
from django_tasks_db.models import DBTaskResult, get_date_max

from core import sql
from core.tasks import enqueue
from sessions_app.tasks import reconcile_turn_task, title_session_task

pytestmark = pytest.mark.django_db

SAME = ("status", "args_kwargs", "priority", "task_path", "worker_ids", "queue_name", "backend_name",
        "started_at", "finished_at", "return_value", "exception_class_path", "traceback")


def _row(result_id) -> dict:
    row = DBTaskResult.objects.get(pk=result_id)
    return {name: getattr(row, name) for name in SAME}


def test_the_row_is_the_one_the_backend_writes():
    theirs = title_session_task.enqueue("4f1c0c5e-1a52-4a8e-9d38-0a0cf7d1a7c1").id
    with sql.transaction():
        enqueue(title_session_task, "4f1c0c5e-1a52-4a8e-9d38-0a0cf7d1a7c1")
    ours = DBTaskResult.objects.exclude(pk=theirs).get()
    assert _row(ours.pk) == _row(theirs)
    assert ours.run_after == get_date_max()  # the model's pre_save: "no run_after" is the far future
    assert abs(ours.enqueued_at - timezone.now()) < timedelta(seconds=5)
    result = title_session_task.get_result(str(ours.pk))  # the worker's view of it
    assert result.args == ["4f1c0c5e-1a52-4a8e-9d38-0a0cf7d1a7c1"] and result.status == "READY"


def test_run_after_and_the_enqueued_signal():
    seen = []

    def receiver(sender, task_result, **kwargs):
        seen.append(task_result)

    task_enqueued.connect(receiver)
    try:
        later = timezone.now() + timedelta(minutes=3)
        enqueue(reconcile_turn_task, "x", run_after=later)
    finally:
        task_enqueued.disconnect(receiver)
    row = DBTaskResult.objects.get()
    assert row.run_after == later and row.args_kwargs == {"args": ["x"], "kwargs": {}}
    assert [str(result.id) for result in seen] == [str(row.pk)]
    assert seen[0].task.module_path == reconcile_turn_task.module_path


def test_nothing_is_queued_when_the_transaction_rolls_back():
    with pytest.raises(RuntimeError), sql.transaction():
        enqueue(title_session_task, "y")
        raise RuntimeError("the rest of the transaction failed")
    assert not DBTaskResult.objects.exists()
