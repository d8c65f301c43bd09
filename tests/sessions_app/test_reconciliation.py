"""Provider cost reconciliation (SPEC section 13, issue 12): the money of it, with a stub
provider record. The same cases against the loopback fake provider, through a real server
and the db_worker, are in test_reconciliation_live.py."""

from __future__ import annotations

import uuid
from datetime import timedelta
from decimal import Decimal

import pytest
from django.utils import timezone
from django_tasks_db.models import DBTaskResult

from billing_app.models import LedgerEntry, UsageRecord, Wallet
from billing_app.services import compute_cost, get_price
from llm_gateway import CallRecord, Generation, GenerationNotFound, LlmGateway, UpstreamError, Usage
from sessions_app import reconciliation
from sessions_app.models import LlmEvent, Turn
from sessions_app.reconciliation import Reconciled, reconcile_turn
from sessions_app.tasks import reconcile_turn_task
from sessions_app.turns import TurnOutcome, close_turn
from tests.conftest import MODEL
from tests.sessions_app.helpers import begun_turn

TASK_PATH = reconcile_turn_task.module_path


class StubProvider(LlmGateway):
    """Records by generation id; an id missing answers 404, `failing` ids a 500."""

    name = "stub"

    def __init__(self, records: dict[str, tuple[int, int, str | None]] | None = None) -> None:
        self.records = dict(records or {})
        self.failing: set[str] = set()
        self.asked: list[str] = []

    async def generate(self, **kwargs):  # pragma: no cover - not used
        raise NotImplementedError

    async def stream(self, **kwargs):  # pragma: no cover - not used
        raise NotImplementedError

    async def generation(self, generation_id: str) -> Generation:
        self.asked.append(generation_id)
        if generation_id in self.failing:
            raise UpstreamError("HTTP 500", status=500)
        if generation_id not in self.records:
            raise GenerationNotFound("no such generation")
        prompt, completion, cost = self.records[generation_id]
        return Generation(id=generation_id, prompt_tokens=prompt, completion_tokens=completion,
                          total_cost=Decimal(cost) if cost else None, cancelled=True)


@pytest.fixture
def provider(monkeypatch):
    stub = StubProvider()
    monkeypatch.setattr(reconciliation, "get_gateway", lambda upstream=None: stub)
    return stub


def accepted(generation_id: str = "", *, usage: Usage | None = None, status: str = "cancelled") -> CallRecord:
    return CallRecord(requested_model=MODEL, status=status, http_status=200, stream=True,
                      generation_id=generation_id, usage=usage)


def refused(status: int = 502) -> CallRecord:
    return CallRecord(requested_model=MODEL, status="error", http_status=status, error=f"HTTP {status}")


def closed_turn(user, session, *records: CallRecord, status: str = Turn.Status.CANCELLED,
                content: str = "a partial answer of some words", usage: Usage | None = None, **fields) -> Turn:
    prepared = begun_turn(user, session, **fields)
    close_turn(prepared.turn_id, TurnOutcome(status=status, content=content, records=list(records), usage=usage))
    return Turn.objects.get(pk=prepared.turn_id)


def cost_of(prompt: int, completion: int) -> Decimal:
    return compute_cost(prompt_tokens=prompt, completion_tokens=completion, price=get_price(MODEL))


def reconcile_tasks() -> list[DBTaskResult]:
    return list(DBTaskResult.objects.filter(task_path=TASK_PATH).order_by("enqueued_at"))


def test_an_estimated_turn_is_queued_for_reconciliation_and_billed_at_the_providers_count(
        alice, session_of, provider, settings):
    settings.PANTHEON_RECONCILE_DELAY_SECONDS = 60
    turn = closed_turn(alice, session_of(alice), accepted("gen-a"))
    assert turn.usage_estimated and turn.reconciliation == "pending" and not turn.reconciled
    estimated_cost = turn.cost
    assert estimated_cost > 0
    # The close queued exactly one task, due a delay after the turn ended.
    [queued] = reconcile_tasks()
    assert queued.args_kwargs["args"] == [str(turn.id)]
    assert timedelta(seconds=59) < queued.run_after - turn.finished_at < timedelta(seconds=61)

    provider.records["gen-a"] = (4, 3, "0.00002")
    assert reconcile_turn(turn.id) is Reconciled.DONE
    turn.refresh_from_db()
    assert (turn.prompt_tokens, turn.completion_tokens, turn.usage_estimated) == (4, 3, False)
    assert turn.reconciled and turn.cost == cost_of(4, 3)
    adjustment = LedgerEntry.objects.get(turn_id=turn.id, kind="adjustment")
    assert adjustment.amount == estimated_cost - cost_of(4, 3)
    assert "Provider's count for your cancelled turn: 4 prompt + 3 output tokens" in adjustment.note
    assert "credited back" in adjustment.note
    usage = UsageRecord.objects.get(turn_id=turn.id)
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (4, 3, 7)
    assert usage.reconciled and not usage.estimated and usage.cost == turn.cost
    assert usage.provider_cost == Decimal("0.00002")
    event = LlmEvent.objects.get(turn=turn)
    assert (event.prompt_tokens, event.completion_tokens, event.provider_cost) == (4, 3, Decimal("0.00002"))
    assert Wallet.objects.get(user=alice).balance == Decimal(10) - cost_of(4, 3)


