"""Text from outside (model names, audit reasons, actors, study names) shown in a terminal or Markdown.

To a terminal it goes with rich's markup escaped and control characters (ANSI escapes, newlines) shown
as `\\xNN`, so it can neither break a table nor drive the terminal; into Markdown with HTML and link
syntax escaped, so a rendered report shows the text and runs nothing.
"""

from __future__ import annotations

import re

from rich.markup import escape

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# A backslash (which would escape the cell's closing pipe), a pipe, link brackets, and a "<" that opens a tag,
# a comment or an autolink; "<0.0001" stays as it is.
_MARKDOWN_SPECIAL = re.compile(r"[\\|\[\]]|<(?=[A-Za-z/!?])")


def terminal_text(text: str) -> str:
    """`text` for a rich console: shown as is, never read as markup or as a terminal control sequence."""
    return escape(_CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text))


def markdown_text(text: str) -> str:
    """`text` for a Markdown table cell or list item: rendered as is, never as HTML, a link or a new row."""
    text = _MARKDOWN_SPECIAL.sub(lambda m: "&lt;" if m.group() == "<" else "\\" + m.group(), text)
    return _CONTROL.sub(" ", text)
