import asyncio
import dataclasses
import socket
import subprocess
import sys
import time
import typing
from decimal import Decimal
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model
from rest_framework.test import APIClient

from accounts.models import ApiKey
from billing_app import services
from billing_app.selectors import ledger_problems

pytest_plugins = ["tests.fake_openrouter"]

MODEL = "test/model"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True, scope="session")
def _fast_password_hashing():
    # Every test user gets a password; the default hasher would cost ~0.3 s each.
    from django.conf import settings

    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture(autouse=True, scope="session")
def _close_connection_pools(django_db_setup, django_db_blocker):
    """Close PostgreSQL's connection pool before the test database is dropped: its idle
    connections (and the server threads', and those the tests' ended event loops left: see
    core.db_on_loop) would keep the database in use."""
    yield
    from django.db import connections

    from core import db_on_loop

    db_on_loop.discard_ended_loops()

    with django_db_blocker.unblock():
        for conn in connections.all():
            if hasattr(conn, "close_pool"):
                conn.close_pool()


@pytest.fixture(autouse=True)
def _ledger_invariant(request):
    """After every test that used the database: the ledger sums to every balance and no
    hold outlives its turn (or, unless the test says otherwise, stays open at all)."""
    yield
    uses_db = request.node.get_closest_marker("django_db") or {"db", "transactional_db"} & set(request.fixturenames)
    if not uses_db:
        return
    allow_open = request.node.get_closest_marker("open_holds_ok") is not None
    django_db_blocker = request.getfixturevalue("django_db_blocker")
    with django_db_blocker.unblock():
        problems = ledger_problems(allow_open_holds=allow_open) + turn_problems(allow_running=allow_open)
    assert not problems, problems


def turn_problems(*, allow_running: bool = False) -> list[str]:
    """No hold outlives its turn: an open hold belongs to a running turn. And, unless the
    test says otherwise, no turn is left running."""
    from billing_app.models import CreditHold
    from sessions_app.models import Turn

    problems = []
    ended = Turn.objects.exclude(status=Turn.Status.RUNNING).values("id")
    for hold in CreditHold.objects.open().filter(turn_id__in=ended):
        problems.append(f"hold {hold.pk} still open after its turn {hold.turn_id} ended")
    if not allow_running:
        for turn in Turn.objects.filter(status=Turn.Status.RUNNING):
            problems.append(f"turn {turn.pk} is still running")
    # What the ledger took for each ended turn (its debit, and an adjustment once reconciled)
    # is what the turn says it cost.
    from django.db.models import Sum

    from billing_app.models import LedgerEntry

    charged = dict(LedgerEntry.objects.filter(turn_id__isnull=False, kind__in=["debit", "adjustment"])
                   .values("turn_id").annotate(total=Sum("amount")).values_list("turn_id", "total"))
    for turn_id, cost in Turn.objects.exclude(status=Turn.Status.RUNNING).values_list("id", "cost"):
        if -charged.get(turn_id, Decimal(0)) != cost:
            problems.append(f"turn {turn_id} cost {cost} but the ledger took {-charged.get(turn_id, Decimal(0))}")
    return problems


@pytest.fixture
def price(db):
    """The test model: 1000 credits per million prompt tokens, 2000 per million completion tokens."""
    return services.set_price(model=MODEL, prompt_per_mtok=Decimal("1000"), completion_per_mtok=Decimal("2000"))


@pytest.fixture
def make_user(db):
    def make(username: str, credits: Decimal | str | None = None):
        user = get_user_model().objects.create_user(username=username, password="pw")
        if credits is not None:
            services.grant(user_id=user.pk, amount=Decimal(credits), note="test credits")
        return user

    return make


@pytest.fixture
def alice(make_user):
    """Alice is a normal user with 10 credits."""
    return make_user("alice", "10")


@pytest.fixture
def bob(make_user):
    """Bob is another user, with 5 credits, whose data Alice must never see."""
    return make_user("bob", "5")


def client_for(user) -> APIClient:
    _, raw = ApiKey.issue(user=user)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
    client.raw_key = raw
    return client


@pytest.fixture
def alice_api(alice) -> APIClient:
    return client_for(alice)


@pytest.fixture
def bob_api(bob) -> APIClient:
    return client_for(bob)