def test_reconciling_twice_writes_one_adjustment(alice, session_of, provider):
    turn = closed_turn(alice, session_of(alice), accepted("gen-a"))
    provider.records["gen-a"] = (1, 1, None)
    assert reconcile_turn(turn.id) is Reconciled.DONE
    assert reconcile_turn(turn.id) is Reconciled.NOTHING_TO_DO
    assert reconcile_turn_task.call(str(turn.id)) == "nothing_to_do"
    assert LedgerEntry.objects.filter(turn_id=turn.id, kind="adjustment").count() == 1
    assert provider.asked == ["gen-a"]  # a reconciled turn is not looked up again


def test_a_provider_count_above_the_estimate_charges_the_difference_capped_at_the_hold(alice, session_of, provider):
    turn = closed_turn(alice, session_of(alice), accepted("gen-a"), max_tokens=20)
    provider.records["gen-a"] = (900, 5000, None)  # far more output than the hold covered
    assert reconcile_turn(turn.id) is Reconciled.DONE
    turn.refresh_from_db()
    assert turn.completion_tokens == turn.max_tokens == 20 and turn.prompt_tokens == 900
    adjustment = LedgerEntry.objects.get(turn_id=turn.id, kind="adjustment")
    assert adjustment.amount < 0 and "charged" in adjustment.note


@pytest.fixture
def rich(make_user):
    """A user who can afford tool turns (their hold covers every round)."""
    return make_user("rich", "1000")


def test_every_call_of_a_tool_turn_is_reconciled_and_summed(rich, session_of, provider):
    records = [refused(502), accepted("gen-1", status="ok"), accepted("gen-2", status="ok"),
               accepted("gen-3", status="error")]
    turn = closed_turn(rich, session_of(rich), *records, status=Turn.Status.FAILED, tools_enabled=True)
    assert turn.reconciliation == "pending"
    provider.records.update({"gen-1": (100, 10, "0.1"), "gen-2": (150, 20, "0.2"), "gen-3": (200, 7, "0.3")})
    assert reconcile_turn(turn.id) is Reconciled.DONE
    turn.refresh_from_db()
    assert (turn.prompt_tokens, turn.completion_tokens) == (450, 37)
    assert turn.cost == cost_of(450, 37)
    assert UsageRecord.objects.get(turn_id=turn.id).provider_cost == Decimal("0.6")
    assert sorted(provider.asked) == ["gen-1", "gen-2", "gen-3"]
    # The refused call (no generation) counts nothing and keeps its row as it was.
    assert LlmEvent.objects.get(turn=turn, http_status=502).prompt_tokens is None


def test_a_call_that_reported_its_usage_counts_as_reported(rich, session_of, provider):
    records = [accepted(usage=Usage(prompt_tokens=30, completion_tokens=4), status="ok"), accepted("gen-2")]
    turn = closed_turn(rich, session_of(rich), *records, tools_enabled=True)
    assert turn.reconciliation == "pending"
    provider.records["gen-2"] = (60, 2, None)
    assert reconcile_turn(turn.id) is Reconciled.DONE
    turn.refresh_from_db()
    assert (turn.prompt_tokens, turn.completion_tokens) == (90, 6)


def test_a_turn_billed_on_the_providers_usage_is_not_reconciled(alice, session_of, provider):
    turn = closed_turn(alice, session_of(alice), accepted("gen-a", status="ok"), status=Turn.Status.COMPLETED,
                       usage=Usage(prompt_tokens=12, completion_tokens=3))
    assert not turn.usage_estimated and turn.reconciliation == "" and reconcile_tasks() == []
    assert reconcile_turn(turn.id) is Reconciled.NOTHING_TO_DO and provider.asked == []
    assert not LedgerEntry.objects.filter(kind="adjustment").exists()


def test_a_turn_that_produced_nothing_is_free_and_not_reconciled(alice, session_of, provider):
    turn = closed_turn(alice, session_of(alice), refused(400), status=Turn.Status.FAILED, content="")
    assert turn.cost == 0 and turn.reconciliation == "" and reconcile_tasks() == []


@pytest.mark.parametrize("records", [
    [accepted()],  # the provider gave no generation id
    [accepted("gen-a"), accepted()],  # one accepted call cannot be looked up
])
def test_an_estimate_that_cannot_be_looked_up_stands_visibly(alice, session_of, provider, records):
    turn = closed_turn(alice, session_of(alice), *records)
    assert turn.usage_estimated and turn.reconciliation == "unreconciled" and reconcile_tasks() == []


