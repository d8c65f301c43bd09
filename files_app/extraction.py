"""Which uploads are accepted, and how their text is extracted. Pure functions, no database.

A file is accepted by its extension (`.txt`, `.md`/`.markdown`, `.csv`, `.json`, and `.pdf`
when pypdf is installed; any other extension is refused); a name without an extension is
accepted when the declared content type is one of the matching types. The server, not the
client, then names the content type.
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
from pathlib import PurePosixPath

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


class ExtractionError(Exception):
    """The file's content is not what its type promises; the message is the failure reason."""


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


def extract_text(data: bytes, content_type: str) -> str:
    """The text of a stored file. Raises ExtractionError with a reason a user can act on."""
    if content_type == APPLICATION_PDF:
        return _pdf_text(data)
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
    return text


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


def _pdf_text(data: bytes) -> str:
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise ExtractionError("the PDF is encrypted with a password")
        pages = [(page.extract_text() or "").strip() for page in reader.pages]
    except ExtractionError:
        raise
    except (PyPdfError, ValueError, KeyError, TypeError, AttributeError, IndexError, OSError) as exc:
        # pypdf signals malformed input with a spread of exception types.
        logger.info("pdf extraction failed: %r", exc)
        # pypdf's messages may quote the file: the reason is stored, so it must be storable.
        raise ExtractionError(clean_text(f"not a readable PDF: {exc}")) from None
    # pypdf decodes ToUnicode maps with "surrogatepass", so a hostile PDF yields unpaired
    # surrogates, which PostgreSQL would refuse (the file then stayed pending forever).
    text = clean_text("\n\n".join(page for page in pages if page).replace("\x00", ""))
    if not text.strip():
        raise ExtractionError("no text could be extracted from the PDF (scanned or image-only?)")
    return text
