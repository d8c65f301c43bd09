"""Streamed turns through a real uvicorn server and the loopback OpenRouter server."""

import asyncio
import json
import time
from decimal import Decimal

import httpx
import pytest
from django.db import connection

from billing_app.models import CreditHold, LedgerEntry, UsageRecord, Wallet
from billing_app.selectors import ledger_problems
from llm_gateway.sse import SSEDecoder
from sessions_app.models import LlmEvent, Turn
from tests.conftest import client_for
from tests.sessions_app.helpers import auth, read_stream, stream_url, wait_until_closed

pytestmark = pytest.mark.usefixtures("fake_openrouter_settings")


@pytest.fixture
def alice_stream(alice, session_of, live_server_url):
    return live_server_url, session_of(alice), auth(client_for(alice))


def test_stream_emits_start_chunks_done_with_sse_headers(alice_stream, fake_openrouter):
    base, session, headers = alice_stream
    fake_openrouter.enqueue(fake_openrouter.sse_stream(["Hel", "lo", " world"], usage=(12, 3)))
    response, events, _ = read_stream(base, session, headers)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["x-accel-buffering"] == "no"
    assert "content-encoding" not in response.headers
    names = [name for name, _, _ in events]
    assert names == ["start", "chunk", "chunk", "chunk", "done"]
    assert [d["delta"] for n, d, _ in events if n == "chunk"] == ["Hel", "lo", " world"]
    assert [i for _, _, i in events] == [1, 2, 3, 4, 5]
    start = events[0][1]
    assert start["session_id"] == str(session.id) and start["model"] == session.model


def test_stream_persists_once_at_close_and_done_matches_the_database(alice, alice_stream, fake_openrouter):
    base, session, headers = alice_stream
    fake_openrouter.enqueue(fake_openrouter.sse_stream(["Hel", "lo"], usage=(12, 2), usage_shape="empty_delta"))
    _, events, _ = read_stream(base, session, headers)
    done = events[-1][1]
    turn = Turn.objects.get(pk=done["turn_id"])
    assert turn.status == done["status"] == "completed" and turn.streamed
    # 12 * 0.001 + 2 * 0.002
    assert done["cost"] == "0.016000" and turn.cost == Decimal("0.016")
    assert done["usage"] == {"prompt_tokens": 12, "completion_tokens": 2, "total_tokens": 14, "estimated": False,
                             "reconciled": False}
    assert done["balance"] == "9.984000" == f"{Wallet.objects.get(user=alice).balance:.6f}"
    assert done["provider_model"] == fake_openrouter.DEFAULT_MODEL == turn.provider_model
    assert done["message_id"] == str(turn.messages.get(role="assistant").id)
    assert [m.role for m in turn.messages.order_by("position")] == ["user", "assistant"]
    assert LedgerEntry.objects.get(turn_id=turn.id).amount == Decimal("-0.016")
    assert UsageRecord.objects.get(turn_id=turn.id).total_tokens == 14
    event = LlmEvent.objects.get(turn=turn)
    assert event.streamed and event.ttft_ms is not None and event.status == "ok"
    assert not CreditHold.objects.open().exists()


def test_concatenated_deltas_equal_the_stored_message_byte_for_byte(alice_stream, fake_openrouter):
    base, session, headers = alice_stream
    pieces = ["Ünïcode ", "😀", " line\u2028sep", "\r\n", "tab\t", '"quotes" \\ ', "end"]
    fake_openrouter.enqueue(fake_openrouter.sse_stream(pieces))
    _, events, _ = read_stream(base, session, headers)
    streamed = "".join(d["delta"] for n, d, _ in events if n == "chunk")
    stored = Turn.objects.get(pk=events[-1][1]["turn_id"]).messages.get(role="assistant").content
    assert streamed.encode() == stored.encode() == "".join(pieces).encode()


def test_tools_are_rejected_with_422(alice_stream, fake_openrouter):
    base, session, headers = alice_stream
    response, events, raw = read_stream(base, session, headers, {"content": "hi", "tools_enabled": True})
    assert response.status_code == 422
    assert json.loads(raw)["code"] == "tools_not_supported_in_stream"
    assert fake_openrouter.requests == [] and not CreditHold.objects.exists()


def test_credit_enforcement_402_before_the_stream(make_user, session_of, live_server_url, fake_openrouter):
    user = make_user("broke", "0.001")
    response, _, raw = read_stream(live_server_url, session_of(user), auth(client_for(user)))
    assert response.status_code == 402 and json.loads(raw)["code"] == "insufficient_credits"
    assert fake_openrouter.requests == [] and not Turn.objects.exists()


def test_errors_before_the_stream_are_json(alice, alice_stream, bob, session_of, fake_openrouter):
    base, session, headers = alice_stream
    response, _, raw = read_stream(base, session, {})
    assert response.status_code == 401
    response, _, raw = read_stream(base, session_of(bob), headers)
    assert response.status_code == 404 and json.loads(raw)["code"] == "not_found"
    response, _, raw = read_stream(base, session, headers, {"content": ""})
    assert response.status_code == 400 and json.loads(raw)["code"] == "empty_content"


