"""Uploaded files: accepting an upload, extracting its text (run by the `extract_file_text`
task), deleting, and the `file_read` tool the turn code offers the model.

Everything here is synchronous; async callers use `core.db.db_call` (the turn's `file_read`
executor is `files_app.tools.make_file_read_executor`).
"""

from __future__ import annotations

import logging
import unicodedata
import uuid
from datetime import timedelta
from functools import partial
from pathlib import PurePosixPath
from typing import Any

from django.conf import settings
from django.core.files.uploadedfile import UploadedFile as DjangoUpload
from django.core.files.uploadhandler import FileUploadHandler
from django.db import transaction
from django.db.models.functions import Substr
from django.http import HttpRequest
from django.utils import timezone

from core.api import ApiError
from files_app.extraction import (
    Extracted,
    ExtractionError,
    detect_content_type,
    extract_text,
    supported_extensions,
)
from files_app.models import UploadedFile

logger = logging.getLogger(__name__)

# Room for the multipart framing (boundaries, part headers) around the file's own bytes.
MULTIPART_OVERHEAD_BYTES = 64 * 1024

FILE_READ_DEFAULT_LIMIT = 8000
FILE_READ_MAX_LIMIT = 20000
READY_FILES_LIMIT = 50


# --- Upload -----------------------------------------------------------------------------

def file_too_large() -> ApiError:
    limit = settings.PANTHEON_MAX_UPLOAD_BYTES
    return ApiError(413, "file_too_large", f"The file is larger than the upload limit of {limit} bytes.")


class UploadLimitHandler(FileUploadHandler):
    """First of the request's upload handlers: stops parsing as soon as the body or a file
    passes the limit, so an oversized upload is neither kept in memory nor written out whole.
    Django's own handlers after it keep small files in memory and spool large ones to disk."""

    def handle_raw_input(self, input_data, META, content_length, boundary, encoding=None):
        if content_length and content_length > settings.PANTHEON_MAX_UPLOAD_BYTES + MULTIPART_OVERHEAD_BYTES:
            raise file_too_large()

    def receive_data_chunk(self, raw_data: bytes, start: int) -> bytes:
        if start + len(raw_data) > settings.PANTHEON_MAX_UPLOAD_BYTES:
            raise file_too_large()
        return raw_data

    def file_complete(self, file_size: int) -> None:
        return None  # the next handler builds the file object


def install_upload_limit(request: HttpRequest) -> None:
    """Put UploadLimitHandler first. Call before anything parses the body (authentication
    may, for the CSRF check of a browser session)."""
    request.upload_handlers.insert(0, UploadLimitHandler(request))


def check_declared_length(meta: dict) -> None:
    """413 before reading a byte when the declared body length is already over the limit
    (this also covers bodies that are not multipart, which the handler never sees)."""
    try:
        declared = int(meta.get("CONTENT_LENGTH") or 0)
    except ValueError:
        declared = 0
    if declared > settings.PANTHEON_MAX_UPLOAD_BYTES + MULTIPART_OVERHEAD_BYTES:
        raise file_too_large()


def clean_filename(name: str | None) -> str:
    """The base name without control characters, at most 255 characters (extension kept)."""
    base = PurePosixPath((name or "").replace("\\", "/")).name
    base = "".join(ch for ch in base if unicodedata.category(ch)[0] != "C").strip() or "upload"
    if len(base) > 255:
        suffix = PurePosixPath(base).suffix[:20]
        base = base[: 255 - len(suffix)] + suffix
    return base


