import json
import uuid

import pytest

from files_app import services
from files_app.models import UploadedFile
from files_app.services import FILE_READ_TOOL, read_file_for_tool, ready_files_for

pytestmark = pytest.mark.django_db

TEXT = "".join(f"line {i:04d} ünïcode\n" for i in range(2000))  # 38,000 characters, not ASCII


@pytest.fixture
def alices_file(alice, make_file):
    row = make_file(alice, "long.txt", TEXT.encode())
    assert row.status == UploadedFile.Status.READY
    return row


def split(result: str) -> tuple[str, str]:
    header, _, body = result.partition("\n")
    return header, body


def test_reads_from_the_start_with_the_default_limit(alice, alices_file):
    header, body = split(read_file_for_tool(user_id=alice.pk, arguments={"file_id": str(alices_file.id)}))
    assert body == TEXT[:services.FILE_READ_DEFAULT_LIMIT]
    assert '"long.txt"' in header
    assert "offset 0" in header
    assert f"returned {services.FILE_READ_DEFAULT_LIMIT} of {len(TEXT)} characters" in header
    assert f"offset={services.FILE_READ_DEFAULT_LIMIT}" in header


def test_offset_and_limit_page_through_the_text(alice, alices_file):
    pieces, offset = [], 0
    while True:
        header, body = split(read_file_for_tool(
            user_id=alice.pk, arguments={"file_id": str(alices_file.id), "offset": offset, "limit": 7000}))
        pieces.append(body)
        offset += len(body)
        if "end of file" in header:
            break
    assert "".join(pieces) == TEXT

    header, body = split(read_file_for_tool(user_id=alice.pk,
                                            arguments={"file_id": str(alices_file.id), "offset": 21, "limit": 5}))
    assert body == TEXT[21:26]
    assert "offset 21, returned 5 of" in header


def test_limit_is_capped_and_lenient_numbers_are_accepted(alice, alices_file):
    _, body = split(read_file_for_tool(user_id=alice.pk, arguments={"file_id": str(alices_file.id), "limit": 10**9}))
    assert len(body) == services.FILE_READ_MAX_LIMIT
    _, body = split(read_file_for_tool(user_id=alice.pk,
                                       arguments={"file_id": str(alices_file.id), "offset": "3", "limit": 4.0}))
    assert body == TEXT[3:7]


def test_reading_at_the_end_returns_nothing_more(alice, alices_file):
    header, body = split(read_file_for_tool(user_id=alice.pk,
                                            arguments={"file_id": str(alices_file.id), "offset": len(TEXT)}))
    assert body == ""
    assert "end of file" in header


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ({"offset": -1}, "error: offset must be >= 0"),
        ({"offset": 10**12}, "error: offset 1000000000000 is past the end"),
        ({"offset": "abc"}, "error: offset must be an integer"),
        ({"offset": True}, "error: offset must be an integer"),
        ({"offset": 1.5}, "error: offset must be an integer"),
        ({"limit": 0}, "error: limit must be >= 1"),
        ({"limit": [5]}, "error: limit must be an integer"),
    ],
)
def test_bad_offset_or_limit_is_an_error_text(alice, alices_file, arguments, expected):
    result = read_file_for_tool(user_id=alice.pk, arguments={"file_id": str(alices_file.id), **arguments})
    assert result.startswith(expected)
    assert "line 0000" not in result


def test_another_users_file_is_not_found_and_shows_nothing(alice, bob, make_file):
    bobs = make_file(bob, "bob-secret.txt", b"BOB'S SECRET")
    assert bobs.status == UploadedFile.Status.READY

    result = read_file_for_tool(user_id=alice.pk, arguments={"file_id": str(bobs.id)})
    assert result == "error: file not found"
    # Bob himself can read it.
    assert "BOB'S SECRET" in read_file_for_tool(user_id=bob.pk, arguments={"file_id": str(bobs.id)})


@pytest.mark.parametrize(
    "arguments",
    [{"file_id": str(uuid.uuid4())}, {"file_id": "not-a-uuid"}, {"file_id": "../../etc/passwd"},
     {"file_id": 12345}, {"file_id": None}, {}, "not a dict", None],
)
def test_unknown_or_invalid_ids_are_error_texts(alice, alices_file, arguments):
    result = read_file_for_tool(user_id=alice.pk, arguments=arguments)
    assert result.startswith("error:")
    assert "line 0000" not in result


@pytest.mark.parametrize("status", ["pending", "failed"])
def test_files_that_are_not_ready_are_not_found(alice, make_file, status):
    row = make_file(alice, "a.txt", b"content not ready", extract=False)
    UploadedFile.objects.filter(pk=row.pk).update(status=status, text="content not ready", text_length=17)
    assert read_file_for_tool(user_id=alice.pk, arguments={"file_id": str(row.id)}) == "error: file not found"


def test_never_raises(alice, alices_file, monkeypatch):
    def broken(**kwargs):
        raise RuntimeError("database down")

    monkeypatch.setattr(services, "_read_file_for_tool", broken)
    assert read_file_for_tool(user_id=alice.pk, arguments={"file_id": str(alices_file.id)}).startswith("error:")


def test_ready_files_for_lists_only_the_users_ready_files(alice, bob, make_file):
    ready = make_file(alice, "ready.md", b"# ok")
    make_file(alice, "failed.json", b"{")
    make_file(alice, "pending.txt", b"later", extract=False)
    make_file(bob, "bobs.txt", b"bob")

    assert ready_files_for(alice.pk) == [{"id": str(ready.id), "filename": "ready.md", "size": 4}]
    assert ready_files_for(uuid.uuid4().int % 10**6 + 10**6) == []


def test_tool_definition_is_openai_format():
    assert FILE_READ_TOOL["type"] == "function"
    function = FILE_READ_TOOL["function"]
    assert function["name"] == "file_read"
    params = function["parameters"]
    assert params["type"] == "object"
    assert params["required"] == ["file_id"]
    assert params["properties"]["file_id"]["type"] == "string"
    assert params["properties"]["offset"] == {**params["properties"]["offset"], "type": "integer", "minimum": 0}
    assert params["properties"]["limit"]["minimum"] == 1
    json.dumps(FILE_READ_TOOL)  # serialisable as it is
