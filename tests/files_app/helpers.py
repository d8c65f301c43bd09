"""Helpers for the files tests."""

from django.core.files.uploadedfile import SimpleUploadedFile


def upload(api, name: str, content: bytes, content_type: str = "application/octet-stream"):
    return api.post("/api/v1/files", {"file": SimpleUploadedFile(name, content, content_type=content_type)},
                    format="multipart")


def minimal_pdf(text: str, *, to_unicode: bytes | None = None) -> bytes:
    """A one-page PDF showing `text` in Helvetica, with a correct cross-reference table;
    `to_unicode` is a CMap for the font (what the text extracts as)."""
    stream = f"BT /F1 24 Tf 72 700 Td ({text}) Tj ET".encode()
    font = b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica" + (b" /ToUnicode 6 0 R" if to_unicode else b"")
    return pdf_document([
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        pdf_stream(stream),
        font + b" >>",
        *([pdf_stream(to_unicode)] if to_unicode else []),
    ])


def pdf_stream(data: bytes) -> bytes:
    return b"<< /Length " + str(len(data)).encode() + b" >>\nstream\n" + data + b"\nendstream"


def pdf_document(objects: list[bytes]) -> bytes:
    """A PDF of these numbered objects (1 is the catalog), with a correct cross-reference table."""
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    for offset in offsets:
        out += f"{offset:010d} 00000 n \n".encode()
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)
