"""GET /metrics (docs/metrics.md): the values after real turns through a real server.

Process metrics are global to the test process (every live server of the run shares
them), so tests compare what changed across what they did, never absolute values; the
database metrics are the test database's, which each test starts empty.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from datetime import timedelta

import httpx
import pytest
from django.conf import settings as django_settings
from django.db import OperationalError
from django.db.models import Sum
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from billing_app.models import CreditHold
from llm_gateway.sse import SSEDecoder
from sessions_app import metrics
from sessions_app.models import LlmEvent, Turn
from sessions_app.tasks import schedule_sweep, sweep_turns
from sessions_app.turns import sweep_lapsed_turns
from tests.conftest import client_for, subprocess_env
from tests.sessions_app.helpers import auth, begun_turn, read_stream, stream_url, wait_until_closed

pytestmark = pytest.mark.usefixtures("fake_openrouter_settings")

SWEEP = "sessions_app.tasks.sweep_turns"


class Scrape:
    """One scrape's samples: `scrape[name, labels]` (0 if absent) and `.has(name)`."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: dict[tuple[str, tuple], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value

    def __getitem__(self, key: str | tuple[str, dict]) -> float:
        name, labels = (key, {}) if isinstance(key, str) else key
        return self.samples.get((name, tuple(sorted(labels.items()))), 0.0)

    def has(self, name: str, **labels: str) -> bool:
        return (name, tuple(sorted(labels.items()))) in self.samples

    def delta(self, before: Scrape, name: str, **labels: str) -> float:
        return self[name, labels] - before[name, labels]


