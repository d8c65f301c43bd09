"""Durable turns (SPEC section 10, issue 9): every way a turn can end, through a real server.

Each test is one of the defects found on main before turns were durable, or one of its kind.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from decimal import Decimal

import httpx
import pytest
from django.core.management import call_command
from django.db import connection
from django.utils import timezone

from billing_app.models import CreditHold, LedgerEntry, Wallet
from billing_app.selectors import ledger_problems
from sessions_app import live_turn
from sessions_app.models import Message, Turn
from sessions_app.turns import sweep_lapsed_turns
from tests.conftest import client_for
from tests.sessions_app.helpers import auth, read_stream, read_until, stream_url, wait_until_closed

pytestmark = pytest.mark.usefixtures("fake_openrouter_settings")
postgres_only = pytest.mark.skipif(connection.vendor != "postgresql", reason="concurrency is tested on PostgreSQL")


@pytest.fixture
def short_lease(settings):
    """A 2-second lease (the minimum), checkpoints every 0.2 s."""
    settings.PANTHEON_TURN_LEASE_SECONDS = 2
    settings.PANTHEON_CHECKPOINT_SECONDS = 0.2
    return settings


@pytest.fixture
def alice_stream(alice, session_of, live_server_url):
    return live_server_url, session_of(alice), auth(client_for(alice))


def turns_url(session) -> str:
    return f"/api/v1/sessions/{session.id}/turns"


def sse_chunk(content: str | None = None, *, finish_reason: str | None = None, usage=None,
              model: str = "openai/gpt-4o-mini") -> bytes:
    """One OpenRouter chunk as raw bytes; json.dumps escapes NUL and lone surrogates as
    `\\u0000` and `\\ud800`, exactly as a provider's JSON would carry them."""
    delta = {} if content is None else {"content": content}
    chunk = {"id": "gen-1", "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}
    if usage is not None:
        chunk = {"id": "gen-1", "model": model, "choices": [],
                 "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1]}}
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


# --- A hold never lapses while its turn is alive ------------------------------------------

@postgres_only
def test_a_stream_longer_than_the_lease_keeps_its_hold_and_its_turn(make_user, session_of, live_server_url,
                                                                   fake_openrouter, short_lease):
    """Issue 9: wallet 0.25, stream A outlives its hold, turn B is granted the same credits,
    both settle, balance -0.17. Now A's lease and hold are renewed while it streams: the
    sweep leaves it alone and B is refused."""
    short_lease.PANTHEON_MAX_OUTPUT_TOKENS = 100
    short_lease.PANTHEON_MIN_OUTPUT_TOKENS = 100
    user = make_user("long", "0.25")  # one turn (prompt ~0.02 + 100 output 0.2) fits, not two
    key = auth(client_for(user))
    session = session_of(user)
    fake_openrouter.enqueue(fake_openrouter.slow_stream(pieces=45, delay=0.1, usage=(20, 100)))
    events: list = []
    reader = threading.Thread(target=lambda: events.extend(read_stream(live_server_url, session, key)[1]))
    reader.start()
    time.sleep(3.2)  # well past one lease
    turn = Turn.objects.get()
    assert turn.status == "running" and turn.lease_until > timezone.now()
    assert turn.checkpoint.startswith("w0 w1 ")  # the partial answer is saved as it goes
    assert sweep_lapsed_turns().interrupted == 0
    second = httpx.post(f"{live_server_url}{turns_url(session)}", json={"content": "me too"}, headers=key)
    assert second.status_code == 402, second.text
    reader.join(timeout=30)
    assert events[-1][0] == "done" and events[-1][1]["status"] == "completed"
    assert Wallet.objects.get(user=user).balance == Decimal("0.03")
    assert ledger_problems(user_ids=[user.pk], allow_open_holds=False) == []


# --- Text the database cannot store ---------------------------------------------------------

@pytest.mark.parametrize("path", ["turns", "turns/stream"])
@pytest.mark.parametrize("raw", [
    b'{"content": "hello\\u0000 world"}',
    b'{"content": "lone \\ud800 surrogate"}',
    b'{"content": "fine", "model": "test/\\u0000model"}',
])
def test_unstorable_client_text_is_400_invalid_text_before_any_hold(alice_stream, fake_openrouter, path, raw):
    base, session, headers = alice_stream
    response = httpx.post(f"{base}/api/v1/sessions/{session.id}/{path}", content=raw,
                          headers={**headers, "Content-Type": "application/json"})
    assert response.status_code == 400 and response.json()["code"] == "invalid_text", response.text
    assert not Turn.objects.exists() and not CreditHold.objects.exists() and fake_openrouter.requests == []


@pytest.mark.parametrize("path", ["turns", "turns/stream"])
def test_json_nested_too_deeply_is_400_invalid_json(alice_stream, path):
    base, session, headers = alice_stream
    response = httpx.post(f"{base}/api/v1/sessions/{session.id}/{path}", content=b"[" * 20_000 + b"]" * 20_000,
                          headers={**headers, "Content-Type": "application/json"})
    assert response.status_code == 400 and response.json()["code"] == "invalid_json"
    assert not Turn.objects.exists()


def test_provider_text_with_nul_and_surrogates_is_cleaned_streamed_and_stored(alice, alice_stream,
                                                                              fake_openrouter):
    base, session, headers = alice_stream
    fake_openrouter.enqueue(fake_openrouter.raw_stream([
        sse_chunk("ok "), sse_chunk("a\x00b"), sse_chunk(" c\ud800d"), sse_chunk(" end", finish_reason="stop"),
        sse_chunk(usage=(10, 4)), b"data: [DONE]\n\n",
    ]))
    _, events, _ = read_stream(base, session, headers)
    assert events[-1][0] == "done", events
    streamed = "".join(data["delta"] for name, data, _ in events if name == "chunk")
    turn = Turn.objects.get()
    stored = turn.messages.get(role="assistant").content
    assert streamed == stored == "ok a\ufffdb c\ufffdd end"
    assert turn.status == "completed" and turn.cost == Decimal("0.018")
    assert LedgerEntry.objects.get(turn_id=turn.id, kind="debit").amount == Decimal("-0.018")


def test_provider_strings_too_long_or_unstorable_cannot_break_the_close(make_user, session_of, fake_openrouter):
    """A non-streamed tool turn whose provider sends a 500-character model name, a
    300-character tool call id and a NUL in its text and tool arguments."""
    from tests.sessions_app.test_tool_turns import ready_file

    rich = make_user("rich", "500")  # a tool turn holds for every round
    upload = ready_file(rich, "the notes")
    fake_openrouter.enqueue(
        fake_openrouter.completion(None, model="m" * 500, tool_calls=[
            fake_openrouter.tool_call("file_read", json.dumps({"file_id": str(upload.id), "note": "x\x00y"}),
                                      id="c" * 300)]),
        fake_openrouter.completion("read it\x00 all", model="m" * 500, usage=(30, 5)),
    )
    response = client_for(rich).post(turns_url(session_of(rich)), {"content": "read my file", "tools_enabled": True},
                                     format="json")
    assert response.status_code == 201, response.content
    assert response.json()["message"]["content"] == "read it\ufffd all"
    turn = Turn.objects.get()
    assert turn.status == "completed" and len(turn.provider_model) == 200
    tool = turn.messages.get(role="tool")
    assert len(tool.tool_call_id) == 200 and "the notes" in tool.content


# --- The database failing at close ----------------------------------------------------------

FAIL_CLOSE_SQL = {
    "postgresql": [
        "CREATE FUNCTION pantheon_fail_close() RETURNS trigger AS $$ BEGIN "
        "RAISE EXCEPTION 'the database is failing (test)'; END $$ LANGUAGE plpgsql",
        "CREATE TRIGGER fail_close BEFORE UPDATE ON sessions_app_turn FOR EACH ROW "
        "WHEN (NEW.status <> 'running') EXECUTE FUNCTION pantheon_fail_close()",
    ],
    "sqlite": [
        "CREATE TRIGGER fail_close BEFORE UPDATE ON sessions_app_turn FOR EACH ROW "
        "WHEN NEW.status <> 'running' BEGIN SELECT RAISE(ABORT, 'the database is failing (test)'); END",
    ],
}
HEAL_SQL = {
    "postgresql": ["DROP TRIGGER fail_close ON sessions_app_turn", "DROP FUNCTION pantheon_fail_close()"],
    "sqlite": ["DROP TRIGGER fail_close"],
}


def run_sql(statements: list[str]) -> None:
    with connection.cursor() as cursor:
        for statement in statements:
            cursor.execute(statement)
    if threading.current_thread() is not threading.main_thread():
        connection.close()  # a timer's thread: leave no connection behind


@pytest.fixture
def failing_close(transactional_db, monkeypatch):
    """Every write that ends a turn fails in the database (a trigger), until `heal()`."""
    monkeypatch.setattr(live_turn, "CLOSE_RETRY_DELAYS", (0.05, 0.1, 0.2))
    run_sql(FAIL_CLOSE_SQL[connection.vendor])
    state = {"healed": False}

    def heal():
        if not state["healed"]:
            state["healed"] = True
            run_sql(HEAL_SQL[connection.vendor])

    yield heal
    heal()


def test_close_failing_for_good_sends_persistence_failed_and_the_sweep_bills_the_checkpoint(
        alice, alice_stream, fake_openrouter, short_lease, failing_close):
    base, session, headers = alice_stream
    fake_openrouter.enqueue(fake_openrouter.sse_stream(["one ", "two ", "three"], usage=None, delay=0.3))
    _, events, _ = read_stream(base, session, headers)
    assert [name for name, _, _ in events] == ["start", "chunk", "chunk", "chunk", "error"]
    error = events[-1][1]
    assert error["code"] == "persistence_failed" and error["turn_id"]
    turn = Turn.objects.get(pk=error["turn_id"])
    assert turn.status == "running" and turn.checkpoint.startswith("one two")

    failing_close()  # the database is back
    time.sleep(2.1)  # the lease lapses: nobody renews it any more
    call_command("sweep")
    turn.refresh_from_db()
    assert turn.status == "interrupted" and turn.usage_estimated and turn.completion_tokens > 0
    assert turn.messages.get(role="assistant").content == turn_checkpointed_text(events, turn)
    assert LedgerEntry.objects.get(turn_id=turn.id, kind="debit").amount == -turn.cost < 0
    assert not CreditHold.objects.open().exists()
    call_command("sweep")  # idempotent
    assert LedgerEntry.objects.filter(turn_id=turn.id).count() == 1


def turn_checkpointed_text(events, turn) -> str:
    """What the sweep stored must be a prefix of what the client received."""
    received = "".join(data["delta"] for name, data, _ in events if name == "chunk")
    stored = turn.messages.get(role="assistant").content
    assert received.startswith(stored) and stored
    return stored


def test_a_database_blip_at_close_is_retried_and_the_turn_completes(alice, alice_stream, fake_openrouter,
                                                                   failing_close):
    base, session, headers = alice_stream
    fake_openrouter.enqueue(fake_openrouter.sse_stream(["Hel", "lo"], usage=(12, 2)))
    threading.Timer(0.3, failing_close).start()  # the database comes back during the retries
    _, events, _ = read_stream(base, session, headers)
    assert events[-1][0] == "done" and events[-1][1]["status"] == "completed", events
    assert Wallet.objects.get(user=alice).balance == Decimal("9.984")


def test_a_client_leaving_while_the_database_blips_still_gets_its_turn_closed(alice, alice_stream, fake_openrouter,
                                                                              failing_close):
    """The close retries run on after the request is over (in a task of their own)."""
    base, session, headers = alice_stream
    fake_openrouter.enqueue(fake_openrouter.slow_stream(pieces=100, delay=0.05))
    with httpx.Client(base_url=base, timeout=30) as http:
        with http.stream("POST", stream_url(session), json={"content": "long"}, headers=headers) as response:
            for data in response.iter_raw():
                if b"event: chunk" in data:
                    break
    threading.Timer(0.3, failing_close).start()
    turn = wait_until_closed()
    assert turn.status == "cancelled" and turn.cost > 0
    assert not CreditHold.objects.open().exists()


def test_the_plain_endpoint_answers_503_persistence_failed(alice, alice_api, session_of, fake_openrouter,
                                                           short_lease, failing_close):
    response = alice_api.post(turns_url(session_of(alice)), {"content": "hi"}, format="json")
    assert response.status_code == 503 and response.json()["code"] == "persistence_failed"
    failing_close()
    time.sleep(2.1)
    assert sweep_lapsed_turns().interrupted == 1
    # The provider's answer never reached the client and no text was checkpointed: free.
    assert Turn.objects.get().status == "interrupted" and Turn.objects.get().cost == 0


# --- The client leaving before the relay starts ------------------------------------------------

@pytest.mark.parametrize("path", ["turns", "turns/stream"])
def test_client_leaving_while_the_upstream_opens_leaves_a_cancelled_free_turn(alice, alice_stream,
                                                                              fake_openrouter, path):
    base, session, headers = alice_stream
    fake_openrouter.enqueue(fake_openrouter.sse_stream(open_delay=3) if path.endswith("stream")
                            else fake_openrouter.completion("late", delay=3))
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base}/api/v1/sessions/{session.id}/{path}", json={"content": "hi"}, headers=headers,
                   timeout=0.5)
    turn = wait_until_closed()
    assert turn.status == "cancelled"
    if path.endswith("stream"):
        assert turn.cost == 0  # nothing was produced
    else:
        assert turn.usage_estimated and turn.cost > 0  # the provider had the prompt
    assert turn.messages.get(role="user").content == "hi"
    assert not CreditHold.objects.open().exists()


