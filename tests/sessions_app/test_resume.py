"""Resumable streams and an explicit stop (SPEC section 12, issue 11), through real uvicorn
servers: one in this process, or two processes on one database."""

from __future__ import annotations

import json
import threading
import time
from decimal import Decimal

import httpx
import pytest
from django.db import connection

from billing_app.models import LedgerEntry, Wallet
from llm_gateway.sse import SSEDecoder
from sessions_app.models import Turn
from tests.conftest import client_for
from tests.sessions_app.helpers import auth, stream_url, wait_until_closed

pytestmark = pytest.mark.usefixtures("fake_openrouter_settings")
postgres_only = pytest.mark.skipif(connection.vendor != "postgresql",
                                   reason="several processes share a PostgreSQL database")


class Events:
    """An SSE response read event by event: [(event, data, id)]."""

    def __init__(self, response: httpx.Response) -> None:
        self.response, self.decoder, self.events = response, SSEDecoder(), []
        self._raw = response.iter_raw()

    def next(self) -> tuple[str, dict, int]:
        while len(self.events) == self._seen:
            for event in self.decoder.feed(next(self._raw)):
                self.events.append((event.event, json.loads(event.data), int(event.id)))
        self._seen += 1
        return self.events[self._seen - 1]

    _seen = 0

    def rest(self) -> list[tuple[str, dict, int]]:
        out = []
        while True:
            try:
                out.append(self.next())
            except StopIteration:
                return out
            if out[-1][0] in ("done", "error"):
                return out


def deltas(events) -> str:
    return "".join(data["delta"] for name, data, _ in events if name == "chunk")


def stored_answer(turn_id) -> str:
    return Turn.objects.get(pk=turn_id).messages.get(role="assistant").content


def debits(turn_id) -> int:
    return LedgerEntry.objects.filter(turn_id=turn_id, kind="debit").count()


@pytest.fixture
def alice_key(alice):
    return auth(client_for(alice))


def test_a_reconnect_with_last_event_id_gets_the_rest_once(alice, alice_key, session_of, live_server_url,
                                                           fake_openrouter):
    session = session_of(alice)
    fake_openrouter.enqueue(fake_openrouter.slow_stream(pieces=30, delay=0.03))
    with httpx.Client(base_url=live_server_url, timeout=30) as http:
        with http.stream("POST", stream_url(session), json={"content": "long", "resumable": True},
                         headers=alice_key) as response:
            first = Events(response)
            before = [first.next() for _ in range(6)]  # start and five deltas, then the line drops
        turn_id = before[0][1]["turn_id"]
        with http.stream("GET", f"/api/v1/turns/{turn_id}/events",
                         headers={**alice_key, "Last-Event-ID": str(before[-1][2])}) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            after = Events(response).rest()
    ids = [event_id for *_, event_id in before + after]
    assert ids == list(range(1, len(ids) + 1))  # rising, nothing twice, nothing missing
    assert after[-1][0] == "done" and after[-1][1]["status"] == "completed"
    assert deltas(before) + deltas(after) == stored_answer(turn_id) == "".join(f"w{i} " for i in range(30))
    assert debits(turn_id) == 1


def test_an_ended_turn_is_replayed_from_what_is_stored_with_the_same_ids(alice, alice_key, session_of,
                                                                         live_server_url):
    session = session_of(alice)
    with httpx.Client(base_url=live_server_url, timeout=30) as http:
        with http.stream("POST", stream_url(session), json={"content": "hello"}, headers=alice_key) as response:
            live = Events(response).rest()
        turn_id = live[0][1]["turn_id"]
        wait_until_closed(id=turn_id)
        with http.stream("GET", f"/api/v1/turns/{turn_id}/events", headers=alice_key) as response:
            replay = Events(response).rest()
        with http.stream("GET", f"/api/v1/turns/{turn_id}/events?after=3", headers=alice_key) as response:
            tail = Events(response).rest()
        detail = http.get(f"/api/v1/turns/{turn_id}", headers=alice_key)
    assert [(name, event_id) for name, _, event_id in replay] == [(name, event_id) for name, _, event_id in live]
    assert [data for name, data, _ in replay if name == "chunk"] == [data for name, data, _ in live if name == "chunk"]
    assert replay[-1][1]["balance"] == live[-1][1]["balance"] and replay[-1][1]["cost"] == live[-1][1]["cost"]
    assert tail == replay[3:]
    assert detail.status_code == 200 and detail.json()["status"] == "completed"


