"""The playground: a Streamlit page to pick a model, sample from it and see how sure it was.

`quill playground` (see `launch`) and `streamlit run app.py` run this file. Models run in-process
by default (`LocalBackend`, through quillgpt.generate), or on a running `quill serve` (`ApiBackend`,
its OpenAI-compatible completions API). Both stream `Chunk`s: new text and, for each token, its
probability and top alternatives, which the page colours token by token.

Settings come from the command line after `--` (`--model`, repeatable; `--api-url`) or, failing
that, from $QUILL_PLAYGROUND_MODELS (os.pathsep-separated) and $QUILL_API_URL.
"""

from __future__ import annotations

import argparse
import dataclasses
import html
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx
import streamlit as st

from quillgpt.checkpoint import (
    CONFIG_FILE,
    CheckpointError,
    LoadedModel,
    bundled_models,
    default_prompt,
    load_model,
    read_model_config,
    resolve_model_path,
)
from quillgpt.config import ConfigError
from quillgpt.device import resolve_device
from quillgpt.generate import Decoder, SamplingError, SamplingParams, TextRequest
from quillgpt.tokenizer import TextStreamer, TokenizerError

log = logging.getLogger(__name__)

# Module-level strings would be drawn on the page by Streamlit's "magic" when this file is the
# script being run, so the constants here are explained in comments.
TOP_ALTERNATIVES = 5  # alternatives shown per token (OpenAI's completions API allows at most 5)
REDRAW_SECONDS = 0.1  # how often the page redraws while text streams in


class BackendError(RuntimeError):
    """A problem the user can fix: a missing model, an unreachable API, a prompt the model cannot read."""


# --- what backends produce -------------------------------------------------------------------------


@dataclass
class TokenView:
    """One generated token as the page shows it."""

    text: str
    prob: float | None
    """The model's own probability for the token (before temperature and filters); None if unknown."""
    top: list[tuple[str, float]] = field(default_factory=list)
    """The most likely tokens at that position, (text, probability), most likely first."""


@dataclass
class Chunk:
    text: str
    """New text that may be shown (never a stop string)."""
    tokens: list[TokenView] = field(default_factory=list)
    finish_reason: str | None = None
    note: str | None = None


@dataclass
class ModelCard:
    name: str
    source: str
    parameters: int | None = None
    facts: dict[str, str] = field(default_factory=dict)
    """Training data, val loss, steps, tokenizer, ... as label → text, in display order."""
    description: str | None = None
    """The model directory's README.md."""
    loss_curve: Path | None = None
    default_prompt: str = ""


class Backend(Protocol):
    label: str
    local: bool

    def models(self) -> list[str]: ...
    def card(self, name: str) -> ModelCard: ...
    def stream(self, name: str, prompt: str, params: SamplingParams) -> Iterator[Chunk]: ...


def provenance_facts(prov: dict[str, Any]) -> dict[str, str]:
    facts: dict[str, str] = {}
    data, sha = prov.get("dataset") or prov.get("data"), prov.get("data_sha256")
    if isinstance(data, dict):  # a dataset described by its fields rather than named
        data, sha = data.get("name") or data.get("dataset") or data.get("path"), sha or data.get("sha256")
    if data:
        facts["Training data"] = f"{data}" + (f" (sha256 {str(sha)[:12]}…)" if sha else "")
    if isinstance(prov.get("val_loss_full_split"), int | float):  # every character of the split
        facts["Val loss"] = f"{prov['val_loss_full_split']:.4f} (whole split)"
    elif isinstance(prov.get("val_loss"), int | float):  # the training loop's estimate
        facts["Val loss"] = f"{prov['val_loss']:.4f}"
    if isinstance(prov.get("steps"), int):
        facts["Training steps"] = f"{prov['steps']:,}"
    if isinstance(prov.get("tokens"), int | float):
        facts["Tokens seen"] = _human(prov["tokens"])
    if isinstance(prov.get("wall_time_s"), int | float):
        facts["Training time"] = _duration(prov["wall_time_s"])
    return facts


