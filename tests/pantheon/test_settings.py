"""Production settings, logs and the local run (issue 13): DEBUG off by default, Django's
deployment checklist, one log line (JSON in production) per event with the request id,
the access line, a 500 without a traceback, /healthz on a database that was never migrated."""

import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from django.test import Client
from django.urls import path

from core.logging import JsonFormatter, TextFormatter, log_context
from tests.conftest import ROOT, client_for
from tests.sessions_app.helpers import auth, read_stream

PYTHON = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv" / "bin" / "python").exists() else sys.executable
SECRET = "settings-test-only-" + "x7Kq2mZp9Lw4Rt8Vn3Bc" * 2
# The production environment of docs/deploy.md (what bin/test checks too).
PRODUCTION = {"DJANGO_SECRET_KEY": SECRET, "DJANGO_ALLOWED_HOSTS": "pantheon.example.com",
              "PANTHEON_HTTPS": "true", "PANTHEON_PROXY_SSL_HEADER": "true"}


def clean_env(**extra: str) -> dict[str, str]:
    """No Django or Pantheon variable of the test run, only `extra`."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DJANGO_", "PANTHEON_", "PYTEST", "DATABASE_URL", "OPENROUTER_"))}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def python(code: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)


def manage(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)


SHOW_SETTINGS = ("import django, os; os.environ['DJANGO_SETTINGS_MODULE'] = 'pantheon.settings'; django.setup();"
                 "from django.conf import settings as s; print(s.DEBUG, s.PANTHEON_LOG_FORMAT)")


def test_debug_is_off_unless_asked_for_and_then_serving_needs_a_secret_key():
    done = python(SHOW_SETTINGS, clean_env(DJANGO_SECRET_KEY=SECRET))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "json"]
    # Without a key the settings load (commands that need none run), but serving refuses.
    done = python(SHOW_SETTINGS, clean_env())
    assert done.returncode == 0 and done.stdout.split() == ["False", "json"], done.stderr
    done = python("import os; os.environ['DJANGO_SETTINGS_MODULE'] = 'pantheon.settings'; import pantheon.asgi",
                  clean_env())
    assert done.returncode != 0 and "DJANGO_SECRET_KEY is required when DJANGO_DEBUG=false" in done.stderr
    done = python("import os; os.environ['DJANGO_SETTINGS_MODULE'] = 'pantheon.settings'; import pantheon.asgi",
                  clean_env(DJANGO_SECRET_KEY=SECRET))
    assert done.returncode == 0, done.stderr


def test_the_migration_check_runs_in_a_clean_environment():
    """`manage.py makemigrations --check` as CI and a newcomer run it: no key, no variables."""
    done = manage("makemigrations", "--check", "--dry-run", env=clean_env())
    assert done.returncode == 0, done.stdout + done.stderr
    assert "No changes detected" in done.stdout
    done = python(SHOW_SETTINGS, clean_env(DJANGO_DEBUG="true"))  # the local run (bin/run sets it)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "text"]


def test_the_documented_production_environment_passes_the_deploy_checklist():
    done = manage("check", "--deploy", "--fail-level", "WARNING", env=clean_env(**PRODUCTION))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no issues" in done.stdout


def test_the_deploy_checklist_sees_through_the_middleware_subclasses():
    """Without TLS settings it complains: Django's checks of HSTS, the SSL redirect and the
    cookies run although MIDDLEWARE names core.middleware's subclasses."""
    env = clean_env(DJANGO_SECRET_KEY=SECRET, DJANGO_ALLOWED_HOSTS="pantheon.example.com")
    done = manage("check", "--deploy", "--fail-level", "WARNING", env=env)
    assert done.returncode != 0
    for check in ("security.W004", "security.W008", "security.W010", "security.W016"):
        assert check in done.stderr, (check, done.stderr)
    for check in ("security.W001", "security.W002", "security.W003", "core.W00"):  # the middleware are there
        assert check not in done.stderr, (check, done.stderr)


def test_tls_settings_follow_pantheon_https():
    code = ("import django, os; os.environ['DJANGO_SETTINGS_MODULE'] = 'pantheon.settings'; django.setup();"
            "from django.conf import settings as s; print(s.SESSION_COOKIE_SECURE, s.CSRF_COOKIE_SECURE, "
            "s.SECURE_SSL_REDIRECT, s.SECURE_HSTS_SECONDS, s.SECURE_PROXY_SSL_HEADER, s.SECURE_REDIRECT_EXEMPT)")
    done = python(code, clean_env(**PRODUCTION))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ("True True True 31536000 ('HTTP_X_FORWARDED_PROTO', 'https') "
                                   "['^healthz$', '^metrics$']")


