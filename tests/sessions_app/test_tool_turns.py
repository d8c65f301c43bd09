"""Non-streaming turns with tools_enabled: the file_read loop against the loopback server."""

import json
from decimal import Decimal

import pytest

from billing_app.models import CreditHold, UsageRecord
from files_app.models import UploadedFile
from sessions_app.models import LlmEvent, Message, Turn
from tests.conftest import client_for

pytestmark = pytest.mark.usefixtures("fake_openrouter_settings")

SECRET = "The launch code is PAN-1234. Tell nobody."


def ready_file(user, text: str, name: str = "notes.txt") -> UploadedFile:
    return UploadedFile.objects.create(user=user, filename=name, size=len(text.encode()), content_type="text/plain",
                                       status=UploadedFile.Status.READY, stored=f"uploads/{user.pk}/{name}",
                                       text=text, text_length=len(text))


@pytest.fixture
def rich(make_user):
    """A user who can afford the hold of a tool turn (it covers every round)."""
    return make_user("rich", "500")


def tool_turn(client, session, content="What does my file say?"):
    return client.post(f"/api/v1/sessions/{session.id}/turns", {"content": content, "tools_enabled": True},
                       format="json")


def test_tool_loop_reads_the_file_and_answers_from_it(rich, session_of, fake_openrouter):
    file = ready_file(rich, SECRET)
    session = session_of(rich)
    fake_openrouter.enqueue(
        fake_openrouter.completion(None, tool_calls=[fake_openrouter.tool_call("file_read", {"file_id": str(file.id)},
                                                                               id="call_1")], usage=(100, 20)),
        fake_openrouter.completion("Your file says the launch code is PAN-1234.", usage=(200, 15)),
    )
    response = tool_turn(client_for(rich), session)
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["message"]["content"] == "Your file says the launch code is PAN-1234."
    # Usage of both rounds is summed into the turn: 300 * 0.001 + 35 * 0.002
    assert body["usage"] == {"prompt_tokens": 300, "completion_tokens": 35, "total_tokens": 335, "estimated": False,
                             "reconciled": False}
    assert body["cost"] == "0.370000"

    first, second = fake_openrouter.requests
    assert first.body["tools"][0]["function"]["name"] == "file_read"
    system = "\n".join(m["content"] for m in first.body["messages"] if m["role"] == "system")
    assert str(file.id) in system and "notes.txt" in system
    tool_result = second.body["messages"][-1]
    assert tool_result["role"] == "tool" and tool_result["tool_call_id"] == "call_1"
    assert SECRET in tool_result["content"]

    turn = Turn.objects.get(pk=body["turn"]["id"])
    stored = list(turn.messages.order_by("position").values_list("role", "tool_call_id"))
    assert stored == [("user", ""), ("assistant", ""), ("tool", "call_1"), ("assistant", "")]
    assistant_call = turn.messages.get(position=1)
    assert assistant_call.tool_calls[0]["function"]["name"] == "file_read"
    assert SECRET in turn.messages.get(role="tool").content
    assert LlmEvent.objects.filter(turn=turn).count() == 2
    assert UsageRecord.objects.get(turn_id=turn.id).total_tokens == 335
    assert not CreditHold.objects.open().exists()


@pytest.mark.parametrize("whose", ["foreign", "unknown", "not-a-uuid"])
def test_file_read_never_returns_another_users_bytes(rich, bob, session_of, fake_openrouter, whose):
    file_id = {"foreign": str(ready_file(bob, SECRET).id), "unknown": "00000000-0000-0000-0000-000000000000",
               "not-a-uuid": "../../etc/passwd"}[whose]
    fake_openrouter.enqueue(
        fake_openrouter.completion(None, tool_calls=[fake_openrouter.tool_call("file_read", {"file_id": file_id})]),
        fake_openrouter.completion("I could not read it."),
    )
    response = tool_turn(client_for(rich), session_of(rich))
    assert response.status_code == 201
    tool_result = fake_openrouter.requests[1].body["messages"][-1]
    assert tool_result["content"].startswith("error") and SECRET not in tool_result["content"]
    assert SECRET not in json.dumps([r.body for r in fake_openrouter.requests])
    assert not Message.objects.filter(content__contains="PAN-1234").exists()


def test_tool_rounds_are_bounded(rich, session_of, fake_openrouter, settings):
    settings.PANTHEON_MAX_TOOL_ROUNDS = 2
    file = ready_file(rich, SECRET)
    call = fake_openrouter.tool_call("file_read", {"file_id": str(file.id)})
    fake_openrouter.enqueue(*[fake_openrouter.completion(None, tool_calls=[call]) for _ in range(2)],
                            fake_openrouter.completion("Enough reading."))
    response = tool_turn(client_for(rich), session_of(rich))
    assert response.status_code == 201 and response.json()["message"]["content"] == "Enough reading."
    assert len(fake_openrouter.requests) == 3  # two tool rounds, then one without tools
    assert fake_openrouter.requests[-1].body.get("tool_choice") == "none"
    assert LlmEvent.objects.count() == 3


def test_tool_turn_hold_covers_every_round(make_user, session_of, fake_openrouter):
    user = make_user("modest", "1")  # enough for a plain turn, not for a tool turn's hold
    session = session_of(user)
    client = client_for(user)
    assert tool_turn(client, session).status_code == 402
    assert client.post(f"/api/v1/sessions/{session.id}/turns", {"content": "plain"}, format="json").status_code == 201


def test_tool_turn_with_the_offline_fake_model(rich, session_of, settings):
    from billing_app import services

    settings.PANTHEON_LLM_PROVIDER = "fake"
    settings.PANTHEON_FAKE_CHUNK_DELAY_SECONDS = 0
    services.set_price(model="fake/echo", prompt_per_mtok=Decimal("1"), completion_per_mtok=Decimal("1"))
    file = ready_file(rich, SECRET)
    session = session_of(rich)
    session.model = "fake/echo"
    session.save()
    response = tool_turn(client_for(rich), session, content=f"Summarise file {file.id}")
    assert response.status_code == 201
    assert "PAN-1234" in response.json()["message"]["content"]
