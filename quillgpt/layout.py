"""Text layouts: hard-wrapped lines (Project Gutenberg's ~70 columns) and one paragraph per line.

Novels come either way, with LF or CRLF line ends. `normalize_newlines` makes every line end LF;
`reflow` turns hard-wrapped paragraphs into one line each; `mix_layouts` re-flows runs of
paragraphs at random, so a model trained on the result knows both layouts.

A paragraph is the text between blank lines. It counts as hard-wrapped, and is re-flowed, when it
has several lines and every line but its last is at least `min_width` characters long: wrapped
prose fills its lines, while verse and lists (short lines) keep their line breaks. Lines are
joined by one space (none after a line ending in "-", which joins "well-" "known" and "word--"
"next" as the wrap had split them); blank lines between paragraphs are kept as they are, so the
text keeps its length in bytes up to the indentation and trailing spaces removed.
"""

from __future__ import annotations

import random
import re

MIN_WIDTH = 45
"""Shortest line that counts as wrapped prose (Gutenberg wraps at 60-75; verse lines are shorter)."""
_BLANK_LINES = re.compile(r"(\n(?:[ \t]*\n)+)")  # the separators between paragraphs, kept by split


def normalize_newlines(text: str) -> str:
    """CRLF and lone CR become LF."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def reflow_paragraph(paragraph: str, min_width: int = MIN_WIDTH) -> str:
    """One line for a hard-wrapped paragraph; any other paragraph unchanged."""
    lines = paragraph.split("\n")
    if len(lines) < 2 or any(len(line.rstrip()) < min_width for line in lines[:-1]):
        return paragraph
    out = lines[0].rstrip()
    for line in lines[1:]:
        out += ("" if out.endswith("-") else " ") + line.strip()
    return out


def reflow(text: str, min_width: int = MIN_WIDTH) -> str:
    """The text with every hard-wrapped paragraph on one line (line ends normalised first)."""
    parts = _BLANK_LINES.split(normalize_newlines(text))
    return "".join(part if i % 2 else reflow_paragraph(part, min_width) for i, part in enumerate(parts))


def mix_layouts(text: str, fraction: float, seed: int, mean_run: int = 8, min_width: int = MIN_WIDTH) -> str:
    """Re-flow about `fraction` of the paragraphs, in runs of consecutive paragraphs (`mean_run` on
    average) chosen at random with `seed`, so a context window mostly sees one layout at a time."""
    rng = random.Random(seed)
    parts = _BLANK_LINES.split(normalize_newlines(text))
    left, flow = 0, False
    for i in range(0, len(parts), 2):  # even items are paragraphs, odd ones the blank lines between
        if left == 0:
            left, flow = 1 + int(rng.expovariate(1 / mean_run)), rng.random() < fraction
        left -= 1
        if flow:
            parts[i] = reflow_paragraph(parts[i], min_width)
    return "".join(parts)
