"""Tool turns must not keep a pooled database connection while they wait on the provider.

Pantheon runs in a real uvicorn subprocess with a pool of POOL_MAX connections and a 1 s
pool timeout; more tool turns than that run at once against the loopback OpenRouter, which
asks each for a `file_read` and then answers the tool round only after PROVIDER_DELAY. While
they all wait there, other requests must still get a connection.
"""

import asyncio

import httpx
import pytest
from django.db import connection

from files_app.models import UploadedFile
from sessions_app.models import Turn
from tests.conftest import client_for
from tests.fake_openrouter import RecordedRequest, completion, tool_call

POOL_MAX = 3
TURNS = 2 * POOL_MAX
PROVIDER_DELAY = 2.0  # seconds the final answer of each turn takes; well over the pool timeout
SECRET = "The launch code is PAN-1234."


@pytest.mark.skipif(connection.vendor != "postgresql", reason="the connection pool is PostgreSQL's")
def test_tool_turns_waiting_on_the_provider_do_not_hold_pool_connections(
        make_user, make_file, session_of, fake_openrouter, pantheon_server):
    user = make_user("reader", "10000")  # each tool turn holds for every possible round
    file = make_file(user, "notes.txt", SECRET.encode())
    assert file.status == UploadedFile.Status.READY
    sessions = [session_of(user) for _ in range(TURNS)]
    headers = {"Authorization": f"Bearer {client_for(user).raw_key}"}

    def reply(request: RecordedRequest):
        if request.body["messages"][-1]["role"] == "tool":  # the tool ran: answer, slowly
            return completion("Your file holds a launch code.", usage=(200, 10), delay=PROVIDER_DELAY)
        return completion(None, tool_calls=[tool_call("file_read", {"file_id": str(file.id)})], usage=(100, 5))

    fake_openrouter.reply_with(reply)
    server = pantheon_server(
        PANTHEON_LLM_PROVIDER="openrouter", OPENROUTER_BASE_URL=fake_openrouter.base_url,
        OPENROUTER_API_KEY="test", PANTHEON_UPSTREAM_MAX_RETRIES="0",
        PANTHEON_DB_POOL_MAX=str(POOL_MAX), PANTHEON_DB_POOL_TIMEOUT="1",
    )

    async def scenario():
        async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=30) as http:
            turns = [asyncio.create_task(http.post(f"/api/v1/sessions/{s.id}/turns",
                                                   json={"content": "What does my file say?", "tools_enabled": True}))
                     for s in sessions]
            # Every turn has run its tool and now waits on the provider's delayed answer.
            if not await asyncio.to_thread(fake_openrouter.wait_for_requests, 2 * TURNS, 15):
                ended = [(t.result().status_code, t.result().text) for t in turns if t.done() and not t.exception()]
                pytest.fail(f"only {len(fake_openrouter.requests)} of {2 * TURNS} upstream requests arrived; "
                            f"turns ended: {ended}\n{server.log_tail()}")
            wallet = await http.get("/api/v1/wallet")
            waiting = sum(not t.done() for t in turns)
            return wallet, waiting, await asyncio.gather(*turns)

    wallet, waiting, responses = asyncio.run(scenario())

    log = server.log_tail()
    assert wallet.status_code == 200, f"GET /api/v1/wallet: {wallet.status_code} while the turns waited\n{log}"
    assert waiting == TURNS, "the wallet answered only after the turns had ended"
    assert [r.status_code for r in responses] == [201] * TURNS, ([r.text[:300] for r in responses], log)
    tool_results = [r.body["messages"][-1]["content"] for r in fake_openrouter.requests
                    if r.body["messages"][-1]["role"] == "tool"]
    assert len(tool_results) == TURNS and all(SECRET in text for text in tool_results), tool_results
    assert Turn.objects.filter(user=user, status=Turn.Status.COMPLETED).count() == TURNS
