"""Lease renewals and checkpoints (sessions_app.turns.renew_turns, live_turn.renew): the
streams of a process that renew at the same moment share one UPDATE, and each learns its
own turn's state from it."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from core.db import db_call
from sessions_app import live_turn
from sessions_app.models import Turn
from sessions_app.turns import Renewal, RenewRequest, TurnOutcome, close_turn, renew_turns
from tests.conftest import prepared_statements
from tests.sessions_app.helpers import begun_turn


def close_all(turn_ids) -> None:
    """The turns end (the ledger check after each test wants no turn left running)."""
    for turn_id in turn_ids:
        close_turn(turn_id, TurnOutcome(status=Turn.Status.CANCELLED))


@pytest.fixture
def turns(make_user, session_of):
    user = make_user("renewer", "100")
    session = session_of(user)
    made = [begun_turn(user, session, f"q{i}") for i in range(5)]
    yield made
    close_all(prepared.turn_id for prepared in made)


def test_one_update_renews_many_turns_and_answers_for_each(turns, django_assert_num_queries):
    running, cancelled, gone, saved, plain = (prepared.turn_id for prepared in turns)
    Turn.objects.filter(pk=cancelled).update(cancel_requested=True)
    close_turn(gone, TurnOutcome(status=Turn.Status.CANCELLED))
    before = Turn.objects.get(pk=plain)
    requests = [RenewRequest(running), RenewRequest(cancelled), RenewRequest(gone),
                RenewRequest(saved, checkpoint="Hello wor", chunk_ends=[5, 9], generation_id="gen-1",
                             served_model="test/model"),
                RenewRequest(plain)]
    with django_assert_num_queries(1):
        answers = renew_turns(requests)
    assert answers == {running: Renewal.RUNNING, cancelled: Renewal.CANCEL_REQUESTED, gone: Renewal.GONE,
                       saved: Renewal.RUNNING, plain: Renewal.RUNNING}
    stored = Turn.objects.get(pk=saved)
    assert (stored.checkpoint, stored.chunk_ends, stored.generation_id, stored.served_model) == (
        "Hello wor", [5, 9], "gen-1", "test/model")
    after = Turn.objects.get(pk=plain)  # a renewal without a checkpoint keeps what was saved
    assert after.lease_until > before.lease_until
    assert (after.checkpoint, after.chunk_ends, after.generation_id) == (
        before.checkpoint, before.chunk_ends, before.generation_id)
    assert Turn.objects.get(pk=gone).lease_until is None  # an ended turn is left alone
    assert Turn.objects.get(pk=gone).checkpoint == ""


def test_a_checkpoint_can_clear_nothing_it_did_not_save(turns):
    prepared = turns[0]
    renew_turns([RenewRequest(prepared.turn_id, checkpoint="abc", chunk_ends=[3], generation_id="g",
                              served_model="test/model")])
    renew_turns([RenewRequest(prepared.turn_id)])
    stored = Turn.objects.get(pk=prepared.turn_id)
    assert (stored.checkpoint, stored.chunk_ends, stored.generation_id) == ("abc", [3], "g")


@pytest.mark.django_db(transaction=True)
def test_streams_renewing_together_share_one_statement(make_user, session_of, monkeypatch):
    user = make_user("streams", "1000")
    session = session_of(user)
    ids = [begun_turn(user, session, f"q{i}").turn_id for i in range(30)]
    batches = []  # the renewals each unit of database work carried

    def counted(requests):
        batches.append(len(requests))
        return renew_turns(requests)

    monkeypatch.setattr(live_turn, "_renew_all", db_call(counted))

    async def all_renew():
        return await asyncio.gather(*[live_turn.renew(RenewRequest(turn_id, checkpoint="x", chunk_ends=[1]))
                                      for turn_id in ids])

    answers = asyncio.run(all_renew())
    assert answers == [Renewal.RUNNING] * 30
    assert batches == [30]  # asked within RENEW_GATHER_SECONDS of each other: one UPDATE
    assert Turn.objects.filter(pk__in=ids, checkpoint="x").count() == 30
    close_all(ids)


def test_renewals_of_any_batch_size_take_two_prepared_statement_slots(turns):
    # A batch's values travel as arrays: one statement text whatever the batch size, and one
    # for a renewal alone, each prepared once (a text per size would crowd the turn's own
    # statements out of psycopg's 100 per connection: core/sql.py); the checkpoints saved as
    # the rows asked.
    from django.db import connection

    if connection.vendor != "postgresql":
        pytest.skip("prepared statements: PostgreSQL")
    for size in (1, 2, 3, 1):
        answers = renew_turns([RenewRequest(prepared.turn_id, checkpoint=f"part {index}" if index % 2 else None,
                                            chunk_ends=[4, 6] if index % 2 else None, generation_id=f"gen-{index}")
                               for index, prepared in enumerate(turns[:size])])
        assert set(answers.values()) == {Renewal.RUNNING}
    statements = [statement for statement in prepared_statements() if statement.startswith("WITH v(")]
    assert len(statements) == 2, statements
    saved = {turn.id: turn for turn in Turn.objects.filter(pk__in=[prepared.turn_id for prepared in turns[:3]])}
    first, second, third = (saved[prepared.turn_id] for prepared in turns[:3])
    assert (first.checkpoint, first.chunk_ends, first.generation_id) == ("", None, "")
    assert (second.checkpoint, second.chunk_ends, second.generation_id) == ("part 1", [4, 6], "gen-1")
    assert (third.checkpoint, third.chunk_ends) == ("", None)


# --- The LeaseKeeper (driven directly: `renew` replaced by a recorder) ---------------------

@pytest.fixture
def renewals(monkeypatch, settings):
    settings.PANTHEON_CHECKPOINT_SECONDS = 0.05
    made = []

    async def recorded(request: RenewRequest) -> Renewal:
        made.append(request)
        return Renewal.RUNNING

    monkeypatch.setattr(live_turn, "renew", recorded)
    return made


async def test_a_keeper_stopped_within_its_first_period_made_no_task_and_no_write(renewals):
    """Most turns end before a checkpoint is due: their keepers cost a timer, not a task."""
    tasks = len(asyncio.all_tasks())
    keeper = live_turn.LeaseKeeper(uuid.uuid4(), parts=["a"]).start()
    await asyncio.sleep(0.01)
    assert len(asyncio.all_tasks()) == tasks
    await keeper.stop()
    await asyncio.sleep(0.08)  # past the period: nothing was left scheduled
    assert renewals == []


async def test_after_its_first_period_a_keeper_saves_the_partial_answer_then_again_when_it_grew(renewals):
    parts = ["a"]
    keeper = live_turn.LeaseKeeper(uuid.uuid4(), parts=parts).start()
    await asyncio.sleep(0.08)
    assert [r.checkpoint for r in renewals] == ["a"]
    parts.append("b")
    await asyncio.sleep(0.06)
    await keeper.stop()
    assert [r.checkpoint for r in renewals] == ["a", "ab"]


async def test_a_poke_within_the_first_period_makes_the_keeper_look_at_once(renewals, settings):
    settings.PANTHEON_CHECKPOINT_SECONDS = 5
    keeper = live_turn.LeaseKeeper(uuid.uuid4(), parts=["a"], watched=lambda: True).start()
    keeper.poke()
    await asyncio.sleep(0.02)
    await keeper.stop()
    assert [r.checkpoint for r in renewals] == ["a"]
