"""A turn's database round trips, counted on the wire (a proxy in front of PostgreSQL) for
the units the streaming path runs on the event loop: a fixed number whatever the history
(docs/performance.md), and the money path's holds still right when a concurrent turn
takes the credits between the preflight's read and its transaction."""

import asyncio
import uuid
from decimal import Decimal

import pytest
from django.db import connection

from billing_app import services as billing
from billing_app.models import CreditHold, Wallet
from core import db_on_loop
from core.db import db_call
from llm_gateway import Usage
from sessions_app.models import Message, Turn
from sessions_app.turns import TurnInput, TurnOutcome, TurnRejected, begin_turn, close_turn, load_preflight, renew_turn
from tests.conftest import MODEL
from tests.round_trips import RoundTripProxy

pytestmark = [
    pytest.mark.skipif(connection.vendor != "postgresql", reason="round trips are PostgreSQL's"),
    pytest.mark.django_db(transaction=True),
]


@pytest.fixture
def fresh_loop_pools(monkeypatch):
    monkeypatch.setattr(db_on_loop, "_pools", {})
    monkeypatch.setattr(db_on_loop, "fallbacks", db_on_loop.fallbacks.__class__())


@pytest.fixture
def proxy(monkeypatch, settings, fresh_loop_pools):
    """The event loop's connections go through a RoundTripProxy: one connection, never
    health-checked between units (that would be a round trip of its own)."""
    settings.PANTHEON_DB_LOOP_CONNECTIONS = 1
    settings.PANTHEON_DB_CHECK_IDLE_SECONDS = 3600
    db = connection.settings_dict
    counting = RoundTripProxy(db["HOST"] or "127.0.0.1", int(db["PORT"] or 5432))
    made = db_on_loop._LoopPool.__init__

    def through_the_proxy(pool):
        made(pool)
        pool.params.update(host="127.0.0.1", port=counting.port)

    monkeypatch.setattr(db_on_loop._LoopPool, "__init__", through_the_proxy)
    yield counting
    counting.close()


async def _counted(proxy: RoundTripProxy, fn, *args, **kwargs):
    proxy.reset()
    result = await db_call(fn, on_loop=True)(*args, **kwargs)
    return result, proxy.answers


async def _one_turn(proxy, user, session, history_length: int, *, as_begun: bool = False) -> dict[str, int]:
    trips = {}
    preflight, trips["preflight read"] = await _counted(proxy, load_preflight, session_id=session.pk, model=None,
                                                        user_id=user.pk)
    assert len(preflight.history) == history_length
    prepared, trips["preflight transaction"] = await _counted(proxy, begin_turn, preflight, TurnInput(content="q"),
                                                              streamed=True)
    _, trips["checkpoint"] = await _counted(proxy, renew_turn, prepared.turn_id, checkpoint="a", chunk_ends=[1])
    outcome = TurnOutcome(status="completed", content="a", usage=Usage(5, 5), served_model=MODEL)
    result, trips["close"] = await _counted(proxy, close_turn, prepared.turn_id, outcome, price=prepared.price,
                                            as_begun=prepared.as_begun if as_begun else None)
    balance = await db_call(lambda: Wallet.objects.get(user=user).balance)()
    assert result.closed and result.balance == balance  # the committed balance
    assert not db_on_loop.fallbacks  # all of it on the loop: through the proxy
    return trips


def _on_a_loop(main):
    """Run `main()` on a new event loop, then close that loop's connections."""
    async def run():
        try:
            return await main()
        finally:
            await db_on_loop.close()
    return asyncio.run(run())


def test_a_streamed_turn_makes_two_round_trips_before_its_call_and_two_at_its_close(proxy, alice, session_of):
    session = session_of(alice, title="Named")

    async def turns():
        # A connection prepares each statement at its first use there: for the preflight's
        # statement alone (no pipeline) one round trip more, once per shape of its values
        # (psycopg's key has their types: the question's parent is NULL in a new root).
        for history in (0, 2):
            await _one_turn(proxy, alice, session, history)
        return [await _one_turn(proxy, alice, session, history) for history in (4, 6)]

    assert _on_a_loop(turns) == [{"preflight read": 1, "preflight transaction": 1, "checkpoint": 1, "close": 2}] * 2
    assert not db_on_loop.fallbacks