def in_threads(fn, count: int, *, workers: int):
    """`fn(i)` for i in range(count) on `workers` threads at once (real concurrent database
    sessions; needs a transactional test): the results, in order. Each call closes its
    thread's connection, so none is left behind."""
    from concurrent.futures import ThreadPoolExecutor

    from django.db import connection

    def run(i):
        try:
            return fn(i)
        finally:
            connection.close()

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(run, range(count)))


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for a `manage.py` subprocess that must see the test database."""
    import os

    from django.db import connection

    db = connection.settings_dict
    if db["ENGINE"].endswith("sqlite3"):
        url = f"sqlite:///{db['NAME']}"
    else:
        url = f"postgres://{db['USER']}:{db['PASSWORD'] or ''}@{db['HOST']}:{db['PORT'] or 5432}/{db['NAME']}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env.update({"DATABASE_URL": url, "PYTHONUNBUFFERED": "1", **extra})
    return env


@pytest.fixture
def live_server_url(transactional_db):
    """Pantheon served by a real uvicorn in a thread, on a free loopback port."""
    import threading
    import time

    import uvicorn

    from core import db_on_loop
    from llm_gateway.openrouter import aclose_shared_client
    from pantheon.asgi import application

    server = uvicorn.Server(uvicorn.Config(application, host="127.0.0.1", port=0, log_level="warning",
                                           lifespan="off", access_log=False))
    def run() -> None:
        async def serve() -> None:
            try:
                await server.serve()
            finally:  # before the test database is flushed or dropped
                await db_on_loop.close()
                await aclose_shared_client()

        asyncio.run(serve())

    thread = threading.Thread(target=run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def session_of(price):
    """A chat session of the given user on the test model."""
    from sessions_app.models import ChatSession

    def make(user, **fields):
        return ChatSession.objects.create(user=user, model=MODEL, **fields)

    return make


@dataclasses.dataclass
class PantheonServer:
    """A Pantheon started by `pantheon_server`: its base URL, its process and its log."""

    url: str
    process: subprocess.Popen
    log_path: Path

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def pantheon_server(transactional_db, tmp_path_factory):
    """Factory: `pantheon_server(**env)` starts Pantheon as a real uvicorn subprocess on a free
    loopback port, against the test database (committed data only, hence transactional_db),
    with `env` added to its environment (e.g. PANTHEON_DB_POOL_MAX="3"), and returns once
    GET /healthz answers 200: a `PantheonServer` with `.url` and `.process` (a test may
    SIGKILL it). Its stdout and stderr go to a temp file, whose tail a failed start shows.
    Every process started is terminated (killed if it lingers) at teardown."""
    import httpx

    python = ROOT / ".venv" / "bin" / "python"
    started: list[tuple[PantheonServer, typing.IO[bytes]]] = []

    def start(**extra_env: str) -> PantheonServer:
        port = _free_port()
        log_path = tmp_path_factory.mktemp("pantheon-server") / f"uvicorn-{port}.log"
        log = log_path.open("wb")
        process = subprocess.Popen(
            [str(python if python.exists() else sys.executable), "-m", "uvicorn", "pantheon.asgi:application",
             "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT, env=subprocess_env(**extra_env), stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT,
        )
        server = PantheonServer(url=f"http://127.0.0.1:{port}", process=process, log_path=log_path)
        started.append((server, log))
        deadline, last = time.monotonic() + 30, "no answer"
        while True:
            if process.poll() is not None:
                pytest.fail(f"Pantheon exited with {process.returncode} at start-up:\n{server.log_tail()}")
            try:
                response = httpx.get(f"{server.url}/healthz", timeout=2)
                if response.status_code == 200:
                    return server
                last = f"{response.status_code} {response.text}"
            except httpx.TransportError as exc:
                last = repr(exc)
            if time.monotonic() > deadline:
                pytest.fail(f"Pantheon did not get healthy in 30 s (last /healthz: {last}):\n{server.log_tail()}")
            time.sleep(0.1)

    yield start
    for server, log in started:
        if server.process.poll() is None:
            server.process.terminate()
            try:
                server.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.process.kill()
                server.process.wait(timeout=10)
        log.close()


def prepared_statements() -> list[str]:
    """The statements prepared on the test's connection (PostgreSQL)."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT statement FROM pg_prepared_statements")
        return [row[0] for row in cursor.fetchall()]
