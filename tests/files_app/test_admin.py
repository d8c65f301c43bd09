from pathlib import Path

import pytest
from django.contrib.auth import get_user_model

from files_app.models import UploadedFile

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin_client_(client):
    admin = get_user_model().objects.create_superuser("root", "root@example.com", "pw")
    client.force_login(admin)
    return client


def test_admin_lists_filters_and_shows_a_file(admin_client_, alice, make_file):
    row = make_file(alice, "notes.md", b"# hello admin")
    make_file(alice, "bad.json", b"{")

    page = admin_client_.get("/admin/files_app/uploadedfile/?status__exact=failed")
    assert page.status_code == 200
    assert b"bad.json" in page.content and b"notes.md" not in page.content

    page = admin_client_.get(f"/admin/files_app/uploadedfile/{row.pk}/change/")
    assert page.status_code == 200
    assert b"# hello admin" in page.content  # the text preview
    assert b'name="status"' not in page.content  # status is read-only
    assert admin_client_.get("/admin/files_app/uploadedfile/add/").status_code == 403


def test_admin_bulk_delete_removes_stored_bytes(admin_client_, alice, make_file, django_capture_on_commit_callbacks):
    rows = [make_file(alice, f"f{i}.txt", b"x") for i in range(2)]
    paths = [Path(r.stored.path) for r in rows]
    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client_.post("/admin/files_app/uploadedfile/", {
            "action": "delete_selected", "_selected_action": [str(r.pk) for r in rows], "post": "yes"})
    assert response.status_code == 302
    assert not UploadedFile.objects.exists()
    assert not any(p.exists() for p in paths)