def test_the_close_of_the_process_that_began_the_turn_is_one_round_trip(proxy, alice, session_of):
    """As the relay closes its turns (live_turn.finish_turn: close_turn(..., as_begun=))."""
    session = session_of(alice, title="Named")

    async def turns():
        await _one_turn(proxy, alice, session, 0, as_begun=True)
        return [(await _one_turn(proxy, alice, session, history, as_begun=True))["close"] for history in (2, 4)]

    assert _on_a_loop(turns) == [1, 1]
    assert Turn.objects.filter(status="completed").count() == 3


def test_a_turn_closed_by_another_before_its_process_closes_it_is_returned_as_stored(alice, session_of,
                                                                                    fresh_loop_pools):
    """The sweep (or a retry) was first: the one-flight close fails in the server, nothing of
    it is stored, and the careful close returns the turn as the first close stored it."""
    preflight = load_preflight(session_id=session_of(alice).pk, model=None, user_id=alice.pk)
    prepared = begin_turn(preflight, TurnInput(content="q"), streamed=True)
    first = close_turn(prepared.turn_id, TurnOutcome(status="interrupted", content="par", usage=Usage(3, 1)))
    late = TurnOutcome(status="completed", content="partial and more", usage=Usage(5, 5), served_model=MODEL)
    again = _on_a_loop(lambda: db_call(close_turn, on_loop=True)(prepared.turn_id, late, price=prepared.price,
                                                                as_begun=prepared.as_begun))
    assert not again.closed and again.turn.status == "interrupted" and again.message.content == "par"
    assert again.balance == first.balance == Wallet.objects.get(user=alice).balance
    assert Message.objects.filter(role="assistant").count() == 1  # (the stored result is read with the ORM)


def test_the_close_of_an_untitled_session_s_turn_waits_once_more_to_ask_for_its_title(proxy, alice, session_of,
                                                                                      settings):
    session = session_of(alice)

    async def turns():
        settings.PANTHEON_AUTO_TITLE = False
        await _one_turn(proxy, alice, session, 0)
        never = await _one_turn(proxy, alice, session, 2)  # never asks: nothing to wait for
        settings.PANTHEON_AUTO_TITLE = True
        untitled = await _one_turn(proxy, alice, session, 4)  # reads the session row: untitled
        asked = await _one_turn(proxy, alice, session, 6)  # asked once: no more
        return never["close"], untitled["close"], asked["close"]

    assert _on_a_loop(turns) == (2, 3, 2)


def _stale_preflight(user, session):
    """The preflight's read of the wallet, then another turn's hold takes 9.2 of its 10 credits."""
    preflight = load_preflight(session_id=session.pk, model=None, user_id=user.pk)
    billing.hold(user_id=user.pk, turn_id=uuid.uuid4(), model=MODEL, prompt_tokens=9000, max_tokens=100)
    taken = CreditHold.objects.get(user=user).amount
    return preflight, taken


@pytest.mark.open_holds_ok
def test_credits_taken_since_the_preflight_s_read_refuse_the_turn_and_nothing_is_stored(alice, session_of, settings,
                                                                                         fresh_loop_pools):
    settings.PANTHEON_MIN_OUTPUT_TOKENS = settings.PANTHEON_MAX_OUTPUT_TOKENS = 2000
    preflight, taken = _stale_preflight(alice, session_of(alice))
    assert preflight.wallet == (Decimal(10), Decimal(0))  # the read said it could pay
    with pytest.raises(TurnRejected) as refused:
        _on_a_loop(lambda: db_call(begin_turn, on_loop=True)(preflight, TurnInput(content="q"), streamed=True))
    assert refused.value.code == "insufficient_credits"
    assert not db_on_loop.fallbacks
    assert (Turn.objects.count(), Message.objects.count(), CreditHold.objects.count(),
            Wallet.objects.get(user=alice).held) == (0, 0, 1, taken)  # only the other turn's hold


