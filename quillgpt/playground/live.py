"""Generate without a rerun: the page's script sends the click on Generate straight to a route on the
playground's own port, which streams the probability view back in pieces for the script to append.

Through Streamlit, the click reaches the server on a timer after the browser's next frame; the whole
page is drawn again while the model's first tokens decode beside it; and every update, the finish
included, waits for React to render the page. On two cores that was about 60 of the 450 ms a user
waited for 300 tokens (docs/results.md). Here the click is a `fetch`, and the browser appends HTML to
an element of the page's own (`.quill-live`).

The page keeps a `Live` per session and puts its ticket in that element. The script (live.js) reads
the prompt and the sampling fields as the user sees them, posts them with the ticket to
GENERATE_PATH, and reads back one JSON line per side and update (`_lines`):

    {"side": "a", "key": "…", "html": "<span class=quill-prompt>…"}   first: the result's key, the prompt
    {"side": "a", "html": "<span class=quill-tok …>…"}                 the tokens since the last update
    {"side": "a", "html": "…", "end": "done", "status": "finished · 300 tokens · 702 tokens/s",
     "tokens": 300, "note": null}                                      the end: done, or stopped
    {"side": "a", "end": "error", "error": "…"}

STOP_PATH stops the session's generation after its current step; it ends with "stopped". Once every
side has ended, the script reruns the page (its hidden sync button), which takes the finished results
into the session (`Live.take_finished`) and draws them whole: the Text tab, the inspector.

Without the script (AppTest), or on a page whose models did not load, Generate's click goes through
Streamlit (`Generation` started by its callback, drawn by `run_generation`); a setting the route
refuses sends the click there too, so the page shows what is wrong as it always has.
"""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
import weakref
from dataclasses import dataclass, field
from pathlib import Path

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from quillgpt.playground.backend import Backend
from quillgpt.playground.output import Generation, Result, model_label, status_text
from quillgpt.playground.settings import describe, sampling_from_fields
from quillgpt.playground.view import LiveView, prompt_html
from quillgpt.sampling import SamplingError, SamplingParams

GENERATE_PATH = "/quill/generate"
STOP_PATH = "/quill/stop"

# The page's side of it, drawn once in the sidebar (`st.html` runs it).
SCRIPT = "<script>\n" + Path(__file__).with_name("live.js").read_text(encoding="utf-8") + "</script>"

# Each session's Live by ticket, for as long as the session keeps it (its state holds the only strong
# reference): a closed tab's session goes, and its ticket with it.
_LIVE: weakref.WeakValueDictionary[str, Live] = weakref.WeakValueDictionary()


@dataclass(eq=False)
class Live:
    """One session's Generate over the route: what the page last showed (backend, models per side) and
    the generation it started, whose results wait here until a run of the page takes them."""

    backend: Backend | None = None
    models: dict[str, str] = field(default_factory=dict)
    """The model of each side shown, as the page last drew it."""
    ready: bool = False
    """Every side's model loads: the page would generate on a click."""
    ticket: str = field(default_factory=lambda: uuid.uuid4().hex)
    results: dict[str, Result] = field(default_factory=dict)
    generation: Generation | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    """`start` runs in the server's worker threads, `take_finished` in the page's script thread."""

    def show(self, backend: Backend, models: dict[str, str], ready: bool) -> None:
        """What the page drew this run; from now on its ticket reaches this Live."""
        self.backend, self.models, self.ready = backend, models, ready
        _LIVE[self.ticket] = self

    def anchor(self, side: str) -> str:
        """The element a side's view streams into, for `st.html`: the same HTML from run to run, so that
        React leaves what the script put in it alone (unless the page's readiness changes)."""
        return (
            f'<div class="quill-live" data-side="{side}" data-ticket="{self.ticket}" data-ready="{int(self.ready)}"'
            f' data-generate="{GENERATE_PATH}" data-stop="{STOP_PATH}"></div>'
        )

    def start(self, prompt: str, params: dict[str, SamplingParams]) -> Generation:
        """A new generation of every side in `params`; the one before it, if still running, stops."""
        assert self.backend is not None
        with self._lock:  # two clicks at once: one generation after the other, never two running
            self.stop()
            self.results = {s: Result(self.models[s], prompt, describe(p)) for s, p in params.items()}
            self.generation = Generation.start(self.backend, params, self.results)
            return self.generation

    def stop(self) -> None:
        """Stop the running generation after its current step; its text so far is kept."""
        if (generation := self.generation) is not None:
            for res in generation.results.values():
                if res.status == "running":
                    res.status = "stopped"
            generation.close()

    def take_finished(self) -> dict[str, Result]:
        """The results that have ended (done, stopped, failed), handed over once, for the session."""
        with self._lock:
            finished = {s: r for s, r in self.results.items() if r.status != "running"}
            self.results = {s: r for s, r in self.results.items() if s not in finished}
        return finished


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def _posted(request: Request) -> tuple[Live, dict] | JSONResponse:
    """The posted JSON object and its ticket's Live, or the response that refuses the request."""
    # JSON only: a page on another site cannot post it without the browser asking this server first
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        return _error(415, "send a JSON object (content-type: application/json)")
    try:
        body = await request.json()
    except ValueError:
        return _error(400, "the body is not valid JSON")
    if not isinstance(body, dict):
        return _error(400, "the body must be a JSON object")
    live = _LIVE.get(str(body.get("ticket")))
    if live is None:
        return _error(409, "this page is out of date: reload it")
    return live, body