def test_client_leaving_during_a_retry_wait_stops_the_retries(alice, alice_stream, fake_openrouter):
    base, session, headers = alice_stream
    fake_openrouter.enqueue(fake_openrouter.http_error(429, retry_after=2), fake_openrouter.sse_stream())
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base}{stream_url(session)}", json={"content": "hi"}, headers=headers, timeout=0.5)
    turn = wait_until_closed()
    assert turn.status == "cancelled" and turn.cost == 0
    time.sleep(2)
    assert len(fake_openrouter.requests) == 1  # the retry never went out


@pytest.mark.django_db(transaction=True)
async def test_a_preflight_that_commits_after_the_client_left_is_closed_cancelled(alice, session_of):
    """The cancel can land while the preflight's thread is still working: its turn is
    closed as soon as it commits."""
    import asyncio

    from core.db import db_call
    from tests.sessions_app.helpers import begun_turn

    session = await db_call(session_of)(alice)

    @db_call
    def slow_preflight():
        time.sleep(0.3)
        return begun_turn(alice, session)

    task = asyncio.ensure_future(live_turn.start_turn(slow_preflight))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    turn = await db_call(wait_until_closed)()
    assert turn.status == "cancelled" and turn.cost == 0


@pytest.mark.django_db(transaction=True)
async def test_a_stream_response_closed_before_its_body_started_closes_the_turn(alice, session_of):
    """Django may never iterate the body (the client left while the headers went out); it
    still calls close(), which closes the upstream and the turn."""
    import asyncio

    from asgiref.sync import sync_to_async

    from core.db import db_call
    from llm_gateway import FakeGateway
    from sessions_app.streaming import LiveTurn, stream_response
    from tests.sessions_app.helpers import begun_turn

    session = await db_call(session_of)(alice)
    prepared = await db_call(begun_turn)(alice, session)
    ctx = await FakeGateway(chunk_delay_seconds=0.05).stream(model="fake/echo", messages=prepared.messages,
                                                             max_tokens=50)
    live = LiveTurn(prepared, ctx, deadline=asyncio.get_running_loop().time() + 60, resumable=False).begin()
    response = stream_response(live)
    await sync_to_async(response.close)()
    turn = await db_call(wait_until_closed)()
    assert turn.status == "cancelled"
    assert ctx.record.status == "cancelled"  # the upstream was closed