def test_cancel_from_a_second_connection_stops_the_turn_and_the_stream_says_so(alice, alice_key, session_of,
                                                                                live_server_url, fake_openrouter):
    session = session_of(alice)
    fake_openrouter.enqueue(fake_openrouter.slow_stream(pieces=400, delay=0.02))
    with httpx.Client(base_url=live_server_url, timeout=30) as http:
        with http.stream("POST", stream_url(session), json={"content": "long"}, headers=alice_key) as response:
            events = Events(response)
            start = events.next()
            events.next()
            turn_id = start[1]["turn_id"]
            asked = time.monotonic()
            with httpx.Client(base_url=live_server_url, timeout=30) as other:
                stop = other.post(f"/api/v1/turns/{turn_id}/cancel", headers=alice_key)
            rest = events.rest()
            took = time.monotonic() - asked
        again = http.post(f"/api/v1/turns/{turn_id}/cancel", headers=alice_key)
    assert stop.status_code == 202 and stop.json()["id"] == turn_id
    assert rest[-1][0] == "done" and rest[-1][1]["status"] == "cancelled"
    assert took < 2
    turn = wait_until_closed(id=turn_id)
    assert turn.status == "cancelled" and turn.cost > 0
    assert again.status_code == 200 and again.json()["status"] == "cancelled"
    assert debits(turn_id) == 1


def test_a_resumable_turn_nobody_follows_is_cancelled_after_the_grace(alice, alice_key, session_of, live_server_url,
                                                                      fake_openrouter, settings):
    settings.PANTHEON_RESUME_GRACE_SECONDS = 0.5
    session = session_of(alice)
    fake_openrouter.enqueue(fake_openrouter.slow_stream(pieces=400, delay=0.02))
    with httpx.Client(base_url=live_server_url, timeout=30) as http:
        with http.stream("POST", stream_url(session), json={"content": "long", "resumable": True},
                         headers=alice_key) as response:
            turn_id = Events(response).next()[1]["turn_id"]
        time.sleep(0.2)
        assert Turn.objects.get(pk=turn_id).status == "running"  # it runs on, nobody attached
    turn = wait_until_closed(id=turn_id, timeout=5)
    assert turn.status == "cancelled" and turn.messages.get(role="assistant").content.startswith("w0 w1 ")
    assert turn.cost > 0 and debits(turn_id) == 1


def test_a_resumable_turn_whose_client_left_while_the_upstream_opened_runs_on(alice, alice_key, session_of,
                                                                             live_server_url, fake_openrouter):
    session = session_of(alice)
    fake_openrouter.enqueue(fake_openrouter.sse_stream(["late ", "but ", "whole"], open_delay=0.8))
    with httpx.Client(base_url=live_server_url, timeout=0.3) as http:
        with pytest.raises(httpx.ReadTimeout):  # the client gives up before the response starts
            http.post(stream_url(session), json={"content": "x", "resumable": True}, headers=alice_key)
    turn = wait_until_closed(timeout=5)
    assert turn.status == "completed" and turn.messages.get(role="assistant").content == "late but whole"
    assert debits(turn.pk) == 1


def test_an_attached_follower_leaving_starts_the_grace(alice, alice_key, session_of, live_server_url,
                                                       fake_openrouter, settings):
    settings.PANTHEON_RESUME_GRACE_SECONDS = 0.5
    session = session_of(alice)
    fake_openrouter.enqueue(fake_openrouter.slow_stream(pieces=400, delay=0.02))
    with httpx.Client(base_url=live_server_url, timeout=30) as http:
        with http.stream("POST", stream_url(session), json={"content": "long", "resumable": True},
                         headers=alice_key) as response:
            turn_id = Events(response).next()[1]["turn_id"]
        with http.stream("GET", f"/api/v1/turns/{turn_id}/events", headers=alice_key) as response:
            follower = Events(response)
            follower.next()
            time.sleep(0.8)  # longer than the grace: attached, so the turn runs on
            assert Turn.objects.get(pk=turn_id).status == "running"
            follower.next()
    turn = wait_until_closed(id=turn_id, timeout=5)  # nobody attached any more: cancelled after the grace
    assert turn.status == "cancelled" and debits(turn_id) == 1


def test_a_plain_stream_is_still_cancelled_when_its_client_leaves(alice, alice_key, session_of, live_server_url,
                                                                  fake_openrouter):
    session = session_of(alice)
    fake_openrouter.enqueue(fake_openrouter.slow_stream(pieces=400, delay=0.02))
    with httpx.Client(base_url=live_server_url, timeout=30) as http:
        with http.stream("POST", stream_url(session), json={"content": "long"}, headers=alice_key) as response:
            turn_id = Events(response).next()[1]["turn_id"]
    assert wait_until_closed(id=turn_id, timeout=3).status == "cancelled"


