"""Schemathesis against a live Pantheon: every operation of /api/schema/, with generated
valid and invalid requests, answers what the schema says (no server error, a documented
status, content type and body).

A real uvicorn (`live_server_url`), a Bearer key, and the offline fake model with no delay
between chunks, so a streamed turn ends at once. Each operation gets a bounded number of
examples, half with its path ids taken from objects that exist (a session with a completed
turn, a file), half generated; operations that delete run last.
"""

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, strategies
from hypothesis import settings as hypothesis_settings
from hypothesis.configuration import set_hypothesis_home_dir

from accounts.models import ApiKey
from tests.conftest import MODEL

MAX_EXAMPLES = 20  # per operation and generation mode
CHECKS = [schemathesis.checks.not_a_server_error, schemathesis.checks.status_code_conformance,
          schemathesis.checks.content_type_conformance, schemathesis.checks.response_schema_conformance]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(autouse=True)
def _hypothesis_files_in_tmp(tmp_path):
    """Hypothesis keeps a cache (.hypothesis/) in the working directory: not in the project's."""
    set_hypothesis_home_dir(tmp_path / "hypothesis")
    yield
    set_hypothesis_home_dir(None)


@pytest.fixture
def fuzzed_server(live_server_url, settings, make_user, price, tmp_path):
    """The live server, a user with plenty of credits and their key, and real ids."""
    settings.PANTHEON_LLM_PROVIDER = "fake"
    settings.PANTHEON_FAKE_CHUNK_DELAY_SECONDS = 0
    settings.PANTHEON_DEFAULT_MODEL = MODEL
    settings.MEDIA_ROOT = str(tmp_path / "media")
    user = make_user("fuzzer", "1000000")
    _, raw = ApiKey.issue(user=user)
    headers = {"Authorization": f"Bearer {raw}"}
    with httpx.Client(base_url=f"{live_server_url}/api/v1", headers=headers, timeout=30) as http:
        session = http.post("/sessions", json={"title": "fuzzed"}).json()
        turn = http.post(f"/sessions/{session['id']}/turns", json={"content": "Hello"})
        assert turn.status_code == 201, turn.text
        upload = http.post("/files", files={"file": ("notes.txt", b"Some notes.\n", "text/plain")})
        assert upload.status_code == 201, upload.text
    spare = ApiKey.issue(user=user, name="fuzzed")[0]  # for PATCH and DELETE /keys/{id}: not the one in use
    ids = {"session_id": session["id"], "turn_id": turn.json()["turn"]["id"], "file_id": upload.json()["id"],
           "key_id": str(spare.pk)}
    return live_server_url, headers, ids


def _run_operation(operation, base_url: str, headers: dict, ids: dict) -> set[int]:
    """Schemathesis's cases for one operation, checked; the statuses they got."""
    names = {p.name for p in operation.path_parameters}
    real = {name: value for name, value in ids.items() if name in names}
    cases = strategies.one_of(*(
        strategy
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)
        for strategy in ([operation.as_strategy(mode, path_parameters=real)] if real else [])
        + [operation.as_strategy(mode)]
    ))

    @hypothesis_settings(max_examples=MAX_EXAMPLES * 2, deadline=None, database=None, derandomize=True,
                         phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=cases)
    def check(case):
        response = case.call_and_validate(base_url=base_url, headers=headers, checks=CHECKS, timeout=30)
        statuses.add(response.status_code)

    statuses: set[int] = set()
    check()
    return statuses


def test_the_live_api_answers_as_its_schema_says(fuzzed_server):
    base_url, headers, ids = fuzzed_server
    schema = schemathesis.openapi.from_url(f"{base_url}/api/schema/?format=json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 19
    # What deletes runs last, so the other operations meet the real objects.
    operations.sort(key=lambda operation: operation.method.upper() == "DELETE")
    failures, unanswered = [], []
    for operation in operations:
        try:
            statuses = _run_operation(operation, base_url, headers, ids)
        except Exception as exc:  # noqa: BLE001 - every operation's failures are reported together
            failures.append(f"{operation.label}:\n{exc}")
            continue
        # Not only refusals: each operation also succeeded (a broken key would pass every check
        # with 401s). Random bytes are no file type Pantheon reads: uploads are all 400s.
        if not any(200 <= status < 300 for status in statuses) and operation.label != "POST /api/v1/files":
            unanswered.append(f"{operation.label}: only {sorted(statuses)}")
    assert not failures, "\n\n".join(failures)
    assert not unanswered, unanswered
