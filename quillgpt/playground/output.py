"""A generation on the playground page: streamed into the view as its tokens arrive, then shown in
full with its status line, its rate as the user saw it, and a token inspector."""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import streamlit as st

from quillgpt.playground.backend import Backend, BackendError, BackgroundStream, Chunk, TokenView
from quillgpt.playground.view import CURSOR, LEGEND, LiveView, alternatives_html, prompt_html, render_tokens

log = logging.getLogger(__name__)

# How often the page sends new text while it streams in; tokens arriving in between go out
# together. Each update costs the browser styles and a layout (and, through Streamlit, a React render
# of the page), on the cores the model decodes on: four updates a second leave the model more of them
# than ten did, and still show the text growing (docs/results.md).
REDRAW_SECONDS = 0.25

# Beside a result's status line: its rate from the click to the frame showing it, kept per result.
RATE_JS = r"""<script>
(() => {
  const id = %s, n = %d, me = document.currentScript;
  const rates = (window.quillRates = window.quillRates || {});
  const show = () => {
    const box = me.closest('[data-testid="stElementContainer"]');
    const line = box && box.previousElementSibling && box.previousElementSibling.querySelector("p");
    if (line && rates[id]) line.textContent = line.textContent.replace(/[0-9]+ tokens\/s$/,
      Math.round(rates[id]) + " tokens/s");
  };
  if (rates[id]) return show();
  if (window.quillClickAt === undefined) return;
  const clicked = window.quillClickAt;
  requestAnimationFrame(() => setTimeout(() => {
    rates[id] = n / ((performance.now() - clicked) / 1000);
    show();
  }, 0));
})();
</script>"""


@dataclass
class Result:
    """One generation, kept in the session so it survives reruns (and a Stop)."""

    model: str
    prompt: str
    settings: str
    text: str = ""
    tokens: list[TokenView] = field(default_factory=list)
    status: str = "running"
    """running, done, stopped or error."""
    finish_reason: str | None = None
    error: str | None = None
    note: str | None = None
    started: float = field(default_factory=time.monotonic)
    """When the click reached the server (the result is created then, by the route or by Generate's
    callback)."""
    elapsed: float = 0.0
    key: str = field(default_factory=lambda: uuid.uuid4().hex)

    def add(self, chunk: Chunk) -> None:
        self.text += chunk.text
        self.tokens.extend(chunk.tokens)
        self.finish_reason = chunk.finish_reason or self.finish_reason
        self.note = chunk.note or self.note
        self.elapsed = time.monotonic() - self.started


def result_key(res: Result | None, side: str) -> str:
    """The key of the container a side's result is drawn in: the page's script hides results by it
    while a new one streams in (quillgpt/playground/live.js)."""
    return f"quill_result_{side}_{res.key if res is not None else 'none'}"


def model_label(name: str) -> str:
    p = Path(name)
    return f"{p.name} ({name})" if p.name != name else name


@dataclass
class Generation:
    """A click's generation, every side decoding in a thread of its own; what has arrived is taken
    into each side's result (`take`) by the page's route (live.py), or by `run_generation` when the
    click went through Streamlit. There it is started by Generate's callback, which Streamlit runs as
    soon as the click reaches the server, before the script draws the page again."""

    results: dict[str, Result]
    streams: dict[str, BackgroundStream]
    wake: threading.Event
    """Set when any stream has its first chunk, and when one ends."""

    @classmethod
    def start(cls, backend: Backend, params: dict, results: dict[str, Result]) -> Generation:
        """Start each side's stream; a side the backend refuses (its model, its prompt) gets its error."""
        wake = threading.Event()
        streams = {}
        for side, res in results.items():
            try:
                streams[side] = BackgroundStream(backend.stream(res.model, res.prompt, params[side]), wake)
            except BackendError as e:
                res.status, res.error = "error", str(e)
        return cls(results, streams, wake)

    def take(self, side: str) -> Result:
        """`side`'s result with what its stream has produced since the last call, marked done once the
        stream has ended, or failed with the stream's error (the other side goes on)."""
        res = self.results[side]
        try:
            for chunk in self.streams[side].take():
                res.add(chunk)
            if self.streams[side].done and res.status == "running":
                res.status = "done"
        except BackendError as e:
            res.status, res.error = "error", str(e)
        except Exception as e:  # one side failing must not take the other down
            log.exception("generation failed")
            res.status, res.error = "error", f"Generation failed: {type(e).__name__}: {e}"
        return res

    def rounds(self) -> Iterator[tuple[list[str], list[str]]]:
        """The generation as a page draws it, until every side has ended: after each wait for news (a
        first chunk, an end, or REDRAW_SECONDS), the sides that ended in that round (taken into their
        results), and the sides still running that are due a redraw (none between redraws)."""
        running = list(self.streams)
        drawn = 0.0  # the first tokens are drawn as soon as they arrive
        while running:
            self.wake.wait(timeout=REDRAW_SECONDS)
            self.wake.clear()
            ended = [side for side in running if self.take(side).status != "running"]
            running = [side for side in running if side not in ended]
            redraw = []
            if running and time.monotonic() - drawn >= REDRAW_SECONDS:
                redraw, drawn = running, time.monotonic()
            yield ended, redraw

    def close(self) -> None:
        """Stop every stream still decoding (after its current step)."""
        for stream in self.streams.values():
            stream.close()