# --- A failed stream with text is never free ----------------------------------------------------

def test_a_failed_stream_with_text_and_no_usage_is_billed_an_estimate(alice, alice_stream, fake_openrouter):
    base, session, headers = alice_stream
    fake_openrouter.enqueue(fake_openrouter.sse_stream(["one ", "two ", "three"], error_after=2))
    _, events, _ = read_stream(base, session, headers)
    assert events[-1][0] == "error" and events[-1][1]["code"] == "upstream_error"
    turn = Turn.objects.get()
    assert turn.status == "failed" and turn.messages.get(role="assistant").content == "one two "
    assert turn.usage_estimated and turn.completion_tokens > 0 and turn.cost > 0
    assert Wallet.objects.get(user=alice).balance == Decimal("10") - turn.cost


def test_a_failure_before_anything_was_produced_costs_nothing(alice, alice_stream, fake_openrouter):
    base, session, headers = alice_stream
    fake_openrouter.enqueue(fake_openrouter.http_error(400, "bad request"))
    response, _, _ = read_stream(base, session, headers)
    assert response.status_code == 502
    assert Turn.objects.get().cost == 0 and not LedgerEntry.objects.filter(kind="debit").exists()


# --- A killed process ---------------------------------------------------------------------------

def test_a_killed_server_leaves_a_running_turn_that_the_sweep_closes_and_bills(alice, session_of, fake_openrouter,
                                                                              pantheon_server):
    server = pantheon_server(PANTHEON_LLM_PROVIDER="openrouter", OPENROUTER_BASE_URL=fake_openrouter.base_url,
                             OPENROUTER_API_KEY="test", PANTHEON_TURN_LEASE_SECONDS="2",
                             PANTHEON_CHECKPOINT_SECONDS="0.2")
    session = session_of(alice)
    fake_openrouter.enqueue(fake_openrouter.slow_stream(pieces=200, delay=0.05))

    def kill() -> None:
        time.sleep(0.5)  # a checkpoint or two
        server.process.send_signal(signal.SIGKILL)
        server.process.wait(timeout=10)

    read_until(server.url, session, auth(client_for(alice)), characters=61, then=kill)
    turn = Turn.objects.get()
    assert turn.status == "running" and turn.checkpoint and CreditHold.objects.open().count() == 1
    assert sweep_lapsed_turns().interrupted == 0  # its lease has not lapsed yet
    time.sleep(2.1)
    report = sweep_lapsed_turns()
    assert report.interrupted == 1
    turn.refresh_from_db()
    assert turn.status == "interrupted" and turn.finished_at and turn.lease_until is None
    stored = turn.messages.get(role="assistant").content
    # The last checkpoint: a prefix of what the server sent (the client read less than that).
    assert stored.startswith("w0 w1 ") and "".join(f"w{i} " for i in range(200)).startswith(stored)
    assert turn.usage_estimated and turn.cost > 0
    assert LedgerEntry.objects.get(turn_id=turn.id, kind="debit").amount == -turn.cost
    assert not CreditHold.objects.open().exists()
    assert ledger_problems(user_ids=[alice.pk], allow_open_holds=False) == []