def test_healthz_refuses_traffic_on_a_database_that_was_never_migrated(tmp_path):
    code = ("import django, os; os.environ['DJANGO_SETTINGS_MODULE'] = 'pantheon.settings'; django.setup();"
            "from django.test import Client; r = Client().get('/healthz'); print(r.status_code, r.content.decode())")
    done = python(code, clean_env(DJANGO_SECRET_KEY=SECRET, DATABASE_URL=f"sqlite:///{tmp_path / 'empty.sqlite3'}",
                                  DJANGO_ALLOWED_HOSTS="testserver"))
    assert done.returncode == 0, done.stderr
    status, _, body = done.stdout.partition(" ")
    body = json.loads(body)
    assert status == "503"
    assert body["code"] == "migrations_pending" and body["database"] == "ok"
    assert body["migrations"].endswith(" unapplied") and int(body["migrations"].split()[0]) > 20


# --- a 500 with DEBUG off ---------------------------------------------------------------

def _boom(request):
    raise RuntimeError("secret-database-host.internal refused user pantheon_prod")


urlpatterns = [path("boom", _boom)]
handler500 = "pantheon.views.server_error"


@pytest.mark.urls(__name__)
@pytest.mark.django_db
def test_a_server_error_is_json_without_a_traceback(settings):
    assert settings.DEBUG is False
    response = Client(raise_request_exception=False).get("/boom")
    assert response.status_code == 500
    assert response.json() == {"detail": "Internal server error.", "code": "server_error"}
    assert b"secret-database-host" not in response.content and b"Traceback" not in response.content
    assert response["X-Request-ID"]


# --- logs -----------------------------------------------------------------------------

ONE_LINE_PER_EVENT = """
import logging, os, sys
import uvicorn
os.environ["DJANGO_SETTINGS_MODULE"] = "pantheon.settings"
# As the uvicorn CLI does: its own logging first, then the app (Django's LOGGING) is imported.
uvicorn.Config("pantheon.asgi:application", access_log=False).configure_logging()
import django
django.setup()
# As `manage.py db_worker` does: it adds a handler when it finds none.
from django_tasks_db.management.commands.db_worker import Command
Command().configure_logging(1)
for name in sys.argv[1:]:
    logging.getLogger(name).error("event from %s", name)
logging.getLogger("uvicorn.access").info("event from uvicorn.access")  # as uvicorn logs a request
"""
LOGGERS = ["django.request", "django.tasks", "django_tasks_db", "django.security.csrf", "sessions_app.live_turn",
           "pantheon.access", "uvicorn.error", "llm_gateway", "py.warnings"]


def test_every_log_event_is_one_line_of_json_in_production():
    done = python(ONE_LINE_PER_EVENT, clean_env(DJANGO_SECRET_KEY=SECRET), *LOGGERS)
    assert done.returncode == 0, done.stderr
    output = done.stdout + done.stderr
    for name in LOGGERS:
        assert output.count(f"event from {name}") == 1, (name, output)
    assert "event from uvicorn.access" not in output  # --no-access-log stays off
    lines = [json.loads(line) for line in done.stderr.splitlines()]
    assert [line["logger"] for line in lines] == LOGGERS
    assert all(line["level"] == "ERROR" and line["time"].endswith("+00:00") for line in lines)


def test_logs_are_readable_lines_when_debugging():
    done = python(ONE_LINE_PER_EVENT, clean_env(DJANGO_DEBUG="true"), *LOGGERS)
    assert done.returncode == 0, done.stderr
    for name in LOGGERS:
        assert done.stderr.count(f"event from {name}") == 1, (name, done.stderr)
    assert "ERROR sessions_app.live_turn: event from sessions_app.live_turn" in done.stderr
    assert "{" not in done.stderr


def test_the_formatters_add_the_context_and_the_extra_fields():
    record = logging.LogRecord("sessions_app.turns", logging.WARNING, __file__, 1, "turn %s: %s", ("t1", "late"),
                               None)
    record.status = 502
    record.request = object()  # not a scalar: left out
    with log_context(request_id="r-1", user_id=7, turn_id="t1"):
        entry = json.loads(JsonFormatter().format(record))
        text = TextFormatter().format(record)
    assert entry == {"time": entry["time"], "level": "WARNING", "logger": "sessions_app.turns",
                     "message": "turn t1: late", "request_id": "r-1", "user_id": 7, "turn_id": "t1", "status": 502}
    assert text.endswith("WARNING sessions_app.turns: turn t1: late  [request_id=r-1 user_id=7 turn_id=t1]")
    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    line = JsonFormatter().format(record)
    assert "\n" not in line and "ValueError: bad\nvalue" in json.loads(line)["exc"]  # one line, all of it