def run_generation(gen: Generation, slots: dict, compare: bool = False) -> set[str]:
    """Draw every side of `gen` as its tokens arrive; the sides whose result was finished in place (the
    page must not draw those again).

    The page takes what has arrived at most every REDRAW_SECONDS and appends only those tokens to the
    view (`LiveView`), so neither the model nor the browser waits on the other. Each side streams into
    the result's own frame in its `slots` placeholder (`LiveResult`) and, once its text is done,
    finishes there: its last tokens and the rest of the result are appended, nothing is drawn twice.
    A side that fails is emptied, for the page to draw with its error."""
    results = gen.results
    frames = {side: LiveResult(slots[side], results[side], side, compare) for side in gen.streams}
    finished: set[str] = set()
    try:
        for ended, redraw in gen.rounds():
            for side in ended:
                if results[side].status == "done":
                    frames[side].finish()
                    finished.add(side)
                elif results[side].status == "error":
                    slots[side].empty()
            for side in redraw:
                frames[side].update()
    finally:  # Stop, or another widget, interrupts the script here: the threads stop too
        gen.close()
    return finished


class LiveResult:
    """A result drawn as it streams in: `show_result`'s frame, its probability view appended to piece by
    piece, then finished in place with the rest of what `show_result` draws."""

    def __init__(self, slot, res: Result, side: str, compare: bool):
        self.res, self.side, self.view = res, side, LiveView()
        self.box = slot.container(key=result_key(res, side))
        with self.box:
            result_heading(res, side, compare)
            self.probabilities, self.plain = st.tabs(["Probabilities", "Text"])
        self.live = self.probabilities.container(key=f"quill_live_{side}")
        self.live.html(prompt_html(res.prompt) + CURSOR)
        self.probabilities.html(LEGEND)

    def update(self) -> None:
        if new := self.view.update(self.res.text, self.res.tokens):
            self.live.html(new + CURSOR)

    def finish(self) -> None:
        """The last tokens and the status line first, sent back to back; then what the user does not
        wait for (the Text tab, the inspector's switch)."""
        # a last piece, without the cursor, even if empty (st.html refuses an empty body): the CSS hides
        # the cursor of every piece but the last
        self.live.html(self.view.finish(self.res.text, self.res.tokens) or "<span></span>")
        with self.box:
            result_status(self.res)
        self.plain.code(self.res.prompt + self.res.text, language=None, wrap_lines=True)
        with self.box:
            result_extras(self.res, self.side)


def result_heading(res: Result, side: str, compare: bool) -> None:
    if compare:
        st.markdown(f"**{side.upper()}** · {model_label(res.model)} · {res.settings}")


def show_result(res: Result | None, side: str, compare: bool) -> None:
    if res is None:
        st.caption("Press **Generate** to sample from the model.")
        return
    result_heading(res, side, compare)
    if res.error:
        st.error(res.error)
        if not res.text:
            return
    view, plain = st.tabs(["Probabilities", "Text"])
    with view:
        st.html(render_tokens(res.prompt, res.text, res.tokens))
        st.html(LEGEND)
    with plain:
        st.code(res.prompt + res.text, language=None, wrap_lines=True)
    result_status(res)
    result_extras(res, side)


def status_text(res: Result) -> str:
    """The status line: "finished (max new tokens) · 300 tokens · 690 tokens/s", the rate as the server
    saw it (the page's script puts the user's in its place, from their click)."""
    status = {"done": "finished", "stopped": "stopped", "error": "failed", "running": "generating"}[res.status]
    reason = {"stop": " (stop string or end of text)", "length": " (max new tokens)"}.get(res.finish_reason or "", "")
    rate = len(res.tokens) / res.elapsed if res.elapsed > 0 else 0.0
    return f"{status}{reason if res.status == 'done' else ''} · {len(res.tokens)} tokens · {rate:.0f} tokens/s"


def result_status(res: Result) -> None:
    """The status line, and the script that makes its rate the user's."""
    st.caption(status_text(res))
    if res.tokens:  # in the browser, the rate becomes the user's: from their click to this line's frame
        st.html(RATE_JS % (json.dumps(res.key), len(res.tokens)), unsafe_allow_javascript=True)


def result_extras(res: Result, side: str) -> None:
    """Under the status line: notes, and the token inspector."""
    if res.note:
        st.caption(res.note)
    if res.status == "stopped":
        st.info("Stopped — the text so far is kept.")
    # the inspector is drawn once asked for: its list of every token is the largest part of a finished
    # result for the browser to lay out
    if res.tokens and st.toggle("Inspect a token", key=f"inspecting_{side}"):
        inspect_tokens(res, side)


def inspect_tokens(res: Result, side: str) -> None:
    with st.container(border=True):
        i = st.selectbox(
            "Token",
            range(len(res.tokens)),
            key=f"inspect_{side}",
            format_func=lambda i: (
                f"#{i} {res.tokens[i].text!r}"
                + (f" · {res.tokens[i].prob:.1%}" if res.tokens[i].prob is not None else "")
            ),
        )
        t = res.tokens[i if i is not None and i < len(res.tokens) else 0]
        if t.top:
            st.html(alternatives_html(t))
        else:
            st.caption("No alternatives recorded for this token.")
