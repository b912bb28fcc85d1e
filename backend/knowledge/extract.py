"""Bytes in, sections of text out: the real type is sniffed from the content (the file name and
the declared type are hints at most), and everything that is not a text document we can read is
refused with a typed error before any work is done."""

from __future__ import annotations

import html.parser
import io
import re
from dataclasses import dataclass, field

from backend.errors import AppError

PDF = "application/pdf"
HTML = "text/html"
MARKDOWN = "text/markdown"
TEXT = "text/plain"

# Formats recognised by their first bytes, refused with their name in the message.
_REFUSED_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"PK\x03\x04", "a zip archive (or an Office file)"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"BZh", "a bzip2 archive"),
    (b"\xfd7zXZ\x00", "an xz archive"),
    (b"7z\xbc\xaf\x27\x1c", "a 7z archive"),
    (b"Rar!", "a rar archive"),
    (b"GIF8", "a GIF image"),
    (b"RIFF", "a RIFF file (WAV, AVI)"),
    (b"\x7fELF", "an executable"),
    (b"MZ", "an executable"),
    (b"\xd0\xcf\x11\xe0", "an old Office file"),
)
# Images read by OCR (scans, photos of documents), when the server has it.
_IMAGE_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"II*\x00", "image/tiff"),
    (b"MM\x00*", "image/tiff"),
)
MAX_SCANS_PER_PAGE = 4  # images OCR-ed on one PDF page without a text layer
_MARKDOWN_HINT = re.compile(r"^(#{1,6} |\s*[-*] |\s*\d+\. |```)", re.MULTILINE)
_HTML_HINT = re.compile(rb"^\s*(<!doctype html|<html|<head|<body|<h[1-6][ >]|<p[ >])", re.I)


class UnsupportedDocument(AppError):
    code = "UNSUPPORTED_MEDIA_TYPE"
    status = 415


class UnreadableDocument(AppError):
    code = "UNREADABLE_DOCUMENT"  # corrupt, encrypted, or with no text in it
    status = 422


@dataclass(frozen=True)
class Section:
    """A run of text under one heading path (and on one page, for PDFs)."""

    text: str
    heading: str = ""  # "Install > From source"
    page: int | None = None


@dataclass
class Extracted:
    media_type: str
    title: str
    sections: list[Section] = field(default_factory=list)
    # Images to read by OCR: (page, image bytes); page None for an image document.
    scans: list[tuple[int | None, bytes]] = field(default_factory=list)


def sniff(data: bytes, filename: str = "", *, images: bool = False) -> str:
    """The media type the bytes really have, or UnsupportedDocument. Images are documents only
    when the server can read them (`images`: OCR is on)."""
    if not data.strip():
        raise UnreadableDocument("the document is empty")
    head = data[:16]
    if head.startswith(b"%PDF-"):
        return PDF
    webp = head.startswith(b"RIFF") and head[8:12] == b"WEBP"
    for magic, media_type in (*_IMAGE_MAGIC, (b"RIFF", "image/webp")):
        if head.startswith(magic) and (magic != b"RIFF" or webp):
            if images:
                return media_type
            raise UnsupportedDocument(
                f"this is an image ({media_type}); images are read by OCR, which this server "
                "does not run (SIGHTLINE_VISION_ENABLED)"
            )
    for magic, name in _REFUSED_MAGIC:
        if head.startswith(magic):
            raise UnsupportedDocument(f"this looks like {name}, not a text document")
    text = _decode(data[:65536], strict_tail=len(data) > 65536)
    if _HTML_HINT.match(data[:1024]):
        return HTML
    lowered = filename.lower()
    if lowered.endswith((".md", ".markdown")) or _MARKDOWN_HINT.search(text[:20000]):
        return MARKDOWN
    return TEXT