def _human(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# --- in-process models -----------------------------------------------------------------------------


class LocalBackend:
    """Models loaded into this process: the bundled ones and any directory the user names."""

    local = True

    def __init__(self, models: Iterable[str] = (), loader: Callable[[str], LoadedModel] = load_model):
        self.extra = list(dict.fromkeys(models))
        self.loader = loader
        self.label = "Models run in this process"

    def models(self) -> list[str]:
        return list(dict.fromkeys([*self.extra, *bundled_models()]))

    def load(self, name: str) -> LoadedModel:
        try:
            return self.loader(name)
        except (CheckpointError, ConfigError, TokenizerError, OSError) as e:
            raise BackendError(f"Cannot load model {name!r}: {e}") from None

    def card(self, name: str) -> ModelCard:
        loaded = self.load(name)
        cfg, tok = loaded.model.config, loaded.tokenizer
        facts = provenance_facts(loaded.provenance)
        facts["Tokenizer"] = f"{tok.to_spec()['type']}, {tok.vocab_size:,} tokens"
        facts["Context"] = f"{cfg.block_size:,} tokens"
        facts["Shape"] = f"{cfg.n_layer} layers × {cfg.n_head} heads × {cfg.n_embd} wide"
        readme, loss = loaded.path / "README.md", loaded.path / "loss.png"
        return ModelCard(
            name=loaded.name,
            source=str(loaded.path),
            parameters=loaded.model.num_params(),
            facts=facts,
            description=readme.read_text(encoding="utf-8", errors="replace") if readme.is_file() else None,
            loss_curve=loss if loss.is_file() else None,
            default_prompt=loaded.default_prompt,
        )

    def stream(self, name: str, prompt: str, params: SamplingParams) -> Iterator[Chunk]:
        loaded = self.load(name)
        tokenizer = loaded.tokenizer
        params = dataclasses.replace(params, logprobs=TOP_ALTERNATIVES)
        try:
            req = TextRequest(tokenizer, prompt, params)
        except TokenizerError as e:
            raise BackendError(f"The prompt does not fit this model's vocabulary: {e}") from None
        # A second streamer gives each token's own text; tokens holding part of a UTF-8 character
        # show nothing until the character is complete, so their probabilities are multiplied in.
        view = TextStreamer(tokenizer)
        pieces: list[str] = []
        views: list[TokenView] = []
        held = 1.0

        def on_token(seq, token: int) -> None:
            nonlocal held
            pieces.append(req.push(token))
            lp = seq.logprobs[-1]
            held *= math.exp(lp.logprob)
            if text := view.push(token):
                top = [(tokenizer.decode([i]), math.exp(v)) for i, v in lp.top]
                views.append(TokenView(text, held, top))
                held = 1.0

        decoder = Decoder(loaded.model, max_batch=1)
        decoder.add(req.seq)
        while decoder.active:
            decoder.step(on_token)
            yield Chunk("".join(pieces), views[:])
            pieces.clear()
            views.clear()
        tail = req.finish()
        rest = view.flush()
        note = None
        if req.seq.prompt_truncated:
            block = loaded.model.config.block_size
            note = f"The prompt was longer than the model's context: only its last {block} tokens were used."
        yield Chunk(tail, [TokenView(rest, held)] if rest else [], req.seq.finish_reason or "length", note)


@st.cache_resource(show_spinner="Loading model…", max_entries=8)
def _load_cached(path: str, stamp: float) -> LoadedModel:
    return load_model(path, device=resolve_device("auto"))


def cached_load(name: str) -> LoadedModel:
    """`load_model`, cached across reruns and sessions; a rewritten config.json loads afresh."""
    path = resolve_model_path(name).resolve()
    config = path / CONFIG_FILE
    return _load_cached(str(path), config.stat().st_mtime if config.is_file() else 0.0)


# --- a running `quill serve` -----------------------------------------------------------------------


class ApiBackend:
    """Models on a running `quill serve`, through its OpenAI-compatible `/v1` API."""

    local = False

    def __init__(self, url: str, *, timeout: float = 10.0, client: httpx.Client | None = None):
        """`client`, if given, is used as is (its base URL included): tests pass an in-process app's."""
        self.url = normalize_api_url(url)
        self.label = f"Models run by the API at {self.url}"
        # generation may queue behind other requests on the server: reads may wait longer than connects
        self.client = client or httpx.Client(base_url=self.url, timeout=httpx.Timeout(timeout, read=120.0))
        self.entries: dict[str, dict[str, Any]] = {}

    def models(self) -> list[str]:
        try:
            r = self.client.get("/v1/models")
        except httpx.HTTPError as e:
            raise BackendError(self._unreachable(e)) from None
        self._check(r)
        try:
            data = r.json()["data"]
            self.entries = {m["id"]: m for m in data}
        except (ValueError, KeyError, TypeError):
            raise BackendError(f"{self.url}/v1/models did not answer like an OpenAI-compatible API") from None
        return list(self.entries)

    def card(self, name: str) -> ModelCard:
        if name not in self.entries:
            self.models()
        entry = self.entries.get(name)
        if entry is None:
            raise BackendError(f"The API at {self.url} has no model {name!r} (it has: {', '.join(self.entries)})")
        prov = entry.get("provenance") if isinstance(entry.get("provenance"), dict) else {}
        params = entry.get("parameters")
        description = entry.get("card") if isinstance(entry.get("card"), str) else None
        facts = provenance_facts(prov)
        if entry.get("tokenizer") and entry.get("vocab_size"):
            facts["Tokenizer"] = f"{entry['tokenizer']}, {entry['vocab_size']:,} tokens"
        if entry.get("context_length"):
            facts["Context"] = f"{entry['context_length']:,} tokens"
        return ModelCard(
            name=name,
            source=f"{self.url} (API)",
            parameters=params if isinstance(params, int) else None,
            facts=facts,
            description=description,
            default_prompt=default_prompt({**prov, **entry}),
        )

    def stream(self, name: str, prompt: str, params: SamplingParams) -> Iterator[Chunk]:
        body: dict[str, Any] = {
            "model": name,
            "prompt": prompt,
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "stream": True,
            "logprobs": TOP_ALTERNATIVES,
        }
        if params.stop:
            body["stop"] = list(params.stop)
        if params.seed is not None:
            body["seed"] = params.seed
        if params.top_k is not None:
            body["top_k"] = params.top_k
        if params.repetition_penalty != 1.0:
            body["repetition_penalty"] = params.repetition_penalty
        started = False
        try:
            with self.client.stream("POST", "/v1/completions", json=body) as r:
                started = True
                if r.status_code >= 400:
                    r.read()
                    self._check(r)
                for line in r.iter_lines():
                    if not line.startswith("data:"):
                        continue  # blank separators, SSE comments and event names
                    data = line[len("data:") :].strip()
                    if data == "[DONE]":
                        return
                    yield self._chunk(data)
        except httpx.HTTPError as e:
            if started:
                raise BackendError(f"The API at {self.url} stopped answering while generating ({e})") from None
            raise BackendError(self._unreachable(e)) from None

    def _chunk(self, data: str) -> Chunk:
        try:
            event = json.loads(data)
            if "error" in event:
                raise BackendError(f"The API failed while generating: {_error_message(event)}")
            choice = event["choices"][0]
        except (ValueError, KeyError, IndexError, TypeError):
            raise BackendError(f"The API sent a chunk this page cannot read: {data[:200]!r}") from None
        return Chunk(choice.get("text") or "", _token_views(choice.get("logprobs")), choice.get("finish_reason"))

    def _check(self, r: httpx.Response) -> None:
        if r.status_code >= 400:
            try:
                message = _error_message(r.json())
            except ValueError:
                message = r.text.strip()[:300] or r.reason_phrase
            raise BackendError(f"The API at {self.url} answered {r.status_code}: {message}")

    def _unreachable(self, e: httpx.HTTPError) -> str:
        reason = str(e) or type(e).__name__
        return (
            f"Cannot reach the QuillGPT API at {self.url} ({reason}). Is `quill serve` running there? "
            "Start it, or run the playground without --api-url to load models in this process."
        )


def normalize_api_url(url: str) -> str:
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        url = "http://" + url
    return url.removesuffix("/v1")


def _error_message(body: Any) -> str:
    if isinstance(body, dict):
        err = body.get("error", body.get("detail", body))
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])
        return str(err)
    return str(body)