@pytest.mark.django_db(transaction=True)
def test_the_db_worker_runs_the_sweep_with_no_scheduling_step(alice, session_of, short_lease):
    """`manage.py db_worker` queues the sweep itself; `--batch` runs what is due and stops."""
    import subprocess
    import sys

    from django.conf import settings

    from tests.conftest import subprocess_env
    from tests.sessions_app.helpers import begun_turn

    prepared = begun_turn(alice, session_of(alice))
    Turn.objects.filter(pk=prepared.turn_id).update(lease_until=timezone.now(), checkpoint="half an answer")
    done = subprocess.run([sys.executable, "manage.py", "db_worker", "--batch", "--no-startup-delay", "--no-reload",
                           "-v", "2"],
                          cwd=settings.BASE_DIR, env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    turn = Turn.objects.get()
    assert turn.status == "interrupted", done.stdout + done.stderr
    assert turn.messages.get(role="assistant").content == "half an answer"
    assert turn.cost > 0


@postgres_only
@pytest.mark.django_db(transaction=True)
def test_sweeps_in_several_processes_at_once_close_each_turn_once(make_user, session_of):
    from tests.conftest import in_threads
    from tests.sessions_app.helpers import begun_turn

    user = make_user("many", "100")
    session = session_of(user)
    for i in range(30):
        prepared = begun_turn(user, session, f"q{i}")
        Turn.objects.filter(pk=prepared.turn_id).update(lease_until=timezone.now(), checkpoint=f"answer {i}")

    closed = in_threads(lambda _: sweep_lapsed_turns().interrupted, 6, workers=6)
    assert sum(closed) == 30
    assert LedgerEntry.objects.filter(kind="debit").count() == 30
    assert Message.objects.filter(role="assistant").count() == 30
    assert set(Turn.objects.values_list("status", flat=True)) == {"interrupted"}


def test_close_after_the_sweep_and_sweep_after_close_never_debit_twice(alice, session_of, short_lease):
    from llm_gateway import Usage
    from sessions_app.turns import TurnOutcome, close_turn
    from tests.sessions_app.helpers import begun_turn

    swept = begun_turn(alice, session_of(alice))
    Turn.objects.filter(pk=swept.turn_id).update(lease_until=timezone.now(), checkpoint="some text")
    assert sweep_lapsed_turns().interrupted == 1
    late = close_turn(swept.turn_id, TurnOutcome(status="completed", content="all of it", usage=Usage(5, 5)))
    assert late.turn.status == "interrupted" and late.message.content == "some text"

    closed = begun_turn(alice, session_of(alice))
    close_turn(closed.turn_id, TurnOutcome(status="completed", content="done", usage=Usage(5, 5)))
    Turn.objects.filter(pk=closed.turn_id).update(lease_until=timezone.now())  # even a stray lease
    assert sweep_lapsed_turns().interrupted == 0
    assert LedgerEntry.objects.filter(kind="debit").count() == 2


# --- max_tokens and finish_reason -------------------------------------------------------------

def test_a_small_client_max_tokens_is_honoured_and_done_says_length(alice, alice_stream, fake_openrouter,
                                                                   settings):
    settings.PANTHEON_MIN_OUTPUT_TOKENS = 16
    base, session, headers = alice_stream
    fake_openrouter.enqueue(fake_openrouter.sse_stream(["cut", " short"], finish_reason="length", usage=(12, 7)))
    _, events, _ = read_stream(base, session, headers, {"content": "write a lot", "max_tokens": 7})
    assert fake_openrouter.last_request.body["max_tokens"] == 7
    done = events[-1][1]
    assert events[-1][0] == "done" and done["finish_reason"] == "length" and done["status"] == "completed"
    assert Turn.objects.get().finish_reason == "length"


def test_a_small_max_tokens_on_the_plain_endpoint_is_not_a_402(alice, alice_api, session_of, fake_openrouter):
    response = alice_api.post(turns_url(session_of(alice)), {"content": "hi", "max_tokens": 1}, format="json")
    assert response.status_code == 201, response.content
    assert fake_openrouter.last_request.body["max_tokens"] == 1


def test_the_402_says_what_was_needed_and_what_is_available(make_user, session_of, live_server_url, settings):
    settings.PANTHEON_MIN_OUTPUT_TOKENS = 16
    user = make_user("poor", "0.001")
    response = httpx.post(f"{live_server_url}{turns_url(session_of(user))}", json={"content": "hi"},
                          headers=auth(client_for(user)))
    assert response.status_code == 402
    body = response.json()
    detail = body["detail"]
    assert "0.001000 are available" in detail and "credits (its prompt and 16 output tokens)" in detail
    # The amounts as fields too, so a client (the chat page) need not parse the text.
    assert body["available"] == "0.001000" and f"This turn needs {body['needed']} credits" in detail
    assert Decimal(body["needed"]) > Decimal(body["available"])


def test_the_402_of_an_empty_wallet_says_what_a_turn_needs(make_user, session_of, live_server_url):
    user = make_user("broke")
    response = httpx.post(f"{live_server_url}{turns_url(session_of(user))}", json={"content": "hi"},
                          headers=auth(client_for(user)))
    assert response.status_code == 402
    body = response.json()
    assert body["code"] == "insufficient_credits" and body["available"] == "0.000000"
    assert Decimal(body["needed"]) > 0


# --- A running turn is visible -----------------------------------------------------------------

def test_a_running_turn_is_listed_with_its_status(alice, alice_stream, fake_openrouter):
    base, session, headers = alice_stream
    fake_openrouter.enqueue(fake_openrouter.slow_stream(pieces=20, delay=0.1))
    reader = threading.Thread(target=read_stream, args=(base, session, headers))
    reader.start()
    deadline = time.monotonic() + 5
    while not Turn.objects.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    listed = httpx.get(f"{base}{turns_url(session)}", headers=headers).json()["results"]
    assert listed[0]["status"] == "running" and listed[0]["finished_at"] is None
    reader.join(timeout=30)
    assert httpx.get(f"{base}{turns_url(session)}", headers=headers).json()["results"][0]["status"] == "completed"


def test_a_database_outage_at_the_preflight_is_a_503_not_a_500(alice, alice_stream, monkeypatch):
    from django.db import OperationalError

    from sessions_app import turn_views

    async def unreachable(*args):
        raise OperationalError("connection refused")

    monkeypatch.setattr(turn_views, "_preflight", unreachable)
    base, session, headers = alice_stream
    for path in ("turns", "turns/stream"):
        response = httpx.post(f"{base}/api/v1/sessions/{session.id}/{path}", json={"content": "hi"}, headers=headers)
        assert response.status_code == 503 and response.json()["code"] == "database_unavailable"


@pytest.mark.parametrize("path", ["turns", "turns/stream"])
def test_a_provider_that_only_sends_keepalives_is_cut_at_the_turn_deadline(alice, alice_stream, fake_openrouter,
                                                                           settings, path):
    settings.PANTHEON_MAX_TURN_SECONDS = 1
    settings.PANTHEON_HEARTBEAT_SECONDS = 0.2
    base, session, headers = alice_stream
    if path.endswith("stream"):
        fake_openrouter.enqueue(fake_openrouter.raw_stream([b": OPENROUTER PROCESSING\n\n"] * 60, delay=0.1))
    else:
        fake_openrouter.enqueue(fake_openrouter.completion("too late", delay=6))
    response = httpx.post(f"{base}/api/v1/sessions/{session.id}/{path}", json={"content": "hi"}, headers=headers,
                          timeout=10)
    if path.endswith("stream"):
        assert response.status_code == 200 and "event: error" in response.text
        assert '"code": "upstream_timeout"' in response.text
    else:
        assert response.status_code == 504 and response.json()["code"] == "upstream_timeout"
    assert fake_openrouter.disconnected.wait(5)
    turn = Turn.objects.get()
    assert turn.status == "failed" and turn.error_code == "upstream_timeout"
    assert turn.usage_estimated and turn.cost > 0  # the provider had the prompt
    assert not CreditHold.objects.open().exists()


def test_a_provider_ignoring_max_tokens_cannot_take_the_wallet_below_zero(make_user, session_of, live_server_url,
                                                                         fake_openrouter, settings):
    settings.PANTHEON_MAX_OUTPUT_TOKENS = 100
    settings.PANTHEON_MIN_OUTPUT_TOKENS = 100
    user = make_user("cheap", "0.25")
    fake_openrouter.enqueue(fake_openrouter.completion("far too long " * 500, usage=(20, 6000)))
    response = httpx.post(f"{live_server_url}{turns_url(session_of(user))}", json={"content": "hi"},
                          headers=auth(client_for(user)))
    assert response.status_code == 201
    assert response.json()["usage"]["completion_tokens"] == 100
    assert Wallet.objects.get(user=user).balance >= 0


def test_a_stream_whose_turn_was_closed_elsewhere_stops_and_reports_the_stored_ending(alice, alice_stream,
                                                                                     fake_openrouter, short_lease):
    """The sweep closed the turn (its renewals had failed): the relay's next renewal notices,
    closes the upstream, and `done` says what was stored; one debit."""
    from sessions_app.turns import TurnOutcome, close_turn

    base, session, headers = alice_stream
    fake_openrouter.enqueue(fake_openrouter.slow_stream(pieces=200, delay=0.05))
    events: list = []
    reader = threading.Thread(target=lambda: events.extend(read_stream(base, session, headers)[1]))
    reader.start()
    deadline = time.monotonic() + 5
    while not Turn.objects.filter(checkpoint__startswith="w0").exists():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    turn = Turn.objects.get()
    close_turn(turn.id, TurnOutcome(status="interrupted", content="w0 "))
    reader.join(timeout=10)
    assert not reader.is_alive()
    assert fake_openrouter.disconnected.wait(5)
    assert events[-1][0] == "done" and events[-1][1]["status"] == "interrupted"
    assert len([e for e in events if e[0] == "chunk"]) < 200
    assert LedgerEntry.objects.filter(turn_id=turn.id, kind="debit").count() == 1