def scrape(base: str, headers: dict[str, str] | None = None) -> Scrape:
    response = httpx.get(f"{base}/metrics", headers=headers or {}, timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return Scrape(response.text)


def scrape_until(base: str, done, timeout: float = 10.0) -> Scrape:
    """Scrape until `done(scrape)`: a turn is counted a moment after the database says it
    closed (once its close-time transaction returned)."""
    deadline = time.monotonic() + timeout
    while True:
        now = scrape(base)
        if done(now):
            return now
        assert time.monotonic() < deadline, now.text
        time.sleep(0.05)


@pytest.fixture
def alice_stream(alice, session_of, live_server_url):
    return live_server_url, session_of(alice), auth(client_for(alice))


def _leave_after_chunks(base, session, headers, count: int) -> None:
    decoder, chunks = SSEDecoder(), 0
    with httpx.Client(base_url=base, timeout=30) as http:
        with http.stream("POST", stream_url(session), json={"content": "long please"}, headers=headers) as response:
            for data in response.iter_raw():
                chunks += sum(1 for event in decoder.feed(data) if event.event == "chunk")
                if chunks >= count:
                    return


def test_turns_by_status_histograms_errors_and_credits_after_real_turns(alice_stream, fake_openrouter):
    base, session, headers = alice_stream
    before = scrape(base)
    # Completed; completed after a 429 and a retry; failed mid-stream; cancelled (the client left).
    fake_openrouter.enqueue(fake_openrouter.sse_stream(["Hel", "lo"], usage=(12, 2)))
    assert read_stream(base, session, headers)[1][-1][0] == "done"
    fake_openrouter.enqueue(fake_openrouter.http_error(429, "slow down", retry_after=0),
                            fake_openrouter.sse_stream(["again"], usage=(12, 1)))
    assert read_stream(base, session, headers)[1][-1][0] == "done"
    fake_openrouter.enqueue(fake_openrouter.sse_stream(["one ", "two ", "three"], error_after=2, error_usage=(12, 2)))
    assert read_stream(base, session, headers)[1][-1][0] == "error"
    fake_openrouter.enqueue(fake_openrouter.slow_stream(pieces=400, delay=0.05))
    _leave_after_chunks(base, session, headers, 3)
    wait_until_closed(status=Turn.Status.CANCELLED)

    after = scrape_until(base, lambda s: sum(s.delta(before, "pantheon_turns_total", status=status)
                                             for status in Turn.Status.values) == 4)
    assert {status: after.delta(before, "pantheon_turns_total", status=status) for status in Turn.Status.values} == {
        "running": 0, "completed": 2, "failed": 1, "cancelled": 1, "interrupted": 0}
    turns = Turn.objects.all()
    assert [t.status for t in turns.order_by("created_at")] == ["completed", "completed", "failed", "cancelled"]
    # Credits debited: the sum of the turns' costs.
    cost = turns.aggregate(total=Sum("cost"))["total"]
    assert cost > 0
    assert after.delta(before, "pantheon_credits_debited_total") == pytest.approx(float(cost), abs=1e-9)
    # One upstream latency per call (5: the 429 too), one time to first chunk per call that sent a delta (4).
    events = LlmEvent.objects.filter(turn__in=turns)
    assert events.count() == 5
    assert after.delta(before, "pantheon_upstream_latency_seconds_count") == 5
    assert after.delta(before, "pantheon_upstream_latency_seconds_sum") == pytest.approx(
        sum(e.latency_ms for e in events) / 1000, abs=1e-6)
    ttfts = [e.ttft_ms for e in events if e.ttft_ms is not None]
    assert len(ttfts) == 4
    assert after.delta(before, "pantheon_time_to_first_chunk_seconds_count") == 4
    assert after.delta(before, "pantheon_time_to_first_chunk_seconds_sum") == pytest.approx(sum(ttfts) / 1000,
                                                                                            abs=1e-6)
    assert after.delta(before, "pantheon_time_to_first_chunk_seconds_bucket", le="+Inf") == 4
    # Upstream errors by code: the 429's status; the error chunk (HTTP 200) by the turn's code.
    assert after.delta(before, "pantheon_upstream_errors_total", code="429") == 1
    assert after.delta(before, "pantheon_upstream_errors_total", code="upstream_error") == 1
    # Nothing streams any more; the cancelled turn (estimated, with a generation id) awaits
    # reconciliation; its task is queued for later.
    assert after.delta(before, "pantheon_open_streams") == 0
    assert after["pantheon_turns_pending_reconciliation"] == Turn.objects.filter(reconciliation="pending").count() == 1
    assert after["pantheon_holds_open"] == 0 and after["pantheon_metrics_database_up"] == 1
    assert after["pantheon_task_queue_depth", {"queue": "default",
                                               "task": "sessions_app.tasks.reconcile_turn_task"}] == 1


def test_a_failure_before_the_stream_counts_its_status_code(alice_stream, fake_openrouter):
    base, session, headers = alice_stream
    before = scrape(base)
    fake_openrouter.enqueue(fake_openrouter.http_error(400, "bad model params"))
    assert read_stream(base, session, headers)[0].status_code == 502
    after = scrape_until(base, lambda s: s.delta(before, "pantheon_turns_total", status="failed") == 1)
    assert after.delta(before, "pantheon_upstream_errors_total", code="400") == 1
    assert after.delta(before, "pantheon_time_to_first_chunk_seconds_count") == 0
    assert after.delta(before, "pantheon_upstream_latency_seconds_count") == 1
    assert after.delta(before, "pantheon_credits_debited_total") == 0


def test_open_streams_and_holds_while_a_stream_runs_then_none(alice_stream, fake_openrouter):
    base, session, headers = alice_stream
    before = scrape(base)
    assert before["pantheon_holds_open"] == 0 and before["pantheon_holds_open_credits"] == 0
    fake_openrouter.enqueue(fake_openrouter.slow_stream(pieces=30, delay=0.05))
    decoder, names = SSEDecoder(), []
    with httpx.Client(base_url=base, timeout=30) as http:
        with http.stream("POST", stream_url(session), json={"content": "go"}, headers=headers) as response:
            for data in response.iter_raw():
                names += [event.event for event in decoder.feed(data)]
                if names.count("chunk") == 2:
                    during = scrape(base)
                    hold = CreditHold.objects.open().get()
            assert names[-1] == "done"
    assert during.delta(before, "pantheon_open_streams") == 1
    assert during["pantheon_holds_open"] == 1
    assert during["pantheon_holds_open_credits"] == pytest.approx(float(hold.amount))
    after = scrape_until(base, lambda s: s.delta(before, "pantheon_turns_total", status="completed") == 1)
    assert after.delta(before, "pantheon_open_streams") == 0
    assert after["pantheon_holds_open"] == 0 and after["pantheon_holds_open_credits"] == 0


def test_the_sweep_counts_the_turns_it_closes(alice, session_of, live_server_url):
    prepared = begun_turn(alice, session_of(alice))
    Turn.objects.filter(pk=prepared.turn_id).update(lease_until=timezone.now(), checkpoint="half an answer")
    before = scrape(live_server_url)
    assert before["pantheon_holds_open"] == 1
    assert sweep_turns.call()["interrupted"] == 1
    after = scrape(live_server_url)
    turn = Turn.objects.get()
    assert turn.status == "interrupted" and turn.cost > 0
    assert after.delta(before, "pantheon_turns_total", status="interrupted") == 1
    assert after.delta(before, "pantheon_credits_debited_total") == pytest.approx(float(turn.cost), abs=1e-9)
    # Its calls were the dead process's: nothing observed for them.
    assert after.delta(before, "pantheon_upstream_latency_seconds_count") == 0
    assert after["pantheon_holds_open"] == 0
    # Closed already: a second sweep counts nothing.
    assert sweep_turns.call()["interrupted"] == 0
    assert scrape(live_server_url).delta(after, "pantheon_turns_total", status="interrupted") == 0


def test_queue_depth_and_last_sweep_time_from_the_db_worker(live_server_url):
    first = scrape(live_server_url)
    assert not first.has("pantheon_last_sweep_timestamp_seconds")
    assert not first.has("pantheon_task_queue_depth", queue="default", task=SWEEP)
    assert schedule_sweep()
    queued = scrape(live_server_url)
    assert queued["pantheon_task_queue_depth", {"queue": "default", "task": SWEEP}] == 1
    assert queued["pantheon_task_queue_due", {"queue": "default", "task": SWEEP}] == 1
    started = time.time()
    done = subprocess.run([sys.executable, "manage.py", "db_worker", "--batch", "--no-startup-delay", "--no-reload"],
                          cwd=django_settings.BASE_DIR, env=subprocess_env(), capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    from django_tasks_db.models import DBTaskResult

    finished = DBTaskResult.objects.filter(task_path=SWEEP, status="SUCCESSFUL").get().finished_at
    after = scrape(live_server_url)
    assert after["pantheon_last_sweep_timestamp_seconds"] == pytest.approx(finished.timestamp(), abs=1e-3)
    assert started - 1 < after["pantheon_last_sweep_timestamp_seconds"] <= time.time()
    # The sweep queued its next run, for later: waiting, not due.
    assert after["pantheon_task_queue_depth", {"queue": "default", "task": SWEEP}] == 1
    assert after["pantheon_task_queue_due", {"queue": "default", "task": SWEEP}] == 0


def test_the_database_collector_makes_the_same_few_queries_whatever_the_data(
        alice, bob, session_of, django_assert_num_queries):
    def collect() -> dict[str, list]:
        return {family.name: family.samples for family in metrics.DatabaseCollector().collect()}

    with django_assert_num_queries(4):
        empty = collect()
    assert empty["pantheon_metrics_database_up"][0].value == 1
    for user in (alice, alice, bob):
        begun_turn(user, session_of(user))
    schedule_sweep()
    sweep_turns.using(queue_name="default").enqueue()
    with django_assert_num_queries(4):
        full = collect()
    assert full["pantheon_holds_open"][0].value == 3
    assert full["pantheon_holds_open_credits"][0].value == pytest.approx(
        float(CreditHold.objects.open().aggregate(total=Sum("amount"))["total"]))
    assert [s.value for s in full["pantheon_task_queue_depth"]] == [2]
    sweep_lapsed_turns(now=timezone.now() + timedelta(hours=1))  # leave nothing running


def test_no_500_when_the_database_cannot_be_read(live_server_url, monkeypatch):
    def down(*args):
        raise OperationalError("connection refused")

    monkeypatch.setattr(metrics.DatabaseCollector, "_read", staticmethod(down))
    now = scrape(live_server_url)
    assert now["pantheon_metrics_database_up"] == 0
    assert not now.has("pantheon_holds_open")
    assert now.has("pantheon_turns_total", status="completed") and now.has("pantheon_open_streams")


def test_protection(live_server_url, settings):
    url = f"{live_server_url}/metrics"
    # No token set: direct loopback clients only; a request relayed by a proxy is refused.
    assert httpx.get(url).status_code == 200
    relayed = httpx.get(url, headers={"X-Forwarded-For": "203.0.113.9"})
    assert relayed.status_code == 403 and relayed.json()["code"] == "permission_denied"
    assert httpx.post(url).status_code == 405
    settings.PANTHEON_METRICS_TOKEN = "s3cret-token"
    missing = httpx.get(url)
    assert missing.status_code == 401 and missing.headers["www-authenticate"].startswith("Bearer")
    assert httpx.get(url, headers={"Authorization": "Bearer wrong"}).status_code == 403
    assert httpx.get(url, headers={"Authorization": "Basic czNjcmV0LXRva2Vu"}).status_code == 401
    granted = httpx.get(url, headers={"Authorization": "Bearer s3cret-token", "X-Forwarded-For": "203.0.113.9"})
    assert granted.status_code == 200 and "pantheon_turns_total" in granted.text
    assert "pantheon_turns_total" not in missing.text


def test_openmetrics_when_asked(live_server_url):
    response = httpx.get(f"{live_server_url}/metrics", headers={"Accept": "application/openmetrics-text"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.rstrip().endswith("# EOF") and "pantheon_holds_open" in response.text


def test_multiprocess_mode_sums_the_processes_and_forgets_a_dead_ones_streams(
        alice, session_of, fake_openrouter, pantheon_server, tmp_path):
    """Two servers sharing PROMETHEUS_MULTIPROC_DIR: either answers for both; the database
    metrics are counted once; a killed server's open stream is forgotten."""
    env = {"PANTHEON_LLM_PROVIDER": "openrouter", "OPENROUTER_BASE_URL": fake_openrouter.base_url,
           "OPENROUTER_API_KEY": "test", "PROMETHEUS_MULTIPROC_DIR": str(tmp_path),
           "PANTHEON_TURN_LEASE_SECONDS": "2", "PANTHEON_CHECKPOINT_SECONDS": "0.2"}
    serving, other = pantheon_server(**env), pantheon_server(**env)
    session, headers = session_of(alice), auth(client_for(alice))
    fake_openrouter.enqueue(fake_openrouter.sse_stream(["Hel", "lo"], usage=(12, 2)))
    assert read_stream(serving.url, session, headers)[1][-1][0] == "done"
    completed = Turn.objects.get()
    counted = scrape_until(other.url, lambda s: s["pantheon_turns_total", {"status": "completed"}] == 1)
    assert counted["pantheon_credits_debited_total"] == pytest.approx(float(completed.cost))
    assert counted["pantheon_upstream_latency_seconds_count"] == 1

    fake_openrouter.enqueue(fake_openrouter.slow_stream(pieces=200, delay=0.05))
    decoder, chunks = SSEDecoder(), 0
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", serving.url + stream_url(session), json={"content": "long"},
                         headers=headers) as response:
            for data in response.iter_raw():
                chunks += sum(1 for event in decoder.feed(data) if event.event == "chunk")
                if chunks >= 2:
                    during = scrape(other.url), scrape(serving.url)
                    serving.process.send_signal(signal.SIGKILL)
                    serving.process.wait(timeout=10)
                    break
    for now in during:  # both answer the same: the sum of both processes, the database once
        assert now["pantheon_open_streams"] == 1
        assert now["pantheon_holds_open"] == 1
        assert now["pantheon_turns_total", {"status": "completed"}] == 1
    after = scrape(other.url)
    assert after["pantheon_open_streams"] == 0  # the dead process's gauge is gone
    assert after["pantheon_turns_total", {"status": "completed"}] == 1  # its counters stay
    assert after["pantheon_holds_open"] == 1  # until the sweep releases it
    time.sleep(2.1)
    assert sweep_lapsed_turns().interrupted == 1
    assert scrape(other.url)["pantheon_holds_open"] == 0
