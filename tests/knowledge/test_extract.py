"""Sniffing, extraction and chunking: real formats in, typed refusals for everything else."""

from __future__ import annotations

import gzip
import io
import zipfile

import pytest
from pypdf import PdfWriter

from backend.knowledge.chunking import chunk, tokens
from backend.knowledge.extract import (
    HTML,
    MARKDOWN,
    PDF,
    TEXT,
    Section,
    UnreadableDocument,
    UnsupportedDocument,
    extract,
    sniff,
)


def text_pdf(*pages: str) -> bytes:
    """A small but real PDF: one Helvetica text line per page (offsets computed)."""
    objects = ["<< /Type /Catalog /Pages 2 0 R >>"]
    kids = " ".join(f"{3 + 2 * i} 0 R" for i in range(len(pages)))
    objects.append(f"<< /Type /Pages /Kids [{kids}] /Count {len(pages)} >>")
    font = 3 + 2 * len(pages)
    for i, page in enumerate(pages):
        stream = f"BT /F1 12 Tf 72 720 Td ({page}) Tj ET"
        objects.append(
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {4 + 2 * i} 0 R "
            f"/Resources << /Font << /F1 {font} 0 R >> >> >>"
        )
        objects.append(f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream")
    objects.append("<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    out, offsets = io.BytesIO(), []
    out.write(b"%PDF-1.4\n")
    for number, body in enumerate(objects, start=1):
        offsets.append(out.tell())
        out.write(f"{number} 0 obj\n{body}\nendobj\n".encode())
    xref = out.tell()
    out.write(f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode())
    for offset in offsets:
        out.write(f"{offset:010d} 00000 n \n".encode())
    out.write(
        f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    )
    return out.getvalue()


def test_real_types_are_sniffed_from_content_not_names() -> None:
    assert sniff(text_pdf("hello"), "notes.txt") == PDF
    assert sniff(b"<!DOCTYPE html><html><body><p>x</p></body></html>", "a.pdf") == HTML
    assert sniff(b"# Title\n\nSome text.\n", "a.txt") == MARKDOWN
    assert sniff(b"Just a plain sentence.\n", "a.md.exe") == TEXT


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"", "empty"),
        (b"   \n\t ", "empty"),
        (b"\x89PNG\r\n\x1a\n" + bytes(100), "image/png.*OCR"),  # no OCR here: refused
        (b"\xff\xd8\xff\xe0" + bytes(100), "image/jpeg"),
        (b"RIFF\x10\x00\x00\x00WEBPVP8 " + bytes(100), "image/webp"),
        (b"RIFF\x10\x00\x00\x00WAVEfmt " + bytes(100), "RIFF"),
        (gzip.compress(b"a" * 10_000_000), "gzip"),  # a bomb: 10 MB in ~10 kB
        (bytes(range(256)) * 40, "binary"),
        (b"\x7fELF\x02\x01\x01" + bytes(100), "executable"),
    ],
)
def test_what_is_not_a_text_document_is_refused(data: bytes, words: str) -> None:
    with pytest.raises((UnsupportedDocument, UnreadableDocument), match=words):
        sniff(data, "doc.txt")


def test_images_are_documents_when_ocr_is_on() -> None:
    png = b"\x89PNG\r\n\x1a\n" + bytes(100)
    assert sniff(png, "scan.txt", images=True) == "image/png"
    extracted = extract(png, "image/png", "scans/scan.png", max_pages=5, scans=True)
    assert extracted.sections == []
    assert extracted.scans == [(None, png)]


def test_zip_archives_and_office_files_are_refused_unopened() -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("big.txt", "0" * 50_000_000)  # a zip bomb: never inflated
    with pytest.raises(UnsupportedDocument, match="zip") as refused:
        sniff(buffer.getvalue(), "notes.md")
    assert refused.value.code == "UNSUPPORTED_MEDIA_TYPE"


def test_pdf_pages_become_sections() -> None:
    extracted = extract(
        text_pdf("First page text.", "Second page text."), PDF, "a.pdf", max_pages=10
    )
    assert [(s.page, s.text.strip()) for s in extracted.sections] == [
        (1, "First page text."),
        (2, "Second page text."),
    ]


def test_encrypted_corrupt_and_oversized_pdfs_are_unreadable() -> None:
    writer = PdfWriter()
    writer.add_blank_page(612, 792)
    writer.encrypt("secret", algorithm="RC4-128")
    encrypted = io.BytesIO()
    writer.write(encrypted)
    with pytest.raises(UnreadableDocument, match="encrypted"):
        extract(encrypted.getvalue(), PDF, "a.pdf", max_pages=10)
    whole = text_pdf("some text")
    with pytest.raises(UnreadableDocument, match=r"corrupt|cannot be read|no text"):
        extract(whole[: len(whole) // 3], PDF, "a.pdf", max_pages=10)
    with pytest.raises(UnreadableDocument, match="more than 1 pages"):
        extract(text_pdf("a", "b"), PDF, "a.pdf", max_pages=1)


def test_markdown_and_html_keep_their_heading_paths() -> None:
    markdown = "# Guide\n\nIntro.\n\n## Install\n\nRun pip.\n\n```\n# not a heading\n```\n"
    sections = extract(markdown.encode(), MARKDOWN, "guide.md", max_pages=1).sections
    assert sections[0].heading == "Guide"
    assert sections[-1].heading == "Guide > Install"
    assert "# not a heading" in sections[-1].text
    page = (
        "<html><head><title>Doc</title><style>p{}</style></head><body><h1>Top</h1><p>One."
        "</p><h2>Sub</h2><p>Two &amp; three.</p><script>alert(1)</script></body></html>"
    )
    extracted = extract(page.encode(), HTML, "x.html", max_pages=1)
    assert extracted.title == "Doc"
    assert [(s.heading, s.text) for s in extracted.sections] == [
        ("Top", "Top\n\nOne."),
        ("Top > Sub", "Sub\n\nTwo & three."),
    ]


def test_chunks_are_token_bounded_overlap_and_map_back_to_the_text() -> None:
    paragraphs = [f"Paragraph {i} " + "word " * 60 for i in range(10)]
    text = "\n\n".join(paragraphs)
    pieces = chunk([Section(text, "H")], max_tokens=100, overlap_tokens=30)
    assert len(pieces) > 5
    for piece in pieces:
        assert tokens(piece.text) <= 100 + 2  # the heading line adds its own tokens
        assert piece.text.endswith(text[piece.char_start : piece.char_end].strip())
    assert pieces[1].char_start < pieces[0].char_end  # neighbours overlap


def test_an_enormous_single_line_is_cut_into_bounded_chunks() -> None:
    line = "x" * 200_000  # one "word" on one line
    pieces = chunk([Section(line)], max_tokens=50, overlap_tokens=0)
    assert len(pieces) > 100
    assert all(tokens(p.text) <= 50 for p in pieces)
    assert "".join(p.text for p in pieces) == line