@pytest.mark.open_holds_ok
def test_credits_taken_since_the_preflight_s_read_shrink_the_turn_s_hold_to_what_is_left(alice, session_of, settings,
                                                                                           fresh_loop_pools):
    settings.PANTHEON_MIN_OUTPUT_TOKENS = 10
    settings.PANTHEON_MAX_OUTPUT_TOKENS = 2000
    preflight, taken = _stale_preflight(alice, session_of(alice))
    prepared = _on_a_loop(lambda: db_call(begin_turn, on_loop=True)(preflight, TurnInput(content="q"),
                                                                    streamed=True))
    assert 10 <= prepared.max_tokens < 2000  # sized again, on what the other hold left
    assert not db_on_loop.fallbacks
    wallet = Wallet.objects.get(user=alice)
    assert Turn.objects.get().max_tokens == prepared.max_tokens and CreditHold.objects.count() == 2
    assert wallet.held - taken == CreditHold.objects.get(turn_id=prepared.turn_id).amount
    assert wallet.held <= wallet.balance


def test_a_streamed_turn_sends_a_fixed_few_statements(proxy, alice, session_of, monkeypatch):
    """Every statement costs psycopg's and the server's CPU even inside one round trip: the
    writes to several tables go in one statement (core.sql.write_together), and so does the
    settlement."""
    sent = []
    execute = db_on_loop.LoopCursor.execute
    monkeypatch.setattr(db_on_loop.LoopCursor, "execute", lambda cursor, query, params=None: (
        sent.append(query.split(None, 1)[0]), execute(cursor, query, params))[1])
    session = session_of(alice, title="Named")

    async def turns():
        counts = []
        for history in (0, 2, 4):
            preflight = await db_call(load_preflight, on_loop=True)(session_id=session.pk, model=None,
                                                                    user_id=alice.pk)
            assert len(preflight.history) == history
            sent.clear()
            prepared = await db_call(begin_turn, on_loop=True)(preflight, TurnInput(content="q"), streamed=True)
            begun = list(sent)
            sent.clear()
            await db_call(close_turn, on_loop=True)(
                prepared.turn_id, TurnOutcome(status="completed", content="a", usage=Usage(5, 5), served_model=MODEL),
                price=prepared.price, as_begun=prepared.as_begun)
            counts.append((begun, list(sent)))
        return counts

    # The hold, the turn, its question and the leaf: one statement, a transaction of its own.
    # Then BEGIN; the turn's UPDATE with the answer and its usage; the settlement with the
    # leaf; COMMIT.
    assert _on_a_loop(turns) == [(["WITH"], ["BEGIN", "WITH", "WITH", "COMMIT"])] * 3


def _waits_for_the_wallet_holding_no_session_lock(user, session, work):
    """Run `work()` (on a loop, in a thread) while another transaction holds the user's
    wallet: once it waits for that lock, the session's row must not be locked by it. Returns
    what `work()` returned, once the wallet was let go."""
    import threading

    import psycopg

    from sessions_app.models import ChatSession

    db = connection.settings_dict
    params = {"host": db["HOST"] or "127.0.0.1", "port": int(db["PORT"] or 5432), "user": db["USER"],
              "dbname": db["NAME"]}
    done = {}
    with psycopg.connect(**params) as holder, psycopg.connect(**params) as probe:
        holder.execute(f"SELECT 1 FROM {Wallet._meta.db_table} WHERE user_id = %s FOR UPDATE", [user.pk])
        working = threading.Thread(target=lambda: done.update(result=_on_a_loop(work)))
        working.start()
        try:
            for _ in range(500):  # until it waits for the wallet's row lock
                waiting = probe.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                        "AND datname = %s", [db["NAME"]]).fetchone()[0]
                probe.rollback()
                if waiting:
                    break
                working.join(0.01)
            assert waiting, "it never waited for the wallet"
            # Not locked by the waiting statement: taken at once.
            probe.execute(f"SELECT 1 FROM {ChatSession._meta.db_table} WHERE id = %s FOR UPDATE NOWAIT", [session.pk])
            probe.rollback()
        finally:
            holder.rollback()  # the wallet's lock goes: the work goes on
            working.join(10)
    return done["result"]