def _decode(data: bytes, *, strict_tail: bool = False) -> str:
    """UTF-8 (or Latin-1 when that fails), refusing binary: NULs or many control bytes."""
    if b"\x00" in data:
        raise UnsupportedDocument("the document is binary, not text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        if strict_tail and exc.start >= len(data) - 4:  # a character cut by the sample
            text = data[: exc.start].decode("utf-8")
        else:
            text = data.decode("latin-1")
    controls = sum(1 for c in text[:65536] if ord(c) < 32 and c not in "\n\r\t\f")
    if controls > max(8, len(text[:65536]) // 100):
        raise UnsupportedDocument("the document is binary, not text")
    return text


def extract(
    data: bytes, media_type: str, filename: str, *, max_pages: int, scans: bool = False
) -> Extracted:
    """Sections of the document (CPU work: call it off the event loop). With `scans`, images,
    and the images on PDF pages without a text layer, are returned to be read by OCR."""
    title = filename.rsplit("/", 1)[-1] or "Untitled"
    if media_type.startswith("image/"):
        return Extracted(media_type, title, scans=[(None, data)])
    if media_type == PDF:
        return _pdf(data, title, max_pages, scans)
    text = _decode(data).replace("\r\n", "\n")
    if media_type == HTML:
        return _html(text, title)
    if media_type == MARKDOWN:
        return _markdown(text, title)
    return Extracted(TEXT, title, [Section(text)])


def _markdown(text: str, title: str) -> Extracted:
    sections: list[Section] = []
    path: list[tuple[int, str]] = []
    lines: list[str] = []
    fenced = False

    def flush() -> None:
        if "".join(lines).strip():
            sections.append(Section("\n".join(lines), " > ".join(h for _, h in path)))
        lines.clear()

    for line in text.split("\n"):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        heading = None if fenced else re.match(r"^(#{1,6})\s+(.+?)\s*#*\s*$", line)
        if heading:
            flush()
            level = len(heading.group(1))
            path = [(lvl, h) for lvl, h in path if lvl < level] + [(level, heading.group(2))]
            if level == 1 and title.endswith((".md", ".markdown", ".txt")):
                title = heading.group(2)
        lines.append(line)
    flush()
    return Extracted(MARKDOWN, title, sections)


class _HTMLText(html.parser.HTMLParser):
    SKIP = frozenset({"script", "style", "noscript", "template", "svg", "head"})
    BLOCK = frozenset({"p", "div", "li", "tr", "br", "section", "article", "pre", "table", "ul"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.sections: list[Section] = []
        self.path: list[tuple[int, str]] = []
        self.parts: list[str] = []
        self.skipping = 0
        self.heading_level = 0
        self.heading: list[str] = []
        self.title = ""
        self.in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "title":
            self.in_title = True
        if tag in self.SKIP:
            self.skipping += 1
        elif re.fullmatch(r"h[1-6]", tag):
            self.flush()
            self.heading_level = int(tag[1])
            self.heading = []
        elif tag in self.BLOCK:
            self.parts.append("\n\n" if tag in {"p", "div", "section", "article"} else "\n")

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self.in_title = False
        if tag in self.SKIP:
            self.skipping = max(0, self.skipping - 1)
        elif re.fullmatch(r"h[1-6]", tag) and self.heading_level:
            text = " ".join("".join(self.heading).split())
            level = self.heading_level
            self.path = [(lvl, h) for lvl, h in self.path if lvl < level] + [(level, text)]
            self.parts.append(text + "\n\n")
            self.heading_level = 0

    def handle_data(self, data: str) -> None:
        if self.in_title:
            self.title += data
        if self.skipping:
            return
        if self.heading_level:
            self.heading.append(data)
        else:
            self.parts.append(data)

    def flush(self) -> None:
        text = re.sub(r"\n{3,}", "\n\n", "".join(self.parts)).strip()
        if text:
            self.sections.append(Section(text, " > ".join(h for _, h in self.path)))
        self.parts = []


def _html(text: str, title: str) -> Extracted:
    parser = _HTMLText()
    parser.feed(text)
    parser.close()
    parser.flush()
    return Extracted(HTML, " ".join(parser.title.split()) or title, parser.sections)


def _pdf(data: bytes, title: str, max_pages: int, scans: bool) -> Extracted:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            raise UnreadableDocument("the PDF is encrypted")
        if len(reader.pages) > max_pages:
            raise UnreadableDocument(f"the PDF has more than {max_pages} pages")
        meta_title = (reader.metadata or {}).get("/Title") if reader.metadata else None
        sections, images = [], []
        for number, page in enumerate(reader.pages, start=1):
            text = page.extract_text() or ""
            if text.strip():
                sections.append(Section(text, page=number))
            elif scans:  # a scanned page: its images, for OCR
                images += [(number, image) for image in _page_images(page)]
    except UnreadableDocument:
        raise
    except (PdfReadError, ValueError, KeyError, TypeError, AttributeError, OSError) as exc:
        raise UnreadableDocument(f"the PDF is corrupt: {type(exc).__name__}") from exc
    except Exception as exc:  # pypdf raises assorted errors on hostile files
        raise UnreadableDocument(f"the PDF cannot be read: {type(exc).__name__}") from exc
    if not sections and not images:
        raise UnreadableDocument(
            "the PDF has no text layer and no page images"
            if scans
            else "the PDF has no text layer (scanned pages need OCR, which is off on this server)"
        )
    return Extracted(PDF, str(meta_title or title), sections, images)


def _page_images(page: object) -> list[bytes]:
    """The images of a PDF page as image files (pypdf converts them); one it cannot convert
    (a JBIG2 scan, say) is skipped rather than failing the document."""
    found = []
    try:
        for image in page.images[:MAX_SCANS_PER_PAGE]:  # type: ignore[attr-defined]
            try:
                found.append(image.data)
            except Exception:  # noqa: S112 (pypdf raises assorted errors on odd filters)
                continue
    except Exception:
        return found
    return found