def test_a_record_not_there_yet_is_looked_up_again_with_backoff(alice, session_of, provider, settings):
    settings.PANTHEON_RECONCILE_DELAY_SECONDS = 60
    turn = closed_turn(alice, session_of(alice), accepted("gen-a"), accepted("gen-b"))
    DBTaskResult.objects.all().delete()
    provider.records["gen-a"] = (5, 5, None)  # gen-b: 404 for now
    before = timezone.now()
    assert reconcile_turn_task.call(str(turn.id)) == "not_yet"
    [retry] = reconcile_tasks()
    assert retry.args_kwargs["args"] == [str(turn.id), 1]
    assert timedelta(seconds=59) < retry.run_after - before < timedelta(seconds=62)
    assert not LedgerEntry.objects.filter(kind="adjustment").exists()
    turn.refresh_from_db()
    assert turn.reconciliation == "pending" and turn.usage_estimated

    # The second wait is twice the first; an error answer is retried like a 404.
    provider.failing.add("gen-a")
    DBTaskResult.objects.all().delete()
    assert reconcile_turn_task.call(str(turn.id), 1) == "not_yet"
    [retry] = reconcile_tasks()
    assert timedelta(seconds=119) < retry.run_after - before < timedelta(seconds=123)

    provider.failing.clear()
    provider.records["gen-b"] = (7, 1, None)
    assert reconcile_turn_task.call(str(turn.id), 2) == "done"
    turn.refresh_from_db()
    assert turn.reconciled and (turn.prompt_tokens, turn.completion_tokens) == (12, 6)


def test_after_an_hour_without_a_record_the_estimate_stands(alice, session_of, provider):
    turn = closed_turn(alice, session_of(alice), accepted("gen-a"))
    estimated = turn.cost
    DBTaskResult.objects.all().delete()
    # The last lookup is due at the hour, not past it.
    Turn.objects.filter(pk=turn.pk).update(finished_at=timezone.now() - timedelta(minutes=59, seconds=30))
    assert reconcile_turn_task.call(str(turn.id), 7) == "not_yet"
    [last] = reconcile_tasks()
    assert last.run_after - timezone.now() < timedelta(seconds=31)
    Turn.objects.filter(pk=turn.pk).update(finished_at=timezone.now() - timedelta(hours=1, seconds=1))
    assert reconcile_turn_task.call(str(turn.id), 8) == "unreconciled"
    turn.refresh_from_db()
    assert turn.reconciliation == "unreconciled" and turn.cost == estimated and turn.usage_estimated
    assert len(reconcile_tasks()) == 1  # nothing queued after giving up
    assert not LedgerEntry.objects.filter(kind="adjustment").exists()


def test_a_turn_whose_price_was_deleted_is_left_unreconciled(alice, session_of, provider):
    from billing_app.models import ModelPrice

    turn = closed_turn(alice, session_of(alice), accepted("gen-a"))
    provider.records["gen-a"] = (5, 5, None)
    ModelPrice.objects.filter(model=MODEL).delete()
    assert reconcile_turn_task.call(str(turn.id)) == "unreconciled"
    turn.refresh_from_db()
    assert turn.reconciliation == "unreconciled"


def test_the_sweep_gives_up_a_pending_turn_whose_task_was_lost(alice, session_of, provider):
    from sessions_app.tasks import sweep_turns

    turn = closed_turn(alice, session_of(alice), accepted("gen-a"))
    DBTaskResult.objects.all().delete()  # the task crashed, or was deleted
    Turn.objects.filter(pk=turn.pk).update(finished_at=timezone.now() - timedelta(hours=2))
    assert sweep_turns.call()["reconciliations_given_up"] == 1
    turn.refresh_from_db()
    assert turn.reconciliation == "unreconciled"


def test_the_turn_and_usage_apis_say_reconciled(alice, alice_api, session_of, provider):
    session = session_of(alice)
    turn = closed_turn(alice, session, accepted("gen-a"))
    provider.records["gen-a"] = (3, 3, None)
    reconcile_turn(turn.id)
    [listed] = alice_api.get(f"/api/v1/sessions/{session.id}/turns").json()["results"]
    assert listed["usage"]["reconciled"] is True and listed["usage"]["estimated"] is False
    assert alice_api.get(f"/api/v1/turns/{turn.id}").json()["usage"]["reconciled"] is True
    [usage] = alice_api.get("/api/v1/usage").json()["results"]
    assert usage["reconciled"] is True and usage["total_tokens"] == 6
    ledger = alice_api.get("/api/v1/wallet/ledger").json()["results"]
    assert ledger[0]["kind"] == "adjustment" and ledger[0]["turn_id"] == str(turn.id)


def test_an_unknown_turn_id_is_nothing_to_do(db, provider):
    assert reconcile_turn_task.call(str(uuid.uuid4())) == "nothing_to_do"