def create_upload(*, user, files) -> UploadedFile:
    """Store the multipart field `file` of `files` (request.FILES) for `user` and queue its
    extraction for after the commit. Raises ApiError (400 / 413 / 503)."""
    uploads = files.getlist("file")
    if not uploads:
        raise ApiError(400, "file_required", "Send the file as the multipart form field 'file'.")
    if len(uploads) > 1:
        raise ApiError(400, "too_many_files", "Send one file per request.")
    upload: DjangoUpload = uploads[0]
    if upload.size > settings.PANTHEON_MAX_UPLOAD_BYTES:
        raise file_too_large()
    if upload.size == 0:
        raise ApiError(400, "empty_file", "The file is empty.")
    filename = clean_filename(upload.name)
    content_type = detect_content_type(filename, upload.content_type)
    if content_type is None:
        raise ApiError(400, "unsupported_file_type",
                       f"Unsupported file type; accepted: {', '.join(supported_extensions())}.")

    row = UploadedFile(id=uuid.uuid4(), user=user, filename=filename, size=upload.size,
                       content_type=content_type, status=UploadedFile.Status.PENDING)
    try:
        row.stored.save(filename, upload, save=False)  # the bytes first: a row never points at nothing
    except OSError:
        logger.exception("could not store an upload of user %s", user.pk)
        raise ApiError(503, "storage_unavailable", "The file could not be stored; try again later.") from None
    try:
        with transaction.atomic():
            row.save(force_insert=True)
            transaction.on_commit(partial(enqueue_extraction, row.id), robust=True)
    except BaseException:
        row.stored.storage.delete(row.stored.name)
        raise
    return row


def enqueue_extraction(file_id: uuid.UUID | str) -> None:
    from files_app.tasks import extract_file_text

    extract_file_text.enqueue(str(file_id))


def delete_file(row: UploadedFile) -> None:
    """Delete the row; the stored bytes go once the deletion is committed (files_app.signals)."""
    with transaction.atomic():
        row.delete()


def requeue_stale_pending(*, older_than: timedelta) -> int:
    """Queue extraction again for files pending longer than `older_than` (a lost task, a
    worker killed mid-run). Safe: extraction of a file that is no longer pending does nothing.
    A file whose extraction is still waiting in the queue (a backlog, not a loss) is left out."""
    cutoff = timezone.now() - older_than
    waiting = _files_waiting_for_extraction()
    ids = [file_id for file_id in UploadedFile.objects.filter(status=UploadedFile.Status.PENDING,
                                                               updated_at__lt=cutoff).values_list("id", flat=True)
           if str(file_id) not in waiting]
    for file_id in ids:
        UploadedFile.objects.filter(pk=file_id, status=UploadedFile.Status.PENDING).update(updated_at=timezone.now())
        enqueue_extraction(file_id)
    return len(ids)


def _files_waiting_for_extraction() -> set[str]:
    """Ids of the files whose extraction task is queued and not yet started."""
    from django_tasks_db.models import DBTaskResult

    from files_app.tasks import extract_file_text

    queued = DBTaskResult.objects.filter(task_path=extract_file_text.module_path, status="READY")
    return {str((args_kwargs.get("args") or [None])[0]) for args_kwargs in queued.values_list("args_kwargs", flat=True)}


# --- Extraction (the task body) -------------------------------------------------------

def run_extraction(file_id: uuid.UUID | str) -> str:
    """Extract the text of a pending file and mark it `ready` or `failed`. Returns the
    outcome. Idempotent: a file that is gone or no longer pending is left as it is, and
    the final update only applies while the row is still pending (so two concurrent runs
    write once)."""
    try:
        pk = uuid.UUID(str(file_id))
    except ValueError:
        return "invalid_id"
    row = (UploadedFile.objects.filter(pk=pk).only("id", "status", "stored", "content_type").first())
    if row is None:
        return "missing"
    if row.status != UploadedFile.Status.PENDING:
        return f"already_{row.status}"

    extracted, reason = Extracted(""), ""
    try:
        with row.stored.open("rb") as fh:
            data = fh.read()
        extracted = extract_text(data, row.content_type)
    except ExtractionError as exc:
        reason = str(exc)
    except OSError as exc:
        logger.warning("stored bytes of file %s unreadable: %r", pk, exc)
        reason = "the stored file could not be read"
    except Exception:
        logger.exception("text extraction of file %s failed", pk)
        reason = "text extraction failed unexpectedly"

    fields: dict[str, Any] = {"updated_at": timezone.now()}
    if reason:
        fields.update(status=UploadedFile.Status.FAILED, failure_reason=reason[:1000], text="", text_length=0,
                      truncated=False)
    else:
        fields.update(status=UploadedFile.Status.READY, failure_reason="", text=extracted.text,
                      text_length=len(extracted.text), truncated=extracted.truncated)
    written = UploadedFile.objects.filter(pk=pk, status=UploadedFile.Status.PENDING).update(**fields)
    if not written:
        return "skipped"
    return fields["status"]


