"""Which uploads are accepted, and how their text is extracted. Pure functions, no database.

A file is accepted by its extension (`.txt`, `.md`/`.markdown`, `.csv`, `.json`, and `.pdf`
when pypdf is installed; any other extension is refused); a name without an extension is
accepted when the declared content type is one of the matching types. The server, not the
client, then names the content type.

Extraction is bounded (docs/files.md): at most `max_chars` characters of text are kept (the
rest is cut, with a note at the end, and the result says `truncated`); a PDF is read in a
child process (`pdf_child.py`) that is killed at the time limit, may allocate at most
`memory_bytes`, and is refused when it has more than `max_pages` pages.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from django.conf import settings

from core.text import clean_text

logger = logging.getLogger(__name__)

TEXT_PLAIN = "text/plain"
TEXT_MARKDOWN = "text/markdown"
TEXT_CSV = "text/csv"
APPLICATION_JSON = "application/json"
APPLICATION_PDF = "application/pdf"

_BY_EXTENSION = {
    ".txt": TEXT_PLAIN,
    ".text": TEXT_PLAIN,
    ".md": TEXT_MARKDOWN,
    ".markdown": TEXT_MARKDOWN,
    ".csv": TEXT_CSV,
    ".json": APPLICATION_JSON,
    ".pdf": APPLICATION_PDF,
}
_BY_DECLARED_TYPE = {
    "text/plain": TEXT_PLAIN,
    "text/markdown": TEXT_MARKDOWN,
    "text/x-markdown": TEXT_MARKDOWN,
    "text/csv": TEXT_CSV,
    "application/csv": TEXT_CSV,
    "application/json": APPLICATION_JSON,
    "application/pdf": APPLICATION_PDF,
}


_PDF_CHILD = Path(__file__).with_name("pdf_child.py")


class ExtractionError(Exception):
    """The file's content is not what its type promises, or it is over a limit; the message
    is the failure reason, written for the user."""


@dataclass(frozen=True)
class Limits:
    max_pages: int  # a PDF with more pages fails
    max_chars: int  # the text is cut here (then `truncated`)
    timeout: float  # seconds a PDF's child process may take before it is killed
    memory_bytes: int  # address space of that child (RLIMIT_AS); 0: no limit

    @classmethod
    def from_settings(cls) -> Limits:
        return cls(max_pages=settings.PANTHEON_PDF_MAX_PAGES, max_chars=settings.PANTHEON_EXTRACT_MAX_CHARS,
                   timeout=settings.PANTHEON_EXTRACT_TIMEOUT_SECONDS,
                   memory_bytes=settings.PANTHEON_EXTRACT_MAX_MEMORY_MB * 1024 * 1024)


@dataclass(frozen=True)
class Extracted:
    text: str
    truncated: bool = False  # text was left out at the character limit (a note at the end says so)


def truncation_note(max_chars: int, *, page: int | None = None, pages: int | None = None) -> str:
    where = f", in page {page} of {pages}" if page and pages else ""
    return (f"\n\n[Pantheon: the extracted text was cut at the limit of {max_chars} characters{where}; "
            "the rest of the file is not included.]")


def pdf_supported() -> bool:
    return importlib.util.find_spec("pypdf") is not None


def supported_extensions() -> list[str]:
    return sorted(ext for ext, kind in _BY_EXTENSION.items() if kind != APPLICATION_PDF or pdf_supported())


def detect_content_type(filename: str, declared: str | None) -> str | None:
    """The content type the server assigns to an upload, or None when it is not supported."""
    suffix = PurePosixPath(filename).suffix.lower()
    if suffix[1:].isalnum():  # an extension decides, and an unknown one is refused
        kind = _BY_EXTENSION.get(suffix)
    else:
        kind = _BY_DECLARED_TYPE.get((declared or "").split(";")[0].strip().lower())
    if kind == APPLICATION_PDF and not pdf_supported():
        return None
    return kind


def extract_text(data: bytes, content_type: str, limits: Limits | None = None) -> Extracted:
    """The text of a stored file. Raises ExtractionError with a reason a user can act on."""
    limits = limits or Limits.from_settings()
    if content_type == APPLICATION_PDF:
        return _pdf_text(data, limits)
    text = _decode_utf8(data)
    if content_type == APPLICATION_JSON:
        try:
            json.loads(text)
        except RecursionError:
            raise ExtractionError("invalid JSON: nested too deeply") from None
        except ValueError as exc:
            raise ExtractionError(f"invalid JSON: {exc}") from None
    elif content_type not in {TEXT_PLAIN, TEXT_MARKDOWN, TEXT_CSV}:
        raise ExtractionError(f"unsupported content type {content_type!r}")
    if len(text) > limits.max_chars:
        return Extracted(text[: limits.max_chars] + truncation_note(limits.max_chars), truncated=True)
    return Extracted(text)


def _decode_utf8(data: bytes) -> str:
    try:
        text = data.decode("utf-8-sig")  # a leading byte-order mark is not content
    except UnicodeDecodeError as exc:
        raise ExtractionError(
            f"not UTF-8 text (undecodable byte at offset {exc.start}): binary data or another encoding"
        ) from None
    if "\x00" in text:
        raise ExtractionError("contains NUL bytes: binary data, not text")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _pdf_text(data: bytes, limits: Limits) -> Extracted:
    result = _run_pdf_child(data, limits)
    if not result.get("ok"):
        code = result.get("code")
        if code == "encrypted":
            raise ExtractionError("the PDF is encrypted with a password")
        if code == "too_many_pages":
            raise ExtractionError(f"the PDF has {result.get('pages')} pages, more than the limit of "
                                  f"{limits.max_pages}; split it into smaller files")
        if code == "memory":
            raise _memory_error(limits)
        logger.info("pdf extraction failed: %s", result.get("detail"))
        # pypdf's messages may quote the file: the reason is stored, so it must be storable.
        raise ExtractionError(clean_text(f"not a readable PDF: {result.get('detail') or 'malformed'}"))
    # pypdf decodes ToUnicode maps with "surrogatepass", so a hostile PDF yields unpaired
    # surrogates, which PostgreSQL would refuse (the file then stayed pending forever).
    text = clean_text(str(result.get("text") or ""))
    if not text.strip():
        raise ExtractionError("no text could be extracted from the PDF (scanned or image-only?)")
    if result.get("truncated"):
        note = truncation_note(limits.max_chars, page=result.get("pages_read"), pages=result.get("pages"))
        return Extracted(text + note, truncated=True)
    return Extracted(text)


def _memory_error(limits: Limits) -> ExtractionError:
    allowed = f"more than {limits.memory_bytes // (1024 * 1024)} MB of memory (the limit)" if limits.memory_bytes \
        else "more memory than the server had"
    return ExtractionError(f"reading the PDF needed {allowed}; the PDF is too large or unusually built")


def _too_slow(limits: Limits) -> ExtractionError:
    return ExtractionError(f"reading the PDF took longer than {limits.timeout:g} seconds (the limit) and was "
                           "stopped; the PDF is too large or unusually built (try a smaller file or a text export)")


def _run_pdf_child(data: bytes, limits: Limits) -> dict:
    """pdf_child.py's answer for `data`. The child is killed (and reaped) at the deadline, or
    when this process is interrupted (subprocess.run kills it on any exception)."""
    child_limits = {"max_pages": limits.max_pages, "max_chars": limits.max_chars,
                    "memory_bytes": limits.memory_bytes, "parent": os.getpid(),
                    # Only a backstop: the deadline below comes first, unless this process died.
                    "cpu_seconds": math.ceil(limits.timeout) + 1}
    command = [sys.executable, "-I", str(_PDF_CHILD), json.dumps(child_limits)]
    try:
        done = subprocess.run(command, input=data, capture_output=True, timeout=limits.timeout, check=False)
    except subprocess.TimeoutExpired:
        raise _too_slow(limits) from None
    except OSError:
        logger.exception("could not start the PDF reader process")
        raise ExtractionError("the PDF reader could not be started; upload the file again later") from None
    stderr = done.stderr[-2000:].decode("utf-8", "replace")
    if done.returncode == -signal.SIGXCPU:
        raise _too_slow(limits)  # the CPU limit: the deadline was missed (this process was held up)
    if done.returncode == -signal.SIGKILL:
        raise _memory_error(limits)  # not us: the kernel's out-of-memory killer
    if done.returncode != 0:
        if "MemoryError" in stderr:
            raise _memory_error(limits)
        logger.warning("the PDF reader exited with %s: %s", done.returncode, stderr)
        raise ExtractionError("the PDF reader failed on this file (not a readable PDF?)")
    try:
        result = json.loads(done.stdout)
    except ValueError:
        logger.warning("the PDF reader answered no JSON: %r %s", done.stdout[:200], stderr)
        raise ExtractionError("the PDF reader failed on this file (not a readable PDF?)") from None
    if not isinstance(result, dict):
        raise ExtractionError("the PDF reader failed on this file (not a readable PDF?)")
    return result
