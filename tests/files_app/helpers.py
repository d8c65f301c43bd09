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


def flate_stream(data: bytes) -> bytes:
    import zlib

    packed = zlib.compress(data, 9)
    return b"<< /Length " + str(len(packed)).encode() + b" /Filter /FlateDecode >>\nstream\n" + packed + b"\nendstream"


def pdf_of_streams(streams: list[bytes]) -> bytes:
    """A PDF with one page per (already framed) content stream object, all in Helvetica."""
    pages = len(streams)
    kids = " ".join(f"{3 + 2 * i} 0 R" for i in range(pages))
    font = 3 + 2 * pages
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", f"<< /Type /Pages /Kids [{kids}] /Count {pages} >>".encode()]
    for i, stream in enumerate(streams):
        objects.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {4 + 2 * i} 0 R "
                       f"/Resources << /Font << /F1 {font} 0 R >> >> >>".encode())
        objects.append(stream)
    objects.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    return pdf_document(objects)


def pages_pdf(texts: list[str]) -> bytes:
    """A PDF with one page per text (plain ASCII, no parentheses)."""
    return pdf_of_streams([flate_stream(f"BT /F1 12 Tf 72 700 Td ({text}) Tj ET".encode()) for text in texts])


def text_bomb_pdf(*, operators: int = 86_000, width: int = 100) -> bytes:
    """The issue's PDF: one page whose Flate content stream repeats a text-show operator. With
    the defaults the file is about 31 KB and its text 8.6 million characters, which pypdf
    takes 40 s or more to build (the cost grows faster than the number of operators)."""
    stream = b"BT /F1 12 Tf 72 700 Td " + (b"(" + b"A" * width + b") Tj ") * operators + b"ET"
    return pdf_of_streams([flate_stream(stream)])


def inflating_pdf(megabytes: int = 70) -> bytes:
    """One page whose content stream (a few characters of text, then blanks) inflates to
    `megabytes` MB from about 1/1000 of that: pypdf has to hold it all in memory."""
    return pdf_of_streams([flate_stream(b"BT /F1 12 Tf 72 700 Td (x) Tj ET" + b" " * (megabytes * 1_000_000))])
