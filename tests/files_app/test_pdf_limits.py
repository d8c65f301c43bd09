"""Extraction is bounded (issue 13, docs/files.md): pages, characters, time and memory, the
reason of a failure is the file's `error` in the API, and the turn sweep never waits behind
an extraction (its own queue, a worker per queue)."""

import os
import signal
import subprocess
import sys
import time
import uuid
import zlib
from pathlib import Path

import pytest
from django.conf import settings as django_settings
from django.tasks import TaskResultStatus
from django_tasks_db.models import DBTaskResult

from files_app.extraction import APPLICATION_PDF, Limits, extract_text
from files_app.models import UploadedFile
from files_app.tasks import FILES_QUEUE, extract_file_text, requeue_stale_uploads
from sessions_app.tasks import reconcile_turn_task, sweep_turns
from tests.files_app.helpers import inflating_pdf, minimal_pdf, pages_pdf, text_bomb_pdf, upload
from tests.files_app.test_worker import worker_database_url

pytest.importorskip("pypdf")

MARKER = "PANTHEON_PDF_TEST_MARKER"


def extract_via_api(api, name: str, content: bytes) -> tuple[dict, float]:
    """Upload, run the task as the worker would, and return the API's file object and how
    long the extraction took."""
    created = upload(api, name, content)
    assert created.status_code == 201, created.content
    started = time.monotonic()
    extract_file_text.call(created.json()["id"])
    elapsed = time.monotonic() - started
    return api.get(f"/api/v1/files/{created.json()['id']}").json(), elapsed