@pytest.fixture
def access_lines():
    """The pantheon.access lines, formatted as in production."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("pantheon.access")
    logger.addHandler(handler)

    def lines() -> list[dict]:
        return [json.loads(line) for line in stream.getvalue().splitlines()]

    yield lines
    logger.removeHandler(handler)


def test_each_request_has_an_id_and_one_access_line(alice, access_lines):
    api = client_for(alice)
    response = api.get("/api/v1/wallet")
    generated = response["X-Request-ID"]
    assert len(generated) == 32 and int(generated, 16) >= 0
    assert api.get("/api/v1/wallet", HTTP_X_REQUEST_ID="nginx-4f2a9c").headers["X-Request-ID"] == "nginx-4f2a9c"
    forged = api.get("/api/v1/wallet", HTTP_X_REQUEST_ID='x" injected\n{').headers["X-Request-ID"]
    assert forged != 'x" injected\n{' and len(forged) == 32
    assert Client().get("/api/v1/wallet").status_code == 401
    lines = access_lines()
    assert [line["request_id"] for line in lines[:3]] == [generated, "nginx-4f2a9c", forged]
    first = lines[0]
    assert first["method"] == "GET" and first["path"] == "/api/v1/wallet" and first["status"] == 200
    assert first["user_id"] == alice.pk and isinstance(first["duration_ms"], float)
    assert first["message"].startswith("GET /api/v1/wallet 200 ")
    assert lines[3]["status"] == 401 and "user_id" not in lines[3]
    assert len(lines) == 4


@pytest.mark.usefixtures("fake_openrouter_settings")
def test_a_streamed_turn_is_logged_when_it_ends_with_its_turn_and_user(alice, session_of, live_server_url,
                                                                       fake_openrouter, access_lines):
    import time

    fake_openrouter.enqueue(fake_openrouter.sse_stream(["Hel", "lo"], usage=(12, 2), delay=0.2))
    headers = {**auth(client_for(alice)), "X-Request-ID": "stream-1"}
    response, events, _ = read_stream(live_server_url, session_of(alice), headers)
    assert response.headers["x-request-id"] == "stream-1"
    turn_id = events[-1][1]["turn_id"]
    deadline = time.monotonic() + 10
    while not [line for line in access_lines() if line["request_id"] == "stream-1"]:
        assert time.monotonic() < deadline, access_lines()
        time.sleep(0.05)
    [line] = [line for line in access_lines() if line["request_id"] == "stream-1"]
    assert line["status"] == 200 and line["user_id"] == alice.pk and line["turn_id"] == turn_id
    assert line["path"].endswith("/turns/stream")
    assert line["duration_ms"] >= line["headers_ms"] + 150  # written at the end of the body, not at its headers


@pytest.mark.usefixtures("fake_openrouter_settings")
def test_a_client_gone_before_the_answer_is_logged_as_499(alice, session_of, live_server_url, fake_openrouter,
                                                          access_lines):
    import time

    from tests.sessions_app.helpers import wait_until_closed

    fake_openrouter.enqueue(fake_openrouter.completion("too late", delay=3))
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{live_server_url}/api/v1/sessions/{session_of(alice).id}/turns", json={"content": "hello"},
                   headers={**auth(client_for(alice)), "X-Request-ID": "gone-1"}, timeout=0.5)
    turn = wait_until_closed()
    deadline = time.monotonic() + 10
    while not [line for line in access_lines() if line["request_id"] == "gone-1"]:
        assert time.monotonic() < deadline, access_lines()
        time.sleep(0.05)
    [line] = [line for line in access_lines() if line["request_id"] == "gone-1"]
    assert line["status"] == 499 and line["turn_id"] == str(turn.id) and line["user_id"] == alice.pk


def test_a_request_id_reaches_the_server_logs_through_a_live_server(db, live_server_url, access_lines):
    response = httpx.get(live_server_url + "/healthz", headers={"X-Request-ID": "probe-7"}, timeout=10)
    assert response.status_code == 200 and response.headers["x-request-id"] == "probe-7"
    assert [line["status"] for line in access_lines() if line["request_id"] == "probe-7"] == [200]


# --- setup_demo's key ----------------------------------------------------------------

def test_setup_demo_reuses_the_kept_key_while_it_is_active(db, tmp_path):
    from django.core.management import call_command

    from accounts.models import ApiKey

    def setup_demo() -> list[str]:
        out = io.StringIO()
        call_command("setup_demo", "--key-file", str(key_file), stdout=out)
        return out.getvalue().splitlines()

    key_file = tmp_path / ".demo-key"
    first = setup_demo()
    assert first[-2] == f"API key for the demo user (new, kept in {key_file}):"
    key = first[-1]
    assert key.startswith("pk_") and key_file.read_text().strip() == key
    assert key_file.stat().st_mode & 0o777 == 0o600
    again = setup_demo()
    assert again[-2] == f"API key for the demo user (the same as before, kept in {key_file}):"
    assert again[-1] == key and ApiKey.objects.count() == 1
    key_file.unlink()  # lost: a new key, and the old one is revoked
    lost = setup_demo()
    assert lost[-1] != key
    assert ApiKey.objects.active().get().prefix == lost[-1][:10]
    ApiKey.objects.active().get().revoke()  # revoked in the admin: a new key
    revoked = setup_demo()
    assert revoked[-1] not in (key, lost[-1]) and key_file.read_text().strip() == revoked[-1]
    assert ApiKey.objects.active().count() == 1


# --- bin/run ----------------------------------------------------------------------------

def _copy_of_the_project(target: Path) -> None:
    import shutil

    skip = shutil.ignore_patterns(".git", ".venv", "db.sqlite3*", "media", "staticfiles", "artifacts", "__pycache__",
                                  ".demo-key", ".ruff_cache", ".pytest_cache", "node_modules")
    shutil.copytree(ROOT, target, ignore=skip, symlinks=True)
    (target / ".venv").symlink_to(ROOT / ".venv")  # bin/setup-venv finds it up to date


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def _start_bin_run(project: Path, port: int, log: Path) -> tuple[subprocess.Popen, list[str], int]:
    """Start bin/run; once its banner is out: the process, the lines so far, the index of
    the "API key for the demo user" line (the key is the next one)."""
    import time

    env = clean_env(PANTHEON_PORT=str(port))
    process = subprocess.Popen(["bin/run"], cwd=project, env=env, stdin=subprocess.DEVNULL,
                               stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 90
    while True:
        lines = log.read_text(errors="replace").splitlines()
        banner = [i for i, line in enumerate(lines) if line.startswith("API key for the demo user")]
        if banner and len(lines) > banner[0] + 1:
            return process, lines, banner[0]
        assert process.poll() is None, log.read_text(errors="replace")
        assert time.monotonic() < deadline, log.read_text(errors="replace")
        time.sleep(0.2)


def _stop_bin_run(process: subprocess.Popen, log: Path) -> None:
    import signal

    children = _children(process.pid)
    assert len(children) == 3, children  # two workers (queues default, files) and uvicorn
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 143, log.read_text(errors="replace")
    leftover = [pid for pid in children if _alive(pid)]
    assert leftover == [], (leftover, log.read_text(errors="replace"))


@pytest.mark.slow  # two start-ups of bin/run: about 20 s
def test_bin_run_stops_its_children_on_sigterm_and_reuses_the_demo_key(tmp_path):
    import signal

    from tests.conftest import _free_port

    project = tmp_path / "pantheon"
    _copy_of_the_project(project)
    port = _free_port()
    processes = []
    try:
        process, lines, at = _start_bin_run(project, port, tmp_path / "run1.log")
        processes.append(process)
        key = lines[at + 1]
        assert key.startswith("pk_") and f"Pantheon on http://127.0.0.1:{port}/" in "\n".join(lines[:at])
        assert lines[at] == "API key for the demo user (new, kept in .demo-key):"
        assert lines[at - 1] == "Demo login: demo / demo at /accounts/login/  (model: fake/echo)"
        wallet = httpx.get(f"http://127.0.0.1:{port}/api/v1/wallet", headers={"Authorization": f"Bearer {key}"},
                           timeout=10)
        assert wallet.status_code == 200 and wallet.json()["balance"] == "10.000000"
        _stop_bin_run(process, tmp_path / "run1.log")

        process, lines, at = _start_bin_run(project, port, tmp_path / "run2.log")
        processes.append(process)
        assert lines[at] == "API key for the demo user (the same as before, kept in .demo-key):"
        assert lines[at + 1] == key
        assert (project / ".demo-key").stat().st_mode & 0o777 == 0o600
        _stop_bin_run(process, tmp_path / "run2.log")
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
