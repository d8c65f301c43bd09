"""pantheon.asgi: a stopping server closes what its event loop opened."""

import signal

from tests.conftest import client_for
from tests.fake_openrouter import sse_stream
from tests.sessions_app.helpers import auth, read_stream


def test_a_stopped_server_closes_its_upstream_and_database_connections(alice, session_of, fake_openrouter,
                                                                        pantheon_server):
    server = pantheon_server(PANTHEON_LLM_PROVIDER="openrouter", OPENROUTER_BASE_URL=fake_openrouter.base_url,
                             OPENROUTER_API_KEY="test", PYTHONASYNCIODEBUG="0")
    fake_openrouter.enqueue(sse_stream())
    response, events, _ = read_stream(server.url, session_of(alice), auth(client_for(alice)))
    assert response.status_code == 200 and events[-1][0] == "done"  # a pooled upstream connection is open
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=15) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it caught
    log = server.log_tail(20000)
    assert "Application shutdown complete" in log, log
    # aiohttp's warnings for a session or connector the process exits without closing.
    assert "Unclosed" not in log and "Traceback" not in log, log


def test_the_served_app_tunes_the_garbage_collector_at_startup():
    from core.asgi import tune_garbage_collector
    from pantheon.asgi import application

    assert application.on_startup == (tune_garbage_collector,)