def test_another_users_turn_is_404_on_every_new_endpoint(alice, bob, alice_key, session_of, live_server_url):
    session = session_of(alice)
    with httpx.Client(base_url=live_server_url, timeout=30) as http:
        with http.stream("POST", stream_url(session), json={"content": "hi"}, headers=alice_key) as response:
            turn_id = Events(response).rest()[0][1]["turn_id"]
        bob_key = auth(client_for(bob))
        answers = [http.get(f"/api/v1/turns/{turn_id}", headers=bob_key),
                   http.get(f"/api/v1/turns/{turn_id}/events", headers=bob_key),
                   http.post(f"/api/v1/turns/{turn_id}/cancel", headers=bob_key)]
        nobody = http.get(f"/api/v1/turns/{turn_id}")
        bad_id = http.get(f"/api/v1/turns/{turn_id}/events", headers={**alice_key, "Last-Event-ID": "x"})
    assert [(a.status_code, a.json()["code"]) for a in answers] == [(404, "not_found")] * 3
    assert nobody.status_code == 401
    assert bad_id.status_code == 400 and bad_id.json()["code"] == "invalid_last_event_id"
    assert Turn.objects.get(pk=turn_id).status == "completed"


@postgres_only
def test_two_processes_attach_and_cancel_reach_the_process_that_serves_the_turn(alice, alice_key, session_of,
                                                                                 fake_openrouter, pantheon_server):
    env = {"PANTHEON_LLM_PROVIDER": "openrouter", "OPENROUTER_BASE_URL": fake_openrouter.base_url,
           "OPENROUTER_API_KEY": "test"}
    serving, other = pantheon_server(**env), pantheon_server(**env)
    assert serving.process.pid != other.process.pid
    session = session_of(alice)

    # Attach from the other process: the rest arrives live, then `done`.
    fake_openrouter.enqueue(fake_openrouter.slow_stream(pieces=60, delay=0.03))
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", serving.url + stream_url(session), json={"content": "a", "resumable": True},
                         headers=alice_key) as response:
            first = Events(response)
            before = [first.next() for _ in range(4)]
        turn_id = before[0][1]["turn_id"]
        received_at = []
        with http.stream("GET", f"{other.url}/api/v1/turns/{turn_id}/events",
                         headers={**alice_key, "Last-Event-ID": str(before[-1][2])}) as response:
            events = Events(response)
            after = []
            while not after or after[-1][0] not in ("done", "error"):
                after.append(events.next())
                received_at.append(time.monotonic())
    assert after[-1][0] == "done" and after[-1][1]["status"] == "completed"
    assert deltas(before) + deltas(after) == stored_answer(turn_id)
    ids = [event_id for *_, event_id in before + after]
    assert ids == list(range(1, len(ids) + 1))
    # Followed live (pieces spread over the answer), not all at once at the end.
    chunk_times = [t for t, (name, *_) in zip(received_at, after, strict=True) if name == "chunk"]
    assert chunk_times[-1] - chunk_times[0] > 0.5

    # Cancel from the other process.
    fake_openrouter.enqueue(fake_openrouter.slow_stream(pieces=400, delay=0.02))
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", serving.url + stream_url(session), json={"content": "b"},
                         headers=alice_key) as response:
            events = Events(response)
            turn_id = events.next()[1]["turn_id"]
            events.next()
            asked = time.monotonic()
            stop = http.post(f"{other.url}/api/v1/turns/{turn_id}/cancel", headers=alice_key)
            rest = events.rest()
            took = time.monotonic() - asked
    assert stop.status_code == 202
    assert rest[-1][0] == "done" and rest[-1][1]["status"] == "cancelled" and took < 2
    turn = wait_until_closed(id=turn_id)
    assert turn.status == "cancelled" and debits(turn_id) == 1
    assert Wallet.objects.get(user=alice).balance < Decimal("10")


def test_two_followers_and_the_requester_see_the_same_events(alice, alice_key, session_of,
                                                                                  live_server_url, fake_openrouter):
    session = session_of(alice)
    fake_openrouter.enqueue(fake_openrouter.slow_stream(pieces=40, delay=0.02))
    results = {}
    with httpx.Client(base_url=live_server_url, timeout=30) as http:
        with http.stream("POST", stream_url(session), json={"content": "x", "resumable": True},
                         headers=alice_key) as response:
            events = Events(response)
            turn_id = events.next()[1]["turn_id"]

            def follow(name):
                with httpx.Client(base_url=live_server_url, timeout=30) as mine:
                    with mine.stream("GET", f"/api/v1/turns/{turn_id}/events", headers=alice_key) as answer:
                        results[name] = Events(answer).rest()

            threads = [threading.Thread(target=follow, args=(n,)) for n in ("a", "b")]
            for thread in threads:
                thread.start()
            results["requester"] = [events.events[0], *events.rest()]
            for thread in threads:
                thread.join(10)
    wait_until_closed(id=turn_id)
    assert results["a"] == results["b"] == results["requester"]
    assert deltas(results["a"]) == stored_answer(turn_id)
