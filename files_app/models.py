import uuid
from pathlib import PurePosixPath

from django.conf import settings
from django.db import models
from django.utils import timezone


def upload_path(instance: "UploadedFile", filename: str) -> str:
    """Stored bytes live under MEDIA_ROOT/uploads/<user id>/<file id><ext>.

    The client's filename is kept in the row only: it never becomes part of a path.
    """
    suffix = PurePosixPath(filename).suffix.lower()
    if not suffix[1:].isalnum() or len(suffix) > 10:
        suffix = ""
    return f"uploads/{instance.user_id}/{instance.id}{suffix}"


class UploadedFile(models.Model):
    """A user's upload. Text is extracted once, by the `extract_file_text` task, and kept in
    `text` for the `file_read` tool; the stored bytes are only read by that task."""

    class Status(models.TextChoices):
        PENDING = "pending"
        READY = "ready"
        FAILED = "failed"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="uploaded_files",
                             db_index=False)  # file_user_created_idx is its index
    filename = models.CharField(max_length=255, help_text="As sent by the client (base name only).")
    size = models.PositiveBigIntegerField(help_text="Bytes.")
    content_type = models.CharField(max_length=100, help_text="Decided by the server from the file's type.")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    failure_reason = models.TextField(blank=True, help_text="Why extraction failed (the API's `error`).")
    stored = models.FileField(upload_to=upload_path, max_length=300)
    text = models.TextField(blank=True, help_text="Extracted text, what file_read pages through.")
    text_length = models.PositiveBigIntegerField(default=0, help_text="Characters in the extracted text.")
    truncated = models.BooleanField(default=False, help_text="The text was cut at PANTHEON_EXTRACT_MAX_CHARS "
                                                             "(a note at its end says so).")
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        verbose_name = "uploaded file"
        indexes = [models.Index(fields=["user", "-created_at"], name="file_user_created_idx")]

    def __str__(self) -> str:
        return self.filename
