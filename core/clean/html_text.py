"""HTML and XML to plain text with the standard library's `html.parser`, keeping paragraph structure.

- the content of `script`, `style`, `head` (title included), `noscript`, `template`, `svg`, `object` and
  similar elements is dropped, and so are comments, doctypes and processing instructions;
- character references and entities (`&amp;`, `&ndash;`, `&#8217;`) are decoded;
- block elements (`p`, `div`, headings, list items, table rows, `section`, ...) end a paragraph, shown as
  a blank line; `br` is a line break; table cells are separated by a space; for XML text encodings such as
  TEI, verse groups and speeches (`lg`, `sp`) are paragraphs and verse lines, speakers and stage
  directions (`l`, `speaker`, `stage`) lines;
- inside a block, whitespace runs collapse to one space as a browser would render them, except inside
  `pre`/`textarea`, where lines are kept.

The parser is forgiving (unclosed tags, stray `</p>`, XHTML namespaces) and never raises on bad markup.
`looks_like_html` decides, for `--html auto`, whether a document needs this at all.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

SKIP_CONTENT = frozenset({"script", "style", "head", "title", "noscript", "template", "svg", "math", "object",
                          "iframe", "canvas", "select", "button"})
BLOCKS = frozenset({
    "address", "article", "aside", "blockquote", "caption", "center", "dd", "details", "dialog", "div", "dl",
    "dt", "fieldset", "figcaption", "figure", "footer", "form", "h1", "h2", "h3", "h4", "h5", "h6", "header",
    "hr", "li", "main", "nav", "ol", "p", "pre", "section", "summary", "table", "tbody", "thead", "tfoot",
    "tr", "ul", "body", "html",
    # TEI and other XML text encodings: verse groups, speeches, paragraphs, list items
    "lg", "sp", "para", "item", "entry", "record", "div1", "div2", "div3",
})
# Elements that are one line each: a line break before and after (TEI verse lines, speakers, stage
# directions), so `<l>To be</l><l>or not</l>` keeps its two lines.
LINES = frozenset({"l", "line", "speaker", "stage"})
PREFORMATTED = frozenset({"pre", "textarea", "listing", "plaintext"})
VOID = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param",
                  "source", "track", "wbr"})
HTML_SUFFIXES = (".html", ".htm", ".xhtml", ".xml")

_START = re.compile(r"\s*(<\?xml|<!doctype\s+html|<html[\s>]|<!--)", re.IGNORECASE)
_SPACES = re.compile(r"\s+")
_PARAGRAPH = "\x00"  # sentinel for a paragraph break in the output buffer, resolved at the end
_LINE = "\x01"  # sentinel for a line break (br: two in a row make a blank line)
_SOFT = "\x02"  # sentinel for the edge of a line element (l, speaker): any number make one line break


def looks_like_html(text: str, source: str = "") -> bool:
    """True for `.html/.htm/.xhtml/.xml` sources and for text that opens like an HTML or XML document."""
    name = source.lower().removesuffix(".zst")
    return name.endswith(HTML_SUFFIXES) or bool(_START.match(text[:512]))


class _TextExtractor(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip_depth = 0  # > 0 while inside an element whose content is dropped
        self._skip_stack: list[str] = []
        self._pre_depth = 0

    def handle_starttag(self, tag, attrs):
        if tag in SKIP_CONTENT:
            if tag not in VOID:
                self._skip_stack.append(tag)
            return
        if self._skip_stack:
            return
        if tag == "br":
            self.parts.append(_LINE)
        elif tag in LINES:
            self.parts.append(_SOFT)
        elif tag in BLOCKS:
            self.parts.append(_PARAGRAPH)
        elif tag in ("td", "th"):
            self.parts.append(" ")
        if tag in PREFORMATTED:
            self._pre_depth += 1

    def handle_startendtag(self, tag, attrs):
        if tag in SKIP_CONTENT:
            return
        self.handle_starttag(tag, attrs)
        if tag in PREFORMATTED:
            self._pre_depth = max(0, self._pre_depth - 1)

    def handle_endtag(self, tag):
        if self._skip_stack:
            if tag in self._skip_stack:  # close up to the matching open element (tolerates bad nesting)
                while self._skip_stack and self._skip_stack.pop() != tag:
                    pass
            return
        if tag in BLOCKS:
            self.parts.append(_PARAGRAPH)
        elif tag in LINES:
            self.parts.append(_SOFT)
        if tag in PREFORMATTED:
            self._pre_depth = max(0, self._pre_depth - 1)

    def handle_data(self, data):
        if self._skip_stack or not data:
            return
        if self._pre_depth:
            self.parts.append(data.replace("\n", _LINE))
        else:
            self.parts.append(_SPACES.sub(" ", data))

    def text(self) -> str:
        joined = "".join(self.parts)
        out = []
        # Resolve sentinels: any run holding a paragraph sentinel becomes one blank line; line sentinels
        # become newlines; spaces around breaks go.
        for chunk in re.split(r"([ \x00-\x02]*[\x00-\x02][ \x00-\x02]*)", joined):
            if not chunk:
                continue
            if _PARAGRAPH in chunk:
                out.append("\n\n")
            elif _LINE in chunk or _SOFT in chunk:
                out.append("\n" * max(min(chunk.count(_LINE), 2), 1))
            else:
                out.append(chunk)
        return "".join(out).strip()


def html_to_text(markup: str) -> str:
    """The readable text of an HTML/XML document, paragraphs separated by blank lines."""
    parser = _TextExtractor()
    parser.feed(markup)
    parser.close()
    return parser.text()