def processes_with(marker: str) -> list[int]:
    """Pids of processes (but this one) whose environment holds `marker`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker.encode() in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@pytest.fixture
def limits(settings):
    settings.PANTHEON_PDF_MAX_PAGES = 500
    settings.PANTHEON_EXTRACT_MAX_CHARS = 2_000_000
    settings.PANTHEON_EXTRACT_TIMEOUT_SECONDS = 30
    settings.PANTHEON_EXTRACT_MAX_MEMORY_MB = 512
    return settings


# --- The issue's PDF ----------------------------------------------------------------------

def test_the_bomb_is_what_the_issue_describes():
    data = text_bomb_pdf()
    assert len(data) < 32 * 1024
    start = data.index(b"stream\n") + len(b"stream\n")
    inflated = zlib.decompressobj().decompress(data[start:])
    assert len(inflated) > 9_000_000 and inflated.count(b") Tj") == 86_000  # 8.6 M characters of text


@pytest.mark.django_db
def test_the_bomb_is_stopped_at_the_time_limit_and_the_api_says_why(alice_api, limits, monkeypatch):
    limits.PANTHEON_EXTRACT_TIMEOUT_SECONDS = 1
    marker = f"{MARKER}={uuid.uuid4()}"
    monkeypatch.setenv(MARKER, marker.split("=", 1)[1])

    body, elapsed = extract_via_api(alice_api, "bomb.pdf", text_bomb_pdf())

    assert elapsed < 1 + 3, elapsed  # the deadline, plus starting and reaping the child (untouched, 40 s)
    assert body["status"] == "failed"
    assert body["error"].startswith("reading the PDF took longer than 1 seconds (the limit)"), body
    assert body["truncated"] is False
    assert processes_with(marker) == []  # the child was killed and reaped, not left running


def test_a_killed_parent_leaves_no_reader_running_past_its_cpu_limit():
    """The CPU limit is the backstop when nobody is left to kill the child at the deadline."""
    child = Path(django_settings.BASE_DIR) / "files_app" / "pdf_child.py"
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-I", str(child),
                           '{"max_pages": 500, "max_chars": 100, "memory_bytes": 0, "cpu_seconds": 1}'],
                          input=text_bomb_pdf(), capture_output=True, timeout=30, check=False)
    assert done.returncode in (-signal.SIGXCPU, -signal.SIGKILL), done
    assert time.monotonic() - started < 15  # 1 s of CPU (wall time is longer on a busy machine)


# --- Characters ---------------------------------------------------------------------------

@pytest.mark.django_db
def test_text_over_the_character_limit_is_cut_with_a_note_and_the_file_is_ready(alice_api, limits):
    limits.PANTHEON_EXTRACT_MAX_CHARS = 50_000
    body, _ = extract_via_api(alice_api, "long.pdf", text_bomb_pdf(operators=2000))  # 200 000 characters

    assert (body["status"], body["error"], body["truncated"]) == ("ready", "", True)
    row = UploadedFile.objects.get(pk=body["id"])
    assert row.text[:50_000] == "A" * 50_000
    note = row.text[50_000:]
    assert note.startswith("\n\n[Pantheon: the extracted text was cut at the limit of 50000 characters, in page 1 "
                           "of 1; the rest of the file is not included.]"), note
    assert row.text_length == len(row.text) == 50_000 + len(note)


def test_the_character_limit_stops_reading_pages():
    pdf = pages_pdf([f"page {i} " + "x" * 990 for i in range(1, 11)])
    result = extract_text(pdf, APPLICATION_PDF, Limits(max_pages=500, max_chars=2500, timeout=30, memory_bytes=0))
    assert result.truncated
    body, note = result.text.split("\n\n[Pantheon:")
    assert len(body) == 2500 and "page 3" in body and "page 4" not in body
    assert "in page 3 of 10" in note


@pytest.mark.django_db
def test_text_files_are_cut_at_the_character_limit_too(alice, make_file, limits):
    limits.PANTHEON_EXTRACT_MAX_CHARS = 10
    row = make_file(alice, "notes.txt", b"0123456789abcdef")
    assert row.status == UploadedFile.Status.READY and row.truncated
    assert row.text.startswith("0123456789\n\n[Pantheon: the extracted text was cut at the limit of 10 characters;")

    exact = make_file(alice, "exact.txt", b"0123456789")
    assert (exact.text, exact.truncated) == ("0123456789", False)


# --- Pages --------------------------------------------------------------------------------

@pytest.mark.django_db
def test_a_pdf_over_the_page_limit_fails_with_the_count(alice_api, limits):
    limits.PANTHEON_PDF_MAX_PAGES = 3
    body, _ = extract_via_api(alice_api, "four.pdf", pages_pdf(["one", "two", "three", "four"]))
    assert body["status"] == "failed"
    assert body["error"] == "the PDF has 4 pages, more than the limit of 3; split it into smaller files"

    body, _ = extract_via_api(alice_api, "three.pdf", pages_pdf(["one", "two", "three"]))
    assert (body["status"], body["error"], body["truncated"]) == ("ready", "", False)


# --- Memory -------------------------------------------------------------------------------

@pytest.mark.django_db
def test_a_pdf_needing_more_memory_than_allowed_fails(alice_api, limits):
    limits.PANTHEON_EXTRACT_MAX_MEMORY_MB = 64
    body, elapsed = extract_via_api(alice_api, "inflating.pdf", inflating_pdf(70))
    assert body["status"] == "failed"
    assert body["error"].startswith("reading the PDF needed more than 64 MB of memory (the limit)"), body
    assert elapsed < 10


# --- What still works ---------------------------------------------------------------------

@pytest.mark.django_db
def test_a_normal_pdf_still_extracts(alice_api, limits):
    body, elapsed = extract_via_api(alice_api, "doc.pdf", pages_pdf(["First page", "Second page", "Third page"]))
    assert (body["status"], body["error"], body["truncated"]) == ("ready", "", False)
    assert UploadedFile.objects.get(pk=body["id"]).text == "First page\n\nSecond page\n\nThird page"
    assert elapsed < 5


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("content", "error"),
    [
        (b"%PDF-1.4 this is not really a pdf", "not a readable PDF: "),
        (pages_pdf([""]), "no text could be extracted from the PDF (scanned or image-only?)"),
        (minimal_pdf("ok")[:200], "not a readable PDF: "),
    ],
)
def test_an_unreadable_pdf_fails_with_its_reason_in_the_api(alice_api, limits, content, error):
    body, _ = extract_via_api(alice_api, "bad.pdf", content)
    assert body["status"] == "failed"
    assert body["error"].startswith(error), body


# --- The sweep does not wait behind extraction --------------------------------------------

def test_extraction_has_its_own_queue_and_the_worker_serves_all_by_default():
    from core.management.commands.db_worker import Command

    assert extract_file_text.queue_name == FILES_QUEUE == "files"
    assert sweep_turns.queue_name == reconcile_turn_task.queue_name == requeue_stale_uploads.queue_name == "default"
    assert FILES_QUEUE in django_settings.TASKS["default"]["QUEUES"]
    # A lone `manage.py db_worker` still runs every queue.
    assert Command().create_parser("manage.py", "db_worker").parse_args([]).queue_name == "*"


def start_worker(queue: str, media_root: Path, *, timeout: float, batch: bool = True, **env) -> subprocess.Popen:
    url = worker_database_url()
    if url is None:
        pytest.skip("the worker needs a database another process can open")
    env = {**os.environ, "DATABASE_URL": url, "PANTHEON_MEDIA_ROOT": str(media_root),
           "PANTHEON_EXTRACT_TIMEOUT_SECONDS": str(timeout), **env}
    return subprocess.Popen(
        [sys.executable, "manage.py", "db_worker", "--queue-name", queue, "--no-startup-delay", "--no-reload",
         "--interval", "0.1", *(["--batch"] if batch else [])],
        cwd=django_settings.BASE_DIR, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def wait_for(predicate, *, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def extraction_status(file_id: str) -> str | None:
    tasks = DBTaskResult.objects.filter(task_path=extract_file_text.module_path).values_list("args_kwargs", "status")
    return next((status for args_kwargs, status in tasks if args_kwargs["args"] == [file_id]), None)


@pytest.mark.django_db(transaction=True)
def test_the_sweep_runs_while_an_extraction_is_stuck(alice_api, media_root):
    created = upload(alice_api, "bomb.pdf", text_bomb_pdf())
    file_id = created.json()["id"]
    assert DBTaskResult.objects.get(task_path=extract_file_text.module_path).queue_name == "files"

    # The time limit leaves the other worker time to start on a busy machine (2 s when idle).
    files_worker = start_worker("files", media_root, timeout=8)
    try:
        wait_for(lambda: extraction_status(file_id) == TaskResultStatus.RUNNING, seconds=20,
                 what="the files worker to start the extraction")
        extraction_started = time.monotonic()

        # Meanwhile a worker of the default queue queues and runs the sweep, and is done.
        sweeper = start_worker("default", media_root, timeout=8)
        out, _ = sweeper.communicate(timeout=30)
        assert sweeper.returncode == 0, out
        sweep = DBTaskResult.objects.filter(task_path=sweep_turns.module_path, status=TaskResultStatus.SUCCESSFUL)
        assert sweep.exists(), out
        assert extraction_status(file_id) == TaskResultStatus.RUNNING  # still held by the PDF

        out, _ = files_worker.communicate(timeout=30)
        assert files_worker.returncode == 0, out
        held = time.monotonic() - extraction_started
    finally:
        if files_worker.poll() is None:
            files_worker.kill()
            files_worker.wait()

    assert held < 8 + 8, held  # released at the deadline, not after the 40 s the PDF takes
    assert extraction_status(file_id) == TaskResultStatus.SUCCESSFUL
    body = alice_api.get(f"/api/v1/files/{file_id}").json()
    assert body["status"] == "failed" and "took longer than 8 seconds" in body["error"], body


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("signals", [(signal.SIGTERM, signal.SIGTERM), (signal.SIGKILL,)], ids=["term-twice", "kill"])
def test_a_worker_stopped_mid_extraction_takes_its_reader_with_it(alice_api, media_root, signals):
    """SIGTERM lets the running task finish (at most the time limit); a second one stops the
    worker at once, and the PDF reader goes with it, as it does when the worker is killed
    (the file stays pending, for the requeue)."""
    created = upload(alice_api, "bomb.pdf", text_bomb_pdf())
    file_id = created.json()["id"]
    marker = str(uuid.uuid4())
    worker = start_worker("files", media_root, timeout=60, batch=False, **{MARKER: marker})
    try:
        wait_for(lambda: extraction_status(file_id) == TaskResultStatus.RUNNING, seconds=20,
                 what="the files worker to start the extraction")
        wait_for(lambda: len(processes_with(marker)) == 2, seconds=10, what="the PDF reader to start")
        for number in signals:
            worker.send_signal(number)
            time.sleep(0.3)
        worker.communicate(timeout=10)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    wait_for(lambda: processes_with(marker) == [], seconds=5, what="the PDF reader to be gone")
    assert UploadedFile.objects.get(pk=file_id).status == UploadedFile.Status.PENDING
