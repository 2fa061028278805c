"""Boilerplate removal: Project Gutenberg headers and footers, and repeated navigation-like lines.

`strip_gutenberg` cuts a Project Gutenberg e-text down to the work itself. It knows the markers used since
the 1990s: the modern `*** START OF THE PROJECT GUTENBERG EBOOK ... ***` / `*** END OF ... ***` lines,
the older `*END*THE SMALL PRINT! ...*END*` licence block ending the header, `End of (the) Project
Gutenberg ...` footers, and the `<<THIS ELECTRONIC VERSION OF THE COMPLETE WORKS OF WILLIAM SHAKESPEARE
IS COPYRIGHT 1990-1993 BY WORLD LIBRARY ...>>` notice repeated between the scenes of the 1990s Shakespeare
e-texts. Text without markers is returned unchanged. (The Shakespeare files under `data/raw/texts` were
already stripped by their packager, so on that corpus this step finds nothing; it matters for raw
Gutenberg downloads.)

`NavigationLines` removes lines that repeat within a document *and* look like navigation or page furniture
rather than content. Repetition alone is not enough: a play repeats its speaker lines (`HAMLET.`,
`Exit.`) hundreds of times, and those must stay. A repeated line is removed when it is

- a web navigation phrase (`Home`, `Next`, `Back to top`, `Skip to content`, `Privacy policy`, ...), or a
  breadcrumb/menu of short items separated by `|`, `»`, `·`, `>` or `/`;
- a line holding a URL or a file name (`ED4A800.TIF`, `page12.html`: scan and page markers); or
- mostly not letters (less than half of its non-space characters are letters): page numbers and
  scan/file markers such as `p.772:0`, `- 12 -`, `[Page 34]` after digits are ignored (see below).

Lines are compared with every digit replaced by `0`, so `p.772:0` and `p.773:1`, or `Page 3 of 9` and
`Page 4 of 9`, count as repeats of one template.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

_GUTENBERG_START = re.compile(
    r"^[ \t]*(?:\*{3}[ \t]*START OF (?:THE|THIS) PROJECT GUTENBERG[^\n]*"
    r"|\*END\*THE SMALL PRINT![^\n]*"
    r"|\*{3}[ \t]*START OF THE PROJECT GUTENBERG[^\n]*)$",
    re.IGNORECASE | re.MULTILINE,
)
_GUTENBERG_END = re.compile(
    r"^[ \t]*(?:\*{3}[ \t]*END OF (?:THE|THIS) PROJECT GUTENBERG[^\n]*"
    r"|End of (?:the |this )?Project Gutenberg[^\n]*)$",
    re.IGNORECASE | re.MULTILINE,
)
_WORLD_LIBRARY_NOTICE = re.compile(r"<<THIS ELECTRONIC VERSION OF THE COMPLETE WORKS OF WILLIAM\s+SHAKESPEARE"
                                   r".*?>>[ \t]*\n?", re.DOTALL | re.IGNORECASE)


def strip_gutenberg(text: str) -> tuple[str, int]:
    """Remove Project Gutenberg header, footer and licence notices; returns (text, pieces removed)."""
    removed = 0
    # Plain substring tests (fast memchr scans) spare the line-anchored regexes on the usual text without
    # any marker.
    if not ("utenberg" in text or "UTENBERG" in text or "SMALL PRINT" in text or "<<" in text):
        return text.strip("\n"), 0
    start = None
    # The header ends at the *last* start marker near the top (old e-texts have several).
    for match in _GUTENBERG_START.finditer(text):
        if match.start() > len(text) // 2:
            break
        start = match
    if start is not None:
        text = text[start.end():]
        removed += 1
    end = _GUTENBERG_END.search(text, len(text) // 2) or _GUTENBERG_END.search(text)
    if end is not None:
        text = text[:end.start()]
        removed += 1
    text, notices = _WORLD_LIBRARY_NOTICE.subn("", text)
    if notices:
        text = re.sub(r"\n{3,}", "\n\n", text)  # the notice stood between two paragraphs
    return text.strip("\n"), removed + notices


NAVIGATION_PHRASES = frozenset({
    "home", "homepage", "next", "previous", "prev", "back", "top", "back to top", "go to top", "up",
    "skip to content", "skip to main content", "skip navigation", "menu", "main menu", "navigation", "search",
    "login", "log in", "sign in", "sign up", "register", "logout", "log out", "subscribe", "share", "tweet",
    "print", "email this", "contents", "table of contents", "index", "more", "read more", "click here",
    "privacy policy", "privacy", "terms of use", "terms of service", "terms and conditions", "cookie policy",
    "accept cookies", "all rights reserved", "contact", "contact us", "about", "about us", "sitemap",
    "site map", "help", "faq", "advertisement", "related articles", "comments", "reply", "permalink",
    "next page", "previous page", "next chapter", "previous chapter", "return to top", "jump to navigation",
})
_MENU_SEPARATORS = re.compile(r"\s+(?:\||»|«|·|•|>|/|::)\s+")
_URL = re.compile(r"(?:https?://|www\.)\S+", re.IGNORECASE)
_FILE_NAME = re.compile(r"\b[\w-]+\.(?:txt|tiff?|jpe?g|png|gif|pdf|html?|xml|djvu)\b", re.IGNORECASE)
_DIGITS = re.compile(r"\d")
_TRIM = " \t*#=-_~[](){}<>|:.,;!?\"'"


def _is_navigation_like(line: str) -> bool:
    bare = line.strip(_TRIM).lower()
    if bare in NAVIGATION_PHRASES or bare.startswith("©") or bare.startswith("copyright ©"):
        return True
    items = _MENU_SEPARATORS.split(line.strip())
    if len(items) >= 2 and all(len(item.split()) <= 3 for item in items):
        return True
    if _URL.search(line) or _FILE_NAME.search(line):
        return True
    visible = [c for c in line if not c.isspace()]
    letters = sum(c.isalpha() for c in visible)
    return bool(visible) and letters * 2 < len(visible)


@dataclass(frozen=True, slots=True, kw_only=True)
class NavigationLines:
    """Drop navigation-like lines that occur at least `min_repeats` times in a document (see module doc)."""

    min_repeats: int = 2  # a line seen once is content; menus and page furniture come back

    name = "navigation_lines"

    def __call__(self, text: str) -> tuple[str, int]:
        """Returns (text without those lines, number of lines removed)."""
        lines = text.split("\n")
        templates = [t.strip() for t in _DIGITS.sub("0", text).split("\n")]
        counts = Counter(t for t in templates if t)
        drop = {t for t, n in counts.items() if n >= self.min_repeats and _is_navigation_like(t)}
        if not drop:
            return text, 0
        kept = [line for line, t in zip(lines, templates, strict=True) if t not in drop]
        return "\n".join(kept), len(lines) - len(kept)