async def generate(request: Request) -> Response:
    """POST GENERATE_PATH {"ticket", "prompt", "sides": {side: {"model": label, field: value…}}}: the
    generation's lines. The model is named as the page shows it; one the page has not drawn yet (a
    rerun still loading it) sends the click back to Streamlit, which runs it after that rerun."""
    posted = await _posted(request)
    if isinstance(posted, Response):
        return posted
    live, body = posted
    prompt, sides = body.get("prompt"), body.get("sides")
    if not isinstance(prompt, str):
        return _error(400, "prompt must be a string")
    if not isinstance(sides, dict) or not sides or not all(isinstance(f, dict) for f in sides.values()):
        return _error(400, "sides must map each side to its sampling fields")
    shown = {side: model_label(name) for side, name in live.models.items()}
    if not live.ready or any(shown.get(side) != fields.get("model") for side, fields in sides.items()):
        return _error(409, "the page has not drawn these models yet: Streamlit will run this click")
    try:
        params = {side: sampling_from_fields(lambda name, f=fields: f.get(name, "")) for side, fields in sides.items()}
    except SamplingError as e:
        return _error(422, f"Bad setting: {e}")
    # starting may load the model (a cache miss) or encode a long prompt: not in the event loop
    generation = await asyncio.to_thread(live.start, prompt, params)
    return StreamingResponse(
        _lines(generation), media_type="application/x-ndjson", headers={"cache-control": "no-store"}
    )


async def stop(request: Request) -> Response:
    """POST STOP_PATH {"ticket"}: the session's generation stops after its current step."""
    posted = await _posted(request)
    if isinstance(posted, Response):
        return posted
    live, _ = posted
    live.stop()
    return Response(status_code=204)


def _encode(lines: list[dict]) -> str:
    return "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)


async def _lines(gen: Generation):
    """Every side's prompt, then what has arrived at most every REDRAW_SECONDS, then each side's end,
    as it happens (`Generation.rounds`, as `run_generation` draws them, sent as JSON lines)."""
    views = {side: LiveView() for side in gen.results}
    first = []
    for side, res in gen.results.items():
        first.append({"side": side, "key": res.key, "html": prompt_html(res.prompt)})
        if res.status == "error":  # the backend refused it before it started
            first.append({"side": side, "end": "error", "error": res.error})
    yield _encode(first)
    rounds = gen.rounds()
    try:
        # each round waits in a worker thread: the server's event loop goes on sending meanwhile
        while (news := await asyncio.to_thread(next, rounds, None)) is not None:
            ended, redraw = news
            lines = []
            for side in ended:
                res = gen.results[side]
                if res.status == "error":
                    lines.append({"side": side, "end": "error", "error": res.error})
                else:  # done, or stopped
                    html = views[side].finish(res.text, res.tokens)
                    end = {"side": side, "html": html, "end": res.status, "status": status_text(res)}
                    lines.append(end | {"tokens": len(res.tokens), "note": res.note})
            for side in redraw:
                res = gen.results[side]
                if new := views[side].update(res.text, res.tokens):
                    lines.append({"side": side, "html": new})
            if lines:
                yield _encode(lines)
    finally:  # the page went away, or all ended: no thread goes on decoding
        for res in gen.results.values():
            if res.status == "running":
                res.status = "stopped"
        gen.close()


ROUTES = [Route(GENERATE_PATH, generate, methods=["POST"]), Route(STOP_PATH, stop, methods=["POST"])]
