"""Reconciliation against the loopback fake provider (SPEC section 13, issue 12): real
streams through a real server are cut off, fail or lose their process; the provider's
own record of what it sent then replaces the estimate, with the exact adjustment."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from decimal import Decimal

import pytest
from django.conf import settings as django_settings

from billing_app.models import LedgerEntry, UsageRecord, Wallet
from billing_app.selectors import ledger_problems
from billing_app.services import compute_cost, get_price
from core import db_on_loop
from sessions_app.models import LlmEvent, Turn
from sessions_app.tasks import reconcile_turn_task
from sessions_app.turns import sweep_lapsed_turns
from tests.conftest import MODEL, client_for, subprocess_env
from tests.sessions_app.helpers import auth, read_stream, read_until, wait_until_closed

pytestmark = pytest.mark.usefixtures("fake_openrouter_settings")


@pytest.fixture
def alice_stream(alice, session_of, live_server_url):
    return live_server_url, session_of(alice), auth(client_for(alice))


def provider_record(fake, turn: Turn) -> dict:
    """The fake's final record of the turn's one generation (the id the event stored)."""
    event = LlmEvent.objects.get(turn=turn)
    assert event.generation_id and event.generation_id == fake.generation_ids[-1]
    assert fake.wait_for_generation(event.generation_id)
    return fake.generations[event.generation_id]


def assert_billed_at(turn: Turn, record: dict, *, estimated_cost: Decimal, user) -> None:
    turn.refresh_from_db()
    real = (record["native_tokens_prompt"], record["native_tokens_completion"])
    expected = compute_cost(prompt_tokens=real[0], completion_tokens=real[1], price=get_price(MODEL))
    assert (turn.prompt_tokens, turn.completion_tokens) == real
    assert turn.reconciled and not turn.usage_estimated and turn.cost == expected
    adjustments = LedgerEntry.objects.filter(turn_id=turn.id, kind="adjustment")
    if expected == estimated_cost:
        assert not adjustments.exists()
    else:
        assert [a.amount for a in adjustments] == [estimated_cost - expected]
    usage = UsageRecord.objects.get(turn_id=turn.id)
    assert usage.reconciled and not usage.estimated and usage.cost == expected
    assert usage.provider_cost == Decimal(str(record["total_cost"])).quantize(Decimal("0.000001"))
    assert ledger_problems(user_ids=[user.pk], allow_open_holds=False) == []


def test_a_cancelled_stream_is_reconciled_by_the_db_worker(alice, alice_stream, fake_openrouter, settings,
                                                            monkeypatch):
    settings.PANTHEON_RECONCILE_DELAY_SECONDS = 0
    monkeypatch.setattr(db_on_loop, "fallbacks", db_on_loop.fallbacks.__class__())
    base, session, headers = alice_stream
    fake_openrouter.enqueue(fake_openrouter.slow_stream(pieces=100, delay=0.05))
    read_until(base, session, headers, characters=12)
    turn = wait_until_closed(session=session)
    assert turn.status == "cancelled" and turn.usage_estimated and turn.reconciliation == "pending"
    # The close queued the task with core.sql (core.tasks.enqueue): on PostgreSQL it stayed
    # on the event loop (core.db_on_loop); the worker below runs that row.
    assert not db_on_loop.fallbacks
    estimated_cost = turn.cost
    record = provider_record(fake_openrouter, turn)
    assert record["cancelled"] is True and 0 < record["native_tokens_completion"] < 100

    # The worker runs the queued task (no scheduling step), against the same provider.
    done = subprocess.run(
        [sys.executable, "manage.py", "db_worker", "--batch", "--no-startup-delay", "--no-reload", "-v", "2"],
        cwd=django_settings.BASE_DIR, capture_output=True, text=True, timeout=60,
        env=subprocess_env(PANTHEON_LLM_PROVIDER="openrouter", OPENROUTER_BASE_URL=fake_openrouter.base_url,
                           OPENROUTER_API_KEY="test-key"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert_billed_at(turn, record, estimated_cost=estimated_cost, user=alice)
    assert Wallet.objects.get(user=alice).balance == Decimal(10) - turn.cost


def test_a_failed_stream_is_reconciled_after_the_record_lagged(alice, alice_stream, fake_openrouter):
    base, session, headers = alice_stream
    fake_openrouter.enqueue(fake_openrouter.sse_stream(["one ", "two ", "three"], error_after=2, usage=None))
    _, events, _ = read_stream(base, session, headers)
    assert events[-1][0] == "error"
    turn = wait_until_closed(session=session)
    assert turn.status == "failed" and turn.reconciliation == "pending"
    record = provider_record(fake_openrouter, turn)
    assert record["native_tokens_completion"] == 2

    fake_openrouter.generation_lag = 1  # the provider's record is not there at first
    assert reconcile_turn_task.call(str(turn.id)) == "not_yet"
    turn.refresh_from_db()
    assert turn.reconciliation == "pending" and turn.usage_estimated
    assert reconcile_turn_task.call(str(turn.id), 1) == "done"
    assert_billed_at(turn, record, estimated_cost=turn.cost, user=alice)
    assert fake_openrouter.generation_lookups(record["id"]) == 2


def test_a_completed_stream_with_the_providers_usage_is_never_looked_up(alice, alice_stream, fake_openrouter):
    base, session, headers = alice_stream
    read_stream(base, session, headers)
    turn = wait_until_closed(session=session)
    assert turn.status == "completed" and not turn.usage_estimated and turn.reconciliation == ""
    event = LlmEvent.objects.get(turn=turn)
    # The provider's reported cost is kept for the report (the fake's usage says 0.0001).
    assert event.generation_id == fake_openrouter.generation_ids[-1] and event.provider_cost == Decimal("0.0001")
    assert UsageRecord.objects.get(turn_id=turn.id).provider_cost == Decimal("0.0001")
    assert not LedgerEntry.objects.filter(kind="adjustment").exists()
    assert not [r for r in fake_openrouter.requests if "/generation" in r.path]


def test_an_interrupted_turn_is_reconciled_from_the_providers_record(alice, session_of, fake_openrouter,
                                                                    pantheon_server):
    server = pantheon_server(PANTHEON_LLM_PROVIDER="openrouter", OPENROUTER_BASE_URL=fake_openrouter.base_url,
                             OPENROUTER_API_KEY="test", PANTHEON_TURN_LEASE_SECONDS="2",
                             PANTHEON_CHECKPOINT_SECONDS="0.2")
    session = session_of(alice)
    fake_openrouter.enqueue(fake_openrouter.slow_stream(pieces=200, delay=0.05))

    def kill() -> None:
        time.sleep(0.3)  # a checkpoint
        server.process.send_signal(signal.SIGKILL)
        server.process.wait(timeout=10)

    read_until(server.url, session, auth(client_for(alice)), characters=31, then=kill)
    time.sleep(2.1)  # the lease lapses
    assert sweep_lapsed_turns().interrupted == 1
    turn = Turn.objects.get()
    assert turn.status == "interrupted" and turn.usage_estimated and turn.reconciliation == "pending"
    # The provider saw the connection drop with the process: its record is what it sent.
    record = provider_record(fake_openrouter, turn)
    assert record["cancelled"] is True
    estimated_cost = turn.cost
    assert reconcile_turn_task.call(str(turn.id)) == "done"
    assert_billed_at(turn, record, estimated_cost=estimated_cost, user=alice)
