"""Session titles written by a model (SPEC section 17): a `title` turn after the first
completed turn, paid through the same hold and settlement, deterministic with the fake."""

from __future__ import annotations

from decimal import Decimal

import pytest
from django_tasks_db.models import DBTaskResult

from billing_app import services
from billing_app.models import LedgerEntry, Wallet
from sessions_app.models import ChatSession, Message, Turn
from sessions_app.titles import write_title
from sessions_app.turns import TurnOutcome, clean_title, close_turn
from tests.sessions_app.helpers import begun_turn

TITLE_TASK = "sessions_app.tasks.title_session_task"


@pytest.fixture
def fake_model(settings):
    settings.PANTHEON_LLM_PROVIDER = "fake"
    settings.PANTHEON_FAKE_CHUNK_DELAY_SECONDS = 0
    services.set_price(model="fake/echo", prompt_per_mtok=Decimal("1000"), completion_per_mtok=Decimal("2000"))
    services.set_price(model="fake/error", prompt_per_mtok=Decimal("1000"), completion_per_mtok=Decimal("2000"))


def first_turn(user, session, question="Plan a trip to Lisbon next spring, please") -> Turn:
    prepared = begun_turn(user, session, question, model="fake/echo")
    close_turn(prepared.turn_id, TurnOutcome(status=Turn.Status.COMPLETED, content="Here is a plan.",
                                             prompt_processed=True, served_model="fake/echo"))
    return Turn.objects.get(pk=prepared.turn_id)


def test_the_first_completed_turn_queues_a_title_paid_like_a_turn(alice, fake_model):
    session = ChatSession.objects.create(user=alice, model="fake/echo")
    first_turn(alice, session)
    queued = DBTaskResult.objects.filter(task_path=TITLE_TASK)
    assert queued.count() == 1 and queued.get().args_kwargs["args"] == [str(session.id)]
    leaf, messages = ChatSession.objects.get(pk=session.pk).current_leaf_id, Message.objects.count()
    balance = Wallet.objects.get(user=alice).balance

    assert write_title(session.id) == "titled"
    session.refresh_from_db()
    assert session.title == "Plan a trip to Lisbon"  # the fake's: the question's first five words
    title_turn = Turn.objects.get(session=session, kind=Turn.Kind.TITLE)
    assert title_turn.status == Turn.Status.COMPLETED and title_turn.cost > 0
    debit = LedgerEntry.objects.get(turn_id=title_turn.id, kind=LedgerEntry.Kind.DEBIT)
    assert debit.note == "completed title turn" and debit.amount == -title_turn.cost
    assert Wallet.objects.get(user=alice).balance == balance - title_turn.cost
    # Not part of the conversation: no message, the branch unchanged.
    assert Message.objects.count() == messages and session.current_leaf_id == leaf
    # Once asked, never again; a titled session's next turns queue nothing.
    assert write_title(session.id) == "titled"
    first_turn(alice, session, "And then Porto?")
    assert DBTaskResult.objects.filter(task_path=TITLE_TASK).count() == 1


def test_turns_completing_before_the_title_task_ran_queue_no_second_one(alice, fake_model):
    session = ChatSession.objects.create(user=alice, model="fake/echo")
    first_turn(alice, session)
    first_turn(alice, session, "And then Porto?")  # the worker has not run the first task yet
    first_turn(alice, session, "And Coimbra?")
    assert DBTaskResult.objects.filter(task_path=TITLE_TASK).count() == 1
    assert ChatSession.objects.get(pk=session.pk).title_requested


def test_the_turns_list_tells_a_title_turn_from_the_conversation_s(alice, alice_api, fake_model):
    session = ChatSession.objects.create(user=alice, model="fake/echo")
    first_turn(alice, session)
    write_title(session.id)
    turns = alice_api.get(f"/api/v1/sessions/{session.id}/turns").json()["results"]
    assert sorted(turn["kind"] for turn in turns) == ["chat", "title"]


def test_no_title_when_the_wallet_cannot_afford_it(make_user, fake_model):
    poor = make_user("poor", "0.1")
    session = ChatSession.objects.create(user=poor, model="fake/echo")
    first_turn(poor, session)
    wallet = Wallet.objects.get(user=poor)  # spent down to nothing, the ledger saying so
    LedgerEntry.objects.create(wallet=wallet, user=poor, kind="adjustment", amount=-wallet.balance,
                               balance_after=Decimal("0"), note="test: spent")
    Wallet.objects.filter(user=poor).update(balance=Decimal("0"))
    assert write_title(session.id) == "insufficient_credits"
    session.refresh_from_db()
    assert session.title == "" and not Turn.objects.filter(kind=Turn.Kind.TITLE).exists()


def test_a_failing_title_model_leaves_the_session_untitled_without_retry(alice, fake_model, settings):
    settings.PANTHEON_TITLE_MODEL = "fake/error"
    session = ChatSession.objects.create(user=alice, model="fake/echo")
    first_turn(alice, session)
    assert write_title(session.id) == Turn.Status.FAILED
    session.refresh_from_db()
    assert session.title == ""
    failed = Turn.objects.get(kind=Turn.Kind.TITLE)
    assert failed.status == Turn.Status.FAILED and failed.served_model == "fake/error"
    assert write_title(session.id) == "already_asked"


def test_auto_title_off_queues_nothing(alice, fake_model, settings):
    settings.PANTHEON_AUTO_TITLE = False
    session = ChatSession.objects.create(user=alice, model="fake/echo")
    first_turn(alice, session)
    assert not DBTaskResult.objects.filter(task_path=TITLE_TASK).exists()


@pytest.mark.parametrize(("raw", "title"), [
    ('"Trip to Lisbon."', "Trip to Lisbon"),
    ("Title: Planning a spring trip\nsecond line", "Planning a spring trip"),
    ("one two three four five six seven eight nine ten", "one two three four five six seven eight"),
    ("x" * 200, "x" * 80),
    ("\n\n  **Bold title**  ", "Bold title"),
])
def test_titles_are_one_short_line(raw, title):
    assert clean_title(raw) == title