def test_upstream_failing_at_once_answers_json_502_and_stores_a_failed_turn(alice, alice_stream, fake_openrouter):
    base, session, headers = alice_stream
    fake_openrouter.enqueue(fake_openrouter.http_error(400, "bad model params"))
    response, events, raw = read_stream(base, session, headers)
    assert response.status_code == 502 and events == []
    assert json.loads(raw)["code"] == "upstream_error" and "bad model params" in json.loads(raw)["detail"]
    turn = Turn.objects.get()
    assert turn.status == "failed" and turn.cost == 0
    assert Wallet.objects.get(user=alice).balance == Decimal("10")
    assert not CreditHold.objects.open().exists()


def test_upstream_timeout_at_open_is_504(alice_stream, fake_openrouter, settings):
    settings.PANTHEON_UPSTREAM_TIMEOUT_SECONDS = 0.5
    base, session, headers = alice_stream
    fake_openrouter.enqueue(fake_openrouter.sse_stream(open_delay=2))
    response, _, raw = read_stream(base, session, headers)
    assert response.status_code == 504 and json.loads(raw)["code"] == "upstream_timeout"


def test_error_mid_stream_sends_error_event_and_keeps_partial_text(alice, alice_stream, fake_openrouter):
    base, session, headers = alice_stream
    fake_openrouter.enqueue(fake_openrouter.sse_stream(["one ", "two ", "three"], error_after=2,
                                                       error_usage=(12, 2)))
    response, events, _ = read_stream(base, session, headers)
    assert response.status_code == 200
    assert [n for n, _, _ in events] == ["start", "chunk", "chunk", "error"]
    error = events[-1][1]
    assert error["code"] == "upstream_error" and error["message"]
    turn = Turn.objects.get(pk=error["turn_id"])
    assert turn.status == "failed" and turn.messages.get(role="assistant").content == "one two "
    # Only the usage the provider reported is debited.
    assert turn.cost == Decimal("0.016") and not turn.usage_estimated
    assert Wallet.objects.get(user=alice).balance == Decimal("9.984")
    assert not CreditHold.objects.open().exists()


def test_heartbeat_while_the_upstream_is_silent(alice_stream, fake_openrouter, settings):
    settings.PANTHEON_HEARTBEAT_SECONDS = 0.2
    base, session, headers = alice_stream
    fake_openrouter.enqueue(fake_openrouter.sse_stream(["slow", " answer"], delay=0.5))
    comments: list[bytes] = []
    _, events, _ = read_stream(base, session, headers, comments=comments)
    assert b": ping" in comments
    assert events[-1][0] == "done"


def test_client_disconnect_cancels_upstream_and_stores_a_cancelled_turn(alice, alice_stream, fake_openrouter):
    base, session, headers = alice_stream
    fake_openrouter.enqueue(fake_openrouter.slow_stream(pieces=400, delay=0.05))
    decoder, deltas = SSEDecoder(), []
    with httpx.Client(base_url=base, timeout=30) as http:
        with http.stream("POST", stream_url(session), json={"content": "long please"}, headers=headers) as response:
            for data in response.iter_raw():
                for event in decoder.feed(data):
                    if event.event == "chunk":
                        deltas.append(json.loads(event.data)["delta"])
                if len(deltas) >= 3:
                    break
        closed_at = time.monotonic()
    assert fake_openrouter.disconnected.wait(5), "the upstream never saw the connection close"
    assert time.monotonic() - closed_at < 1.5
    turn = wait_until_closed()
    assert turn.status == "cancelled"
    stored = turn.messages.get(role="assistant").content
    assert stored.startswith("".join(deltas)) and len(stored) < len("w0 " * 400)
    # No usage arrived from the provider: an estimate from the text, marked as such.
    assert turn.usage_estimated and turn.completion_tokens > 0 and turn.cost > 0
    assert not CreditHold.objects.open().exists()
    assert Wallet.objects.get(user=alice).balance == Decimal("10") - turn.cost
    assert LlmEvent.objects.get(turn=turn).status == "cancelled"


@pytest.mark.skipif(connection.vendor != "postgresql", reason="concurrency is tested on PostgreSQL")
def test_thirty_concurrent_streams_on_a_wallet_that_affords_three(make_user, session_of, live_server_url,
                                                                   fake_openrouter, settings):
    settings.PANTHEON_MAX_OUTPUT_TOKENS = 100
    settings.PANTHEON_MIN_OUTPUT_TOKENS = 100
    user = make_user("streamer", "0.75")
    key = client_for(user).raw_key
    session = session_of(user)
    for _ in range(30):
        fake_openrouter.enqueue(fake_openrouter.sse_stream(["a", "b", "c"], usage=(30, 100), delay=0.1))

    async def one(http: httpx.AsyncClient, i: int) -> tuple[int, str]:
        async with http.stream("POST", stream_url(session), json={"content": f"go {i}"}) as response:
            body = (await response.aread()).decode()
            return response.status_code, body

    async def run_all():
        async with httpx.AsyncClient(base_url=live_server_url, timeout=60,
                                     headers={"Authorization": f"Bearer {key}"}) as http:
            return await asyncio.gather(*[one(http, i) for i in range(30)])

    results = asyncio.run(run_all())
    statuses = sorted(status for status, _ in results)
    assert statuses.count(200) == 3 and statuses.count(402) == 27, statuses
    assert all("event: done" in body for status, body in results if status == 200)
    assert Wallet.objects.get(user=user).balance >= 0
    assert not CreditHold.objects.open().exists()
    assert ledger_problems(user_ids=[user.pk], allow_open_holds=False) == []