def test_the_preflight_s_one_statement_locks_the_session_only_after_the_wallet(alice, session_of, fresh_loop_pools):
    """The hold, the turn, its question and the session's leaf are one statement: its session
    row lock must still come after the wallet's, as in the close (wallet, then session), or
    a preflight and a close of the same user could deadlock."""
    from sessions_app.models import ChatSession

    session = session_of(alice, title="Named")
    preflight = load_preflight(session_id=session.pk, model=None, user_id=alice.pk)
    prepared = _waits_for_the_wallet_holding_no_session_lock(alice, session, lambda: db_call(
        begin_turn, on_loop=True)(preflight, TurnInput(content="q"), streamed=True))
    assert Turn.objects.get(pk=prepared.turn_id).status == "running"
    assert ChatSession.objects.get(pk=session.pk).current_leaf_id == Message.objects.get(role="user").pk
    close_turn(prepared.turn_id, TurnOutcome(status="cancelled"))


def test_the_close_s_settlement_locks_the_session_only_after_the_wallet(alice, session_of, fresh_loop_pools):
    """The settlement and the session's leaf are one statement: the same lock order."""
    from sessions_app.models import ChatSession

    session = session_of(alice, title="Named")
    preflight = load_preflight(session_id=session.pk, model=None, user_id=alice.pk)
    prepared = begin_turn(preflight, TurnInput(content="q"), streamed=True)
    outcome = TurnOutcome(status="completed", content="a", usage=Usage(5, 5), served_model=MODEL)
    result = _waits_for_the_wallet_holding_no_session_lock(alice, session, lambda: db_call(
        close_turn, on_loop=True)(prepared.turn_id, outcome, price=prepared.price, as_begun=prepared.as_begun))
    assert result.closed and result.balance == Wallet.objects.get(user=alice).balance
    assert ChatSession.objects.get(pk=session.pk).current_leaf_id == result.message.id


def test_psycopg_parses_none_of_a_turn_s_statements_on_the_loop(alice, session_of, fresh_loop_pools, monkeypatch):
    """The loop's statements are numbered once (core.db_on_loop._numbered) and sent through
    psycopg's raw cursor: psycopg's own conversion, which it does not cache for a statement
    of over 50 parameters (the turn's writes in one statement), is never reached."""
    from psycopg import _queries

    parsed = []
    for name in ("_query2pg", "_query2pg_nocache"):
        convert = getattr(_queries, name)
        monkeypatch.setattr(_queries, name, lambda query, encoding, convert=convert: (
            parsed.append(bytes(query)[:40]), convert(query, encoding))[1])
    session = session_of(alice, title="Named")

    async def turn():
        preflight = await db_call(load_preflight, on_loop=True)(session_id=session.pk, model=None, user_id=alice.pk)
        prepared = await db_call(begin_turn, on_loop=True)(preflight, TurnInput(content="q"), streamed=True)
        await db_call(renew_turn, on_loop=True)(prepared.turn_id, checkpoint="a", chunk_ends=[1])
        return await db_call(close_turn, on_loop=True)(
            prepared.turn_id, TurnOutcome(status="completed", content="a", usage=Usage(5, 5), served_model=MODEL),
            price=prepared.price, as_begun=prepared.as_begun)

    assert _on_a_loop(turn).closed
    assert not db_on_loop.fallbacks
    assert [query for query in parsed if not query.startswith(b"SELECT set_config")] == []  # (the connection's own)
