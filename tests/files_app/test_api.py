import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import RequestFactory
from django.utils import timezone
from django_tasks_db.models import DBTaskResult
from rest_framework.test import APIClient

from core.api import ApiError
from files_app import services
from files_app.models import UploadedFile
from tests.files_app.helpers import upload

pytestmark = pytest.mark.django_db

FILE_FIELDS = {"id", "filename", "size", "content_type", "status", "error", "truncated", "created_at"}


def test_upload_answers_201_pending_and_stores_bytes_per_user(alice, alice_api, media_root):
    response = upload(alice_api, "notes.md", b"# Title\nhello\n", "text/markdown")

    assert response.status_code == 201, response.content
    body = response.json()
    assert set(body) == FILE_FIELDS
    assert body["filename"] == "notes.md"
    assert body["size"] == 14
    assert body["content_type"] == "text/markdown"
    assert body["status"] == "pending"
    row = UploadedFile.objects.get(pk=body["id"])
    assert row.user_id == alice.pk
    stored = Path(row.stored.path)
    assert stored.read_bytes() == b"# Title\nhello\n"
    assert stored.is_relative_to(media_root / "uploads" / str(alice.pk))


def test_upload_queues_extraction_only_after_commit(alice_api, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        response = upload(alice_api, "a.txt", b"hello")
    assert response.status_code == 201
    assert not DBTaskResult.objects.exists()  # nothing queued while the row is uncommitted

    for callback in callbacks:
        callback()
    queued = DBTaskResult.objects.get()
    assert queued.task_path == "files_app.tasks.extract_file_text"
    assert queued.args_kwargs == {"args": [response.json()["id"]], "kwargs": {}}


@pytest.mark.parametrize(
    ("name", "declared", "expected"),
    [
        ("a.txt", "text/plain", "text/plain"),
        ("b.MD", "application/octet-stream", "text/markdown"),
        ("c.csv", "", "text/csv"),
        ("d.json", "text/plain", "application/json"),  # the extension wins
        ("no_extension", "application/json", "application/json"),  # else the declared type
        ("e.markdown", "", "text/markdown"),
    ],
)
def test_accepted_types(alice_api, name, declared, expected):
    response = upload(alice_api, name, b"{}", declared)
    assert response.status_code == 201, response.content
    assert response.json()["content_type"] == expected


@pytest.mark.parametrize(
    ("name", "declared"),
    [("photo.png", "image/png"), ("tool.exe", "application/octet-stream"), ("x.docx", "text/plain"),
     ("README", "application/octet-stream"), ("notes.log", "text/plain")],
)
def test_unsupported_type_is_400(alice_api, name, declared):
    response = upload(alice_api, name, b"\x89PNG....", declared)
    assert response.status_code == 400
    assert response.json()["code"] == "unsupported_file_type"
    assert not UploadedFile.objects.exists()


def test_missing_file_is_400(alice_api):
    response = alice_api.post("/api/v1/files", {"other": "x"}, format="multipart")
    assert response.status_code == 400
    assert response.json() == {"detail": "Send the file as the multipart form field 'file'.", "code": "file_required"}

    response = alice_api.post("/api/v1/files", {"file": "not a file"}, format="json")
    assert response.status_code == 400
    assert response.json()["code"] == "file_required"


def test_empty_file_is_400(alice_api):
    response = upload(alice_api, "empty.txt", b"", "text/plain")
    assert response.status_code == 400
    assert response.json()["code"] == "empty_file"


def test_two_files_is_400(alice_api):
    files = [SimpleUploadedFile("a.txt", b"a"), SimpleUploadedFile("b.txt", b"b")]
    response = alice_api.post("/api/v1/files", {"file": files}, format="multipart")
    assert response.status_code == 400
    assert response.json()["code"] == "too_many_files"


def test_over_the_limit_is_413_and_nothing_is_stored(alice_api, settings, media_root):
    settings.PANTHEON_MAX_UPLOAD_BYTES = 100

    at_limit = upload(alice_api, "ok.txt", b"x" * 100, "text/plain")
    assert at_limit.status_code == 201

    response = upload(alice_api, "big.txt", b"x" * 101, "text/plain")
    assert response.status_code == 413
    assert response.json()["code"] == "file_too_large"
    assert UploadedFile.objects.count() == 1
    assert [p.name for p in media_root.rglob("*") if p.is_file()] == [f"{at_limit.json()['id']}.txt"]


def test_declared_length_over_the_limit_is_413_before_reading(settings):
    settings.PANTHEON_MAX_UPLOAD_BYTES = 100
    big = RequestFactory().post("/api/v1/files", data=b"", content_type="multipart/form-data; boundary=x",
                                CONTENT_LENGTH=str(100 + services.MULTIPART_OVERHEAD_BYTES + 1))
    with pytest.raises(ApiError) as caught:
        services.check_declared_length(big.META)
    assert caught.value.status_code == 413
    services.check_declared_length({"CONTENT_LENGTH": "100"})  # fine
    services.check_declared_length({"CONTENT_LENGTH": "junk"})  # left to the parser


def test_upload_handler_stops_a_file_at_the_limit(settings):
    settings.PANTHEON_MAX_UPLOAD_BYTES = 10
    handler = services.UploadLimitHandler(None)
    assert handler.receive_data_chunk(b"x" * 6, 0) == b"x" * 6
    assert handler.receive_data_chunk(b"x" * 4, 6) == b"x" * 4
    with pytest.raises(ApiError) as caught:
        handler.receive_data_chunk(b"x", 10)
    assert caught.value.status_code == 413
    with pytest.raises(ApiError):
        handler.handle_raw_input(None, {}, 10 + services.MULTIPART_OVERHEAD_BYTES + 1, b"x")


def test_filename_is_a_base_name_and_the_stored_path_ignores_it(alice_api, media_root):
    response = upload(alice_api, "../../etc/passwd.txt", b"root", "text/plain")
    assert response.status_code == 201
    body = response.json()
    assert "/" not in body["filename"] and ".." not in body["filename"]
    row = UploadedFile.objects.get(pk=body["id"])
    assert Path(row.stored.path).name == f"{row.id}.txt"
    assert Path(row.stored.path).is_relative_to(media_root)


def test_clean_filename():
    assert services.clean_filename("a\x00b\nc.txt") == "abc.txt"
    assert services.clean_filename("C:\\Users\\x\\report.csv") == "report.csv"
    assert services.clean_filename("") == "upload"
    long = services.clean_filename("n" * 400 + ".json")
    assert len(long) == 255 and long.endswith(".json")


def test_list_is_paginated_newest_first_and_only_mine(alice, bob, alice_api, make_file):
    now = timezone.now()
    rows = []
    for i in range(3):
        row = make_file(alice, f"f{i}.txt", b"x", extract=False)
        UploadedFile.objects.filter(pk=row.pk).update(created_at=now + timedelta(seconds=i))
        rows.append(row)
    make_file(bob, "bobs.txt", b"secret", extract=False)

    response = alice_api.get("/api/v1/files")
    assert response.status_code == 200
    body = response.json()
    assert body["count"] == 3
    assert [item["filename"] for item in body["results"]] == ["f2.txt", "f1.txt", "f0.txt"]
    assert all(set(item) == FILE_FIELDS for item in body["results"])

    page = alice_api.get("/api/v1/files?page_size=2&page=2").json()
    assert [item["filename"] for item in page["results"]] == ["f0.txt"]


def test_detail_shows_status_after_extraction(alice, alice_api, make_file):
    ready = make_file(alice, "ok.json", b'{"a": 1}')
    failed = make_file(alice, "bad.json", b"{nope")

    body = alice_api.get(f"/api/v1/files/{ready.id}").json()
    assert (body["status"], body["error"], body["truncated"]) == ("ready", "", False)
    body = alice_api.get(f"/api/v1/files/{failed.id}").json()
    assert body["status"] == "failed"
    assert body["error"].startswith("invalid JSON") and body["truncated"] is False
    assert body["id"] == str(failed.id)


def test_delete_removes_row_and_stored_bytes(alice, alice_api, make_file, django_capture_on_commit_callbacks):
    row = make_file(alice, "gone.txt", b"bye")
    path = Path(row.stored.path)
    assert path.exists()

    with django_capture_on_commit_callbacks(execute=True):
        response = alice_api.delete(f"/api/v1/files/{row.id}")

    assert response.status_code == 204
    assert not UploadedFile.objects.filter(pk=row.pk).exists()
    assert not path.exists()
    assert alice_api.get(f"/api/v1/files/{row.id}").status_code == 404


def test_deleting_a_user_removes_their_stored_bytes(make_user, make_file, django_capture_on_commit_callbacks):
    carol = make_user("carol")  # no wallet: wallets protect their user from deletion
    path = Path(make_file(carol, "a.txt", b"a").stored.path)
    with django_capture_on_commit_callbacks(execute=True):
        carol.delete()
    assert not path.exists()


def test_another_users_file_is_404_everywhere(alice, bob_api, make_file, django_capture_on_commit_callbacks):
    row = make_file(alice, "private.txt", b"alice only")

    for response in (bob_api.get(f"/api/v1/files/{row.id}"), bob_api.delete(f"/api/v1/files/{row.id}")):
        assert response.status_code == 404
        assert response.json()["code"] == "not_found"
    assert bob_api.get("/api/v1/files").json()["count"] == 0
    assert UploadedFile.objects.filter(pk=row.pk).exists()
    assert Path(row.stored.path).exists()
    assert bob_api.get(f"/api/v1/files/{uuid.uuid4()}").status_code == 404


def test_authentication_required(db):
    client = APIClient()
    assert client.get("/api/v1/files").status_code == 401
    response = client.post("/api/v1/files", {"file": SimpleUploadedFile("a.txt", b"a")}, format="multipart")
    assert response.status_code == 401
    assert not UploadedFile.objects.exists()


def test_storage_failure_is_503_and_leaves_no_row(alice_api, monkeypatch):
    from django.core.files.storage import FileSystemStorage

    def disk_full(self, name, content):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(FileSystemStorage, "_save", disk_full)
    response = upload(alice_api, "a.txt", b"abc", "text/plain")
    assert response.status_code == 503
    assert response.json()["code"] == "storage_unavailable"
    assert not UploadedFile.objects.exists()
