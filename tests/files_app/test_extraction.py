import json
from pathlib import Path

import pytest

from files_app import services
from files_app.extraction import ExtractionError, detect_content_type, extract_text
from files_app.models import UploadedFile
from files_app.tasks import extract_file_text
from tests.files_app.helpers import minimal_pdf

pytestmark = pytest.mark.django_db


def extract(row: UploadedFile) -> UploadedFile:
    """Run the task's function, as the worker would, and reload the row."""
    extract_file_text.call(str(row.id))
    row.refresh_from_db()
    return row


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("plain.txt", "héllo wörld\nline two\n".encode(), "héllo wörld\nline two\n"),
        ("notes.md", b"# Title\r\n\r\n* item\r\n", "# Title\n\n* item\n"),
        ("table.csv", b"\xef\xbb\xbfname,qty\nwidget,3\n", "name,qty\nwidget,3\n"),  # BOM dropped
        ("data.json", b'{\n  "k": [1, 2, "\xc3\xa9"]\n}', '{\n  "k": [1, 2, "\u00e9"]\n}'),  # text kept as is
    ],
)
def test_text_types_become_ready_with_their_text(alice, make_file, name, content, expected):
    row = extract(make_file(alice, name, content, extract=False))
    assert row.status == UploadedFile.Status.READY
    assert row.failure_reason == ""
    assert row.text == expected
    assert row.text_length == len(expected)


def test_pdf_becomes_ready_with_its_text(alice, make_file):
    pytest.importorskip("pypdf")
    row = extract(make_file(alice, "doc.pdf", minimal_pdf("Hello PDF world"), extract=False))
    assert row.content_type == "application/pdf"
    assert row.status == UploadedFile.Status.READY, row.failure_reason
    assert "Hello PDF world" in row.text


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("bad.json", b'{"a": 1,,}', "invalid JSON"),
        ("deep.json", b"[" * 100_000, "invalid JSON"),
        ("garbage.txt", bytes(range(128, 256)) * 4, "not UTF-8"),
        ("latin1.csv", "caf\xe9,1\n".encode("latin-1"), "not UTF-8"),
        ("nul.md", b"text\x00with nul", "NUL"),
        ("fake.pdf", b"%PDF-1.4 this is not really a pdf", "PDF"),
    ],
)
def test_bad_content_fails_with_a_reason(alice, make_file, name, content, reason):
    if name.endswith(".pdf"):
        pytest.importorskip("pypdf")
    row = extract(make_file(alice, name, content, extract=False))
    assert row.status == UploadedFile.Status.FAILED
    assert reason in row.failure_reason
    assert row.text == "" and row.text_length == 0


def test_running_twice_changes_nothing(alice, make_file):
    row = make_file(alice, "a.txt", b"first", extract=False)
    assert services.run_extraction(row.id) == "ready"
    before = UploadedFile.objects.values().get(pk=row.pk)
    Path(row.stored.path).write_bytes(b"changed on disk")

    assert services.run_extraction(row.id) == "already_ready"
    assert UploadedFile.objects.values().get(pk=row.pk) == before

    failed = make_file(alice, "b.json", b"{", extract=False)
    assert services.run_extraction(failed.id) == "failed"
    assert services.run_extraction(failed.id) == "already_failed"


def test_deleted_file_is_a_no_op(alice, make_file):
    row = make_file(alice, "a.txt", b"x", extract=False)
    file_id = str(row.id)
    row.delete()
    assert extract_file_text.call(file_id) == "missing"
    assert extract_file_text.call("not-a-uuid") == "invalid_id"
    assert not UploadedFile.objects.exists()


def test_missing_stored_bytes_fail_the_file(alice, make_file):
    row = make_file(alice, "a.txt", b"x", extract=False)
    Path(row.stored.path).unlink()
    row = extract(row)
    assert row.status == UploadedFile.Status.FAILED
    assert row.failure_reason == "the stored file could not be read"


def test_a_concurrent_run_that_lost_the_race_writes_nothing(alice, make_file, monkeypatch):
    """The final write only applies while the row is still pending."""
    row = make_file(alice, "a.txt", b"mine", extract=False)
    real_extract = services.extract_text

    def extract_then_lose_the_race(data, content_type):
        UploadedFile.objects.filter(pk=row.pk).update(status="ready", text="winner", text_length=6)
        return real_extract(data, content_type)

    monkeypatch.setattr(services, "extract_text", extract_then_lose_the_race)
    assert services.run_extraction(row.id) == "skipped"
    row.refresh_from_db()
    assert row.text == "winner"


def test_unexpected_errors_fail_the_file_instead_of_leaving_it_pending(alice, make_file, monkeypatch):
    row = make_file(alice, "a.txt", b"x", extract=False)

    def boom(data, content_type):
        raise RuntimeError("bug")

    monkeypatch.setattr(services, "extract_text", boom)
    row = extract(row)
    assert row.status == UploadedFile.Status.FAILED
    assert row.failure_reason == "text extraction failed unexpectedly"


def test_detect_content_type():
    assert detect_content_type("x.TXT", None) == "text/plain"
    assert detect_content_type("x", "text/csv; charset=utf-8") == "text/csv"
    assert detect_content_type("x.png", "image/png") is None
    assert detect_content_type("x", None) is None
    assert detect_content_type("x.docx", "text/plain") is None  # a known extension or none at all
    assert detect_content_type("v1.2 draft", "text/markdown") == "text/markdown"  # ".2 draft" is no extension


def test_extract_text_rejects_unknown_types():
    with pytest.raises(ExtractionError):
        extract_text(b"x", "image/png")
    assert json.loads(extract_text(b'{"a": "b"}', "application/json").text) == {"a": "b"}
