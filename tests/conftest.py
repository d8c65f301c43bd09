from decimal import Decimal

import pytest
from django.contrib.auth import get_user_model
from rest_framework.test import APIClient

from accounts.models import ApiKey
from billing_app import services
from billing_app.selectors import ledger_problems

pytest_plugins = ["tests.fake_openrouter"]

MODEL = "test/model"


@pytest.fixture(autouse=True, scope="session")
def _fast_password_hashing():
    # Every test user gets a password; the default hasher would cost ~0.3 s each.
    from django.conf import settings

    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


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
        problems = ledger_problems(allow_open_holds=allow_open)
    assert not problems, problems


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

    from pantheon.asgi import application

    server = uvicorn.Server(uvicorn.Config(application, host="127.0.0.1", port=0, log_level="warning",
                                           lifespan="off", access_log=False))
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
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