# --- The file_read tool -----------------------------------------------------------------

FILE_READ_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "file_read",
        "description": (
            "Read the extracted text of one of the user's uploaded files. Returns a header line "
            "with the file name, the character offset, how many characters were returned and the "
            "file's total length, then the text. Read long files in pieces by passing the next offset. "
            f"limit defaults to {FILE_READ_DEFAULT_LIMIT} and is capped at {FILE_READ_MAX_LIMIT} characters."
        ),
        "parameters": {
            "type": "object",
            "properties": {
                "file_id": {"type": "string", "description": "The id of one of the user's ready files."},
                "offset": {"type": "integer", "minimum": 0, "default": 0,
                           "description": "Character offset to start reading at."},
                "limit": {"type": "integer", "minimum": 1, "maximum": FILE_READ_MAX_LIMIT,
                          "default": FILE_READ_DEFAULT_LIMIT, "description": "Most characters to return."},
            },
            "required": ["file_id"],
            "additionalProperties": False,
        },
    },
}


def ready_files_for(user_id: int, *, limit: int = READY_FILES_LIMIT) -> list[dict[str, Any]]:
    """The user's ready files, newest first: `[{"id", "filename", "size"}]` (id as a string)."""
    rows = (UploadedFile.objects.filter(user_id=user_id, status=UploadedFile.Status.READY)
            .order_by("-created_at", "-id").values("id", "filename", "size")[:limit])
    return [{"id": str(row["id"]), "filename": row["filename"], "size": row["size"]} for row in rows]


def _int_argument(value: Any, name: str, *, default: int, minimum: int) -> int | str:
    """An integer tool argument (models sometimes send "100" or 100.0), or an error text."""
    if value is None:
        return default
    if isinstance(value, bool):
        return f"error: {name} must be an integer"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    elif isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if not isinstance(value, int):
        return f"error: {name} must be an integer"
    if value < minimum:
        return f"error: {name} must be >= {minimum}"
    return value


def read_file_for_tool(*, user_id: int, arguments: dict[str, Any]) -> str:
    """Run `file_read` for the turn's user. Always returns text for the model, never raises,
    and only ever reads a ready file of `user_id`."""
    try:
        return _read_file_for_tool(user_id=user_id, arguments=arguments)
    except Exception:
        logger.exception("file_read failed")
        return "error: the file could not be read"


def _read_file_for_tool(*, user_id: int, arguments: dict[str, Any]) -> str:
    if not isinstance(arguments, dict):
        return "error: arguments must be an object with file_id, and optionally offset and limit"
    raw_id = arguments.get("file_id")
    if raw_id is None or raw_id == "":
        return "error: file_id is required"
    try:
        file_id = uuid.UUID(str(raw_id))
    except ValueError:
        return "error: file not found (file_id must be the id of one of the user's ready files)"
    offset = _int_argument(arguments.get("offset"), "offset", default=0, minimum=0)
    if isinstance(offset, str):
        return offset
    limit = _int_argument(arguments.get("limit"), "limit", default=FILE_READ_DEFAULT_LIMIT, minimum=1)
    if isinstance(limit, str):
        return limit
    limit = min(limit, FILE_READ_MAX_LIMIT)

    mine = UploadedFile.objects.filter(pk=file_id, user_id=user_id, status=UploadedFile.Status.READY)
    meta = mine.values("filename", "text_length").first()
    if meta is None:
        return "error: file not found"
    total = meta["text_length"]
    if offset > total:
        return f"error: offset {offset} is past the end of the file ({total} characters)"
    # Only the requested slice leaves the database (SQL substr counts characters, from 1).
    chunk = mine.annotate(chunk=Substr("text", offset + 1, limit)).values_list("chunk", flat=True).first()
    if chunk is None:
        return "error: file not found"
    end = offset + len(chunk)
    more = f"; more: call file_read with offset={end}" if end < total else "; end of file"
    header = (f'[file_read: "{meta["filename"]}" (id {file_id}), offset {offset}, '
              f"returned {len(chunk)} of {total} characters{more}]")
    return f"{header}\n{chunk}"