def _token_views(logprobs: dict[str, Any] | None) -> list[TokenView]:
    """OpenAI completions logprobs (tokens, token_logprobs, top_logprobs) → TokenViews."""
    if not logprobs:
        return []
    tokens = logprobs.get("tokens") or []
    chosen = logprobs.get("token_logprobs") or []
    tops = logprobs.get("top_logprobs") or []
    views = []
    for i, text in enumerate(tokens):
        lp = chosen[i] if i < len(chosen) else None
        top = tops[i] if i < len(tops) and isinstance(tops[i], dict) else {}
        alternatives = sorted(((t, math.exp(v)) for t, v in top.items()), key=lambda a: -a[1])
        views.append(TokenView(text, math.exp(lp) if lp is not None else None, alternatives))
    return views


@st.cache_resource
def _api_backend(url: str) -> ApiBackend:
    return ApiBackend(url)


# --- settings --------------------------------------------------------------------------------------


@dataclass
class PlaygroundSettings:
    models: list[str] = field(default_factory=list)
    api_url: str | None = None


def read_settings(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> PlaygroundSettings:
    """`--model` / `--api-url` from the arguments after `streamlit run ... --`, else the environment."""
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(prog="quill playground", add_help=False, allow_abbrev=False, exit_on_error=False)
    parser.add_argument("--model", action="append", default=[])
    parser.add_argument("--api-url", default=None)
    try:
        args, _ = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    except argparse.ArgumentError as e:
        raise BackendError(f"Bad playground arguments: {e}") from None
    env_models = [m for m in environ.get("QUILL_PLAYGROUND_MODELS", "").split(os.pathsep) if m]
    return PlaygroundSettings(args.model or env_models, args.api_url or environ.get("QUILL_API_URL") or None)


def parse_stop_strings(text: str) -> tuple[str, ...]:
    r"""One stop string per line; `\n` and `\t` stand for a newline and a tab, `\\` for a backslash."""
    escapes = {"n": "\n", "t": "\t", "\\": "\\"}
    stops = []
    for line in text.splitlines():
        out, i = [], 0
        while i < len(line):
            if line[i] == "\\" and i + 1 < len(line) and line[i + 1] in escapes:
                out.append(escapes[line[i + 1]])
                i += 2
            else:
                out.append(line[i])
                i += 1
        if stop := "".join(out):
            stops.append(stop)
    return tuple(stops)


def parse_seed(text: str) -> int | None:
    text = text.strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise SamplingError(f"seed must be a whole number, or empty for a random one; got {text!r}") from None


# --- the probability view --------------------------------------------------------------------------


def prob_colour(p: float) -> str:
    """Red for tokens the model found unlikely, through yellow, to green for the ones it expected."""
    return f"hsl({120 * min(max(p, 0.0), 1.0):.0f}, 75%, 80%)"


def _shown(text: str) -> str:
    return repr(text)


def token_tip(t: TokenView) -> str:
    head = f"{_shown(t.text)}  {t.prob:.1%}" if t.prob is not None else _shown(t.text)
    if not t.top:
        return head
    return head + "\nmost likely here:\n" + "\n".join(f"  {_shown(a)}  {p:.1%}" for a, p in t.top)


def render_tokens(prompt: str, text: str, tokens: list[TokenView], cursor: bool = False) -> str:
    """HTML for the prompt then the generated text, each token coloured by its probability, with its
    alternatives in a tooltip (on hover, or on focus: click a token). `text` is the truth: token texts
    are laid over it, so a stop string's tokens, generated but not shown, fall off the end."""
    parts = ['<div class="quill-output">', f'<span class="quill-prompt">{html.escape(prompt)}</span>']
    pos = 0
    for i, t in enumerate(tokens):
        if pos >= len(text):
            break
        piece = text[pos : pos + len(t.text)]
        pos += len(piece)
        style = f' style="background:{prob_colour(t.prob)}"' if t.prob is not None else ""
        body = html.escape(piece)
        if piece.strip("\n") == "":  # a newline token: give it something to hover
            body = '<span class="quill-nl">↵</span>' + body
        parts.append(
            f'<span class="quill-tok" tabindex="0" data-i="{i}"{style} data-tip="{html.escape(token_tip(t))}">'
            f"{body}</span>"
        )
    if pos < len(text):
        parts.append(html.escape(text[pos:]))
    if cursor:
        parts.append('<span class="quill-cursor">▌</span>')
    parts.append("</div>")
    return "".join(parts)


CSS = """<style>
[data-testid="stMainBlockContainer"] { padding-top: 2.5rem; }
.quill-output { white-space: pre-wrap; font-family: ui-monospace, SFMono-Regular, Menlo, monospace;
  font-size: 0.95rem; line-height: 1.75; padding: 0.9rem 1rem; border-radius: 0.5rem;
  border: 1px solid rgba(128, 128, 128, 0.35); overflow-wrap: anywhere; }
.quill-prompt { font-weight: 700; opacity: 0.8; }
.quill-tok { position: relative; color: #1b1b1b; border-radius: 3px; padding: 1px 0; cursor: help; }
.quill-tok:hover, .quill-tok:focus { outline: 2px solid #1f6feb; }
.quill-tok:hover::after, .quill-tok:focus::after { content: attr(data-tip); position: absolute; left: 0;
  top: 100%; margin-top: 5px; z-index: 100; white-space: pre; pointer-events: none; font-size: 0.8rem;
  line-height: 1.45; padding: 0.45rem 0.65rem; border-radius: 6px; background: #262730; color: #fafafa;
  box-shadow: 0 3px 10px rgba(0, 0, 0, 0.3); }
.quill-nl { opacity: 0.45; }
.quill-cursor { opacity: 0.6; }
.quill-legend { display: flex; align-items: center; gap: 0.5rem; font-size: 0.8rem; opacity: 0.85; }
.quill-legend .bar { width: 9rem; height: 0.7rem; border-radius: 3px;
  background: linear-gradient(to right, hsl(0,75%,80%), hsl(60,75%,80%), hsl(120,75%,80%)); }
</style>"""

LEGEND = (
    '<div class="quill-legend"><span>unlikely</span><span class="bar"></span><span>likely</span>'
    "<span>— each token's probability under the model (before temperature and filters); "
    "hover or click a token for the alternatives</span></div>"
)

NO_MODELS = """**No model to run yet.** The bundled Shakespeare model (`models/shakespeare-char`) is not in
this checkout, and no model directory was given.

Point the playground to a model directory — one holding `config.json` and `model.safetensors`, as
written by training — in the sidebar, or start it with `quill playground --model path/to/model`
(`streamlit run app.py -- --model path/to/model`)."""


# --- the page --------------------------------------------------------------------------------------


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
    elapsed: float = 0.0

    def add(self, chunk: Chunk) -> None:
        self.text += chunk.text
        self.tokens.extend(chunk.tokens)
        self.finish_reason = chunk.finish_reason or self.finish_reason
        self.note = chunk.note or self.note
        self.elapsed = time.monotonic() - self.started


def make_backend(settings: PlaygroundSettings) -> Backend:
    if settings.api_url:
        return _api_backend(settings.api_url)
    extra = [*settings.models, *st.session_state.get("added_models", [])]
    return LocalBackend(extra, loader=cached_load)


def main() -> None:
    st.set_page_config(page_title="QuillGPT playground", page_icon="🪶", layout="wide")
    st.html(CSS)
    try:
        page(read_settings())
    except BackendError as e:
        st.error(str(e))
    except Exception as e:  # the last line of defence: a message in the page, the traceback in the log
        log.exception("playground error")
        st.error(f"Something went wrong: {type(e).__name__}: {e}")


def page(settings: PlaygroundSettings) -> None:
    backend = make_backend(settings)
    with st.sidebar:
        st.title("QuillGPT playground")
        st.caption(backend.label)
        compare = st.toggle(
            "Compare side by side", key="compare", help="the same prompt through two models or settings"
        )
        if backend.local:
            add_model_form()
    names = backend.models()
    if not names:
        st.info(NO_MODELS)
        return
    sides = ["a", "b"] if compare else ["a"]
    # Compare: each row split in two. Alone: the sampling controls in a panel beside the text.
    if compare:
        model_cols = st.columns(2)
        prompt_area = st.container()
        settings_cols = st.columns(2)
        button_area = st.container()
        output_cols = st.columns(2)
    else:
        main_col, panel = st.columns([3, 1], gap="large")
        with main_col:
            model_cols = [st.container()]
            prompt_area = st.container()
            button_area = st.container()
            output_cols = [st.container()]
        settings_cols = [panel]

    cards: dict[str, ModelCard | None] = {}
    for side, col in zip(sides, model_cols):
        with col:
            cards[side] = model_picker(backend, names, side, compare)
    with st.sidebar:
        by_source: dict[str, tuple[ModelCard, list[str]]] = {}  # one card per model, named by its sides
        for side in sides:
            if card := cards[side]:
                by_source.setdefault(card.source, (card, []))[1].append(side.upper())
        for card, labels in by_source.values():
            show_card(card, f"{' and '.join(labels)}: " if compare else "")
    with prompt_area:
        first = cards[sides[0]]
        prompt_box(first.default_prompt if first else "")
    params = {}
    for side, col in zip(sides, settings_cols):
        with col:
            params[side] = sampling_controls(side, compare)
    with button_area:
        b1, b2, _ = st.columns([1, 1, 3 if compare else 2])
        go = b1.button("Generate", type="primary", key="generate", width="stretch")
        b2.button("Stop", key="stop", width="stretch", help="stop generating and keep the text so far")
        started = False
        if go:
            if any(cards[s] is None or params[s] is None for s in sides):
                st.error("Fix the problems above before generating.")
            else:
                started = True
                for side in sides:
                    model, prompt = st.session_state[f"model_{side}"], st.session_state.prompt
                    st.session_state[f"result_{side}"] = Result(model, prompt, describe(params[side]))

    outputs = {}
    for side, col in zip(sides, output_cols):
        with col:
            outputs[side] = st.empty()
    results = {s: st.session_state.get(f"result_{s}") for s in sides}
    for res in results.values():
        if res is not None and res.status == "running" and not started:
            res.status = "stopped"  # the run generating it was interrupted: Stop, or another widget
    if started:
        run_generation(backend, params, results, outputs)
    for side, res in results.items():
        with outputs[side].container():
            show_result(res, side, compare)


def model_picker(backend: Backend, names: list[str], side: str, compare: bool) -> ModelCard | None:
    """The model selectbox of one side and a line about the model; its card, or None if it cannot load."""
    label = f"Model {side.upper()}" if compare else "Model"
    default = 1 if side == "b" and len(names) > 1 else 0
    name = st.selectbox(label, names, index=default, key=f"model_{side}", format_func=_model_label)
    try:
        card = backend.card(name)
    except BackendError as e:
        st.error(str(e))
        return None
    facts = [f"{card.parameters:,} parameters"] if card.parameters else []
    facts += [f"val loss {card.facts['Val loss']}"] if "Val loss" in card.facts else []
    facts += [f"trained on {card.facts['Training data']}"] if "Training data" in card.facts else []
    st.caption(" · ".join(facts) or card.source)
    return card


def _model_label(name: str) -> str:
    p = Path(name)
    return f"{p.name} ({name})" if p.name != name else name


def add_model_form() -> None:
    with st.form("add_model", clear_on_submit=False, border=False):
        path = st.text_input("Add a model directory", key="new_model_dir", placeholder="path/to/model")
        if st.form_submit_button("Add model"):
            try:
                directory = resolve_model_path(path.strip())
                read_model_config(directory)
            except CheckpointError as e:
                st.error(f"Cannot use {path!r}: {e}")
            else:
                added = st.session_state.setdefault("added_models", [])
                if str(directory) not in added:
                    added.append(str(directory))
                st.session_state["model_a"] = str(directory)
                st.rerun()


def show_card(card: ModelCard, prefix: str) -> None:
    st.subheader(f"{prefix}{card.name}")
    st.caption(card.source)
    if card.parameters:
        st.metric("Parameters", f"{card.parameters:,}")
    if card.facts:
        st.markdown("  \n".join(f"**{k}:** {v}" for k, v in card.facts.items()))
    if card.loss_curve:
        st.image(str(card.loss_curve), caption="Loss curve")
    else:
        st.caption("No loss curve recorded for this model.")
    if card.description:
        with st.expander("Model card"):
            st.markdown(card.description)


def prompt_box(default: str) -> None:
    # Follow the model's default prompt until the user types their own.
    if "prompt" not in st.session_state or st.session_state.prompt == st.session_state.get("prompt_default"):
        st.session_state.prompt = default
    st.session_state.prompt_default = default
    st.text_area("Prompt", key="prompt", height=110, placeholder="empty: start from the model's start token")


def sampling_controls(side: str, compare: bool) -> SamplingParams | None:
    """The sampling widgets of one side; their SamplingParams, or None after showing what is wrong."""
    if compare:
        frame = st.expander(f"Sampling settings {side.upper()}", expanded=True)
    else:
        frame = st.container()
        frame.markdown("**Sampling**")
    with frame:
        c1, c2 = st.columns(2)
        c3, c4 = st.columns(2)
        temperature = c1.number_input(
            "Temperature", 0.0, 5.0, 0.8, 0.1, key=f"temperature_{side}", help="0 = always the most likely token"
        )
        top_k = c2.number_input("Top-k", 0, 1_000_000, 0, 1, key=f"top_k_{side}", help="0 = off")
        top_p = c3.number_input("Top-p", 0.0, 1.0, 1.0, 0.05, key=f"top_p_{side}", help="1 = off")
        max_new = c4.number_input("Max new tokens", 1, 5000, 300, 50, key=f"max_new_tokens_{side}")
        d1, d2 = st.columns(2)
        penalty = d1.number_input(
            "Repetition penalty", 0.0, 10.0, 1.0, 0.05, key=f"repetition_penalty_{side}", help=">1 discourages repeats"
        )
        seed = d2.text_input("Seed", key=f"seed_{side}", placeholder="random", help="same seed, same text")
        stop = st.text_area(
            "Stop strings",
            key=f"stop_{side}",
            height=68,
            placeholder="one per line; \\n is a newline",
            help="generation ends before the first of these; one per line, \\n for a newline",
        )
    try:
        return SamplingParams(
            max_new_tokens=int(max_new),
            temperature=float(temperature),
            top_k=int(top_k) or None,
            top_p=float(top_p),
            repetition_penalty=float(penalty),
            stop=parse_stop_strings(stop),
            seed=parse_seed(seed),
        )
    except SamplingError as e:
        st.error(f"Bad setting: {e}")
        return None


def describe(p: SamplingParams) -> str:
    parts = ["greedy" if p.greedy else f"temperature {p.temperature:g}"]
    if p.top_k:
        parts.append(f"top-k {p.top_k}")
    if p.top_p < 1:
        parts.append(f"top-p {p.top_p:g}")
    if p.repetition_penalty != 1:
        parts.append(f"repetition penalty {p.repetition_penalty:g}")
    if p.seed is not None:
        parts.append(f"seed {p.seed}")
    return " · ".join(parts)


def run_generation(backend: Backend, params: dict, results: dict[str, Result], outputs: dict) -> None:
    """Stream every side at once, a token from each in turn, redrawing the page as text arrives."""
    streams = {s: backend.stream(res.model, res.prompt, params[s]) for s, res in results.items()}
    last = 0.0
    while streams:
        for side in list(streams):
            res = results[side]
            try:
                res.add(next(streams[side]))
            except StopIteration:
                res.status = "done"
            except BackendError as e:
                res.status, res.error = "error", str(e)
            except Exception as e:  # one side failing must not take the other down
                log.exception("generation failed")
                res.status, res.error = "error", f"Generation failed: {type(e).__name__}: {e}"
            if res.status != "running":
                del streams[side]
        if time.monotonic() - last > REDRAW_SECONDS and streams:
            for side, res in results.items():
                with outputs[side].container():
                    st.html(render_tokens(res.prompt, res.text, res.tokens, cursor=res.status == "running"))
            last = time.monotonic()


def show_result(res: Result | None, side: str, compare: bool) -> None:
    if res is None:
        st.caption("Press **Generate** to sample from the model.")
        return
    if compare:
        st.markdown(f"**{side.upper()}** · {_model_label(res.model)} · {res.settings}")
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
    status = {"done": "finished", "stopped": "stopped", "error": "failed", "running": "generating"}[res.status]
    reason = {"stop": " (stop string or end of text)", "length": " (max new tokens)"}.get(res.finish_reason or "", "")
    rate = len(res.tokens) / res.elapsed if res.elapsed > 0 else 0.0
    st.caption(f"{status}{reason if res.status == 'done' else ''} · {len(res.tokens)} tokens · {rate:.0f} tokens/s")
    if res.note:
        st.caption(res.note)
    if res.status == "stopped":
        st.info("Stopped — the text so far is kept.")
    if res.tokens:
        inspect_tokens(res, side)


def inspect_tokens(res: Result, side: str) -> None:
    with st.expander("Inspect a token"):
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
            st.dataframe(
                {"token": [repr(a) for a, _ in t.top], "probability": [p for _, p in t.top]},
                hide_index=True,
                column_config={
                    "probability": st.column_config.ProgressColumn(
                        "probability", min_value=0.0, max_value=1.0, format="percent"
                    )
                },
            )
        else:
            st.caption("No alternatives recorded for this token.")


# --- launching -------------------------------------------------------------------------------------


def launch(models: list[str], api_url: str | None = None, host: str = "127.0.0.1", port: int = 8501) -> int:
    """Run the page with `streamlit run` (headless, bound to host:port) until interrupted; its exit code."""
    args: list[str] = []
    for m in models:
        p = Path(m).expanduser()
        args += ["--model", str(p.resolve()) if p.exists() else m]
    if api_url:
        args += ["--api-url", api_url]
    cmd = [
        sys.executable, "-m", "streamlit", "run", str(Path(__file__).resolve()),
        "--server.headless=true",
        f"--server.address={host}",
        f"--server.port={port}",
        "--browser.gatherUsageStats=false",
        "--server.fileWatcherType=none",
        "--client.toolbarMode=minimal",
        "--", *args,
    ]  # fmt: skip
    shown = "localhost" if host in ("0.0.0.0", "::", "") else host
    print(f"QuillGPT playground: http://{shown}:{port}", flush=True)
    proc = subprocess.Popen(cmd)
    try:  # a SIGTERM to us stops Streamlit too, rather than leaving it running
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: proc.terminate())
    except ValueError:  # not the main thread: signals cannot be handled here
        previous = None
    try:
        return proc.wait()
    except KeyboardInterrupt:  # Ctrl+C reaches Streamlit too; give it time to stop
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    main()
