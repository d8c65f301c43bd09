import uuid
from datetime import timedelta
from io import StringIO

from django.core.management import call_command
from django.utils import timezone
from django_tasks_db.models import DBTaskResult

from billing_app import services
from billing_app.models import CreditHold
from billing_app.tasks import schedule_sweep, sweep_expired_holds
from tests.conftest import MODEL


def expired_hold(user) -> CreditHold:
    decision = services.hold(user_id=user.pk, turn_id=uuid.uuid4(), model=MODEL, prompt_tokens=10)
    CreditHold.objects.filter(pk=decision.hold_id).update(expires_at=timezone.now() - timedelta(seconds=1))
    return CreditHold.objects.get(pk=decision.hold_id)


def test_sweep_releases_holds_a_dead_stream_left(alice, price):
    hold = expired_hold(alice)
    live = services.hold(user_id=alice.pk, turn_id=uuid.uuid4(), model=MODEL, prompt_tokens=10)
    assert sweep_expired_holds.call() == 1
    hold.refresh_from_db()
    assert hold.released_at is not None
    assert CreditHold.objects.get(pk=live.hold_id).released_at is None
    services.settle(user_id=alice.pk, turn_id=CreditHold.objects.get(pk=live.hold_id).turn_id, cost=0)


def test_periodic_sweep_is_queued_once_and_requeues_itself(alice, price):
    assert schedule_sweep(60) is True
    assert schedule_sweep(60) is False
    assert DBTaskResult.objects.filter(task_path=sweep_expired_holds.module_path).count() == 1
    DBTaskResult.objects.all().delete()
    expired_hold(alice)
    sweep_expired_holds.call(60)
    waiting = DBTaskResult.objects.get(task_path=sweep_expired_holds.module_path, status="READY")
    assert waiting.run_after > timezone.now()


def test_release_expired_holds_command(alice, price):
    expired_hold(alice)
    out = StringIO()
    call_command("release_expired_holds", "--every", "300", stdout=out)
    assert "Released 1 expired hold(s)." in out.getvalue() and "Periodic sweep queued." in out.getvalue()
