"""A PDF is client input too: whatever text pypdf makes of it must be storable (SPEC 10)."""

import pytest

from core.text import find_unstorable
from files_app.extraction import extract_text
from files_app.models import UploadedFile
from files_app.tasks import extract_file_text
from tests.files_app.helpers import minimal_pdf

pytestmark = pytest.mark.django_db


def pdf_mapping_a_to(unicode_hex: str) -> bytes:
    """A one-page PDF showing "ABAB" whose ToUnicode map sends A to `unicode_hex` (UTF-16BE)."""
    cmap = ("/CIDInit /ProcSet findresource begin 12 dict begin begincmap /CMapName /T def /CMapType 2 def "
            "1 begincodespacerange <00> <FF> endcodespacerange "
            f"2 beginbfchar <41> <{unicode_hex}> <42> <0042> endbfchar endcmap "
            "CMapName currentdict /CMap defineresource pop end end").encode()
    return minimal_pdf("ABAB", to_unicode=cmap)


@pytest.mark.parametrize("unicode_hex", ["D800", "DFFF", "0000"])
def test_pdf_text_with_unstorable_code_points_is_cleaned(unicode_hex):
    pytest.importorskip("pypdf")
    text = extract_text(pdf_mapping_a_to(unicode_hex), "application/pdf").text
    assert find_unstorable(text) == -1, repr(text)
    assert "B" in text


def test_pdf_with_an_unpaired_surrogate_becomes_ready_not_stuck_pending(alice, make_file):
    pytest.importorskip("pypdf")
    row = make_file(alice, "hostile.pdf", pdf_mapping_a_to("D800"), extract=False)
    extract_file_text.call(str(row.id))
    row.refresh_from_db()
    assert row.status == UploadedFile.Status.READY, row.failure_reason
    assert row.text.replace("\n", "") == "\ufffdB\ufffdB" and row.text_length == len(row.text)
