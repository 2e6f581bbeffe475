import re

import pytest

from quillgpt.data import read_text
from quillgpt.layout import mix_layouts, normalize_newlines, reflow

BLANK = re.compile(r"\n[ \t]*\n")


@pytest.fixture(scope="module")
def emma(shared_data) -> str:
    return read_text(shared_data / "gutenberg" / "austen-emma.txt")[:60_000]


def test_gutenberg_prose_becomes_one_paragraph_per_line(emma):
    flowed = reflow(emma)
    assert "".join(flowed.split()) == "".join(emma.split())  # the same characters, spaced differently
    assert len(BLANK.findall(flowed)) == len(BLANK.findall(emma))  # paragraphs stay apart
    paragraph = "Emma Woodhouse, handsome, clever, and rich, with a comfortable home"
    line = next(line for line in flowed.split("\n") if line.startswith(paragraph))
    assert len(line) > 200 and "happy disposition" in line  # the wrapped lines of the first paragraph, joined
    wrapped_lines = [len(x) for x in emma.split("\n")]
    flowed_lines = [len(x) for x in flowed.split("\n")]
    assert max(wrapped_lines) < 100 and max(flowed_lines) > 1000
    assert len(flowed.encode()) <= len(emma.encode())  # newlines became spaces; nothing added


def test_verse_keeps_its_lines(shared_data):
    milton = read_text(shared_data / "gutenberg" / "milton-paradise.txt")[:20_000]
    assert reflow(milton) == milton


def test_crlf_text_reflows_like_lf(shared_data):
    moby = (shared_data / "gutenberg" / "melville-moby_dick.txt").read_bytes()[:80_000].decode("utf-8")
    assert "\r\n" in moby
    assert reflow(moby) == reflow(normalize_newlines(moby)) and "\r" not in reflow(moby)


def test_hyphen_at_a_line_end_joins_without_a_space():
    text = (
        "A long line of hard-wrapped prose that runs to the margin, well-\n"
        "known words and more words to the very margin--\nthe rest"
    )
    assert reflow(text) == (
        "A long line of hard-wrapped prose that runs to the margin, well-known words and more words to the very "
        "margin--the rest"
    )


def test_mixed_layouts_are_seeded_runs_of_either(emma):
    assert mix_layouts(emma, 0.0, seed=1) == emma
    assert mix_layouts(emma, 1.0, seed=1) == reflow(emma)
    half = mix_layouts(emma, 0.5, seed=1)
    assert half == mix_layouts(emma, 0.5, seed=1) and half != mix_layouts(emma, 0.5, seed=2)
    paragraphs = BLANK.split(emma)
    flowed = [p != q for p, q in zip(paragraphs, BLANK.split(half))]
    wrapped = [p != q for p, q in zip(paragraphs, BLANK.split(reflow(emma)))]
    share = sum(flowed) / sum(wrapped)
    assert 0.2 < share < 0.8  # about half of the paragraphs that can be re-flowed are
