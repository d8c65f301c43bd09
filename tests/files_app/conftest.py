import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.utils.datastructures import MultiValueDict

from files_app import services
from files_app.models import UploadedFile


@pytest.fixture(autouse=True)
def media_root(settings, tmp_path):
    """Every test here stores uploads under its own temporary MEDIA_ROOT."""
    root = tmp_path / "media"
    root.mkdir()
    settings.MEDIA_ROOT = root
    return root


@pytest.fixture
def make_file(db):
    """Store a file for a user as the API would; `extract=True` also runs the extraction."""

    def make(user, name: str, content: bytes, *, content_type: str = "", extract: bool = True) -> UploadedFile:
        files = MultiValueDict({"file": [SimpleUploadedFile(name, content, content_type=content_type)]})
        row = services.create_upload(user=user, files=files)
        if extract:
            services.run_extraction(row.id)
            row.refresh_from_db()
        return row

    return make
