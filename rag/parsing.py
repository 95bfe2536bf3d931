"""Text out of uploaded files: plain text and Markdown as is, HTML through the standard
library's html.parser (script/style dropped, block elements become line breaks), PDF through
pypdf. Anything else is UnsupportedFile; a file of a supported type that cannot be read is
InvalidFile. These map to a vector-store file's last_error codes."""
import io
import os
from html.parser import HTMLParser

TEXT_EXTENSIONS = {".txt", ".text", ".md", ".markdown", ".rst", ".csv", ".json", ".log"}
HTML_EXTENSIONS = {".html", ".htm", ".xhtml"}
PDF_EXTENSIONS = {".pdf"}
SUPPORTED = sorted(TEXT_EXTENSIONS | HTML_EXTENSIONS | PDF_EXTENSIONS)


class UnsupportedFile(Exception):
    code = "unsupported_file"


class InvalidFile(Exception):
    code = "invalid_file"


def extract_text(filename: str, data: bytes) -> str:
    ext = os.path.splitext(filename.lower())[1]
    if ext in TEXT_EXTENSIONS:
        return decode(data)
    if ext in HTML_EXTENSIONS:
        return html_text(decode(data))
    if ext in PDF_EXTENSIONS:
        return pdf_text(data)
    raise UnsupportedFile(f"{filename!r}: unsupported file type {ext or '(none)'!r}; "
                          f"supported: {', '.join(SUPPORTED)}")


def decode(data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidFile(f"the file is not valid UTF-8 text ({exc.reason} at byte {exc.start})") from None


class _HTMLText(HTMLParser):
    SKIP = {"script", "style", "noscript", "template", "head"}
    BLOCKS = {"p", "div", "br", "li", "ul", "ol", "tr", "table", "section", "article", "header", "footer",
              "h1", "h2", "h3", "h4", "h5", "h6", "pre", "blockquote", "title"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skipping = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skipping += 1
        elif tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in self.SKIP:
            self.skipping = max(0, self.skipping - 1)
        elif tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self.skipping:
            self.parts.append(data)


def html_text(html: str) -> str:
    parser = _HTMLText()
    parser.feed(html)
    parser.close()
    lines = (" ".join(line.split()) for line in "".join(parser.parts).splitlines())
    return "\n".join(line for line in lines if line)


def pdf_text(data: bytes) -> str:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError
    try:
        reader = PdfReader(io.BytesIO(data))
        return "\n\n".join(page.extract_text() or "" for page in reader.pages)
    except (PdfReadError, ValueError, KeyError, OSError) as exc:
        raise InvalidFile(f"the PDF cannot be read: {exc}") from None
