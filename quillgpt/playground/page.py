"""The playground page: pick a model, sample from it and see how sure it was (Streamlit).

`quill playground` (quillgpt/playground/launch.py) and `streamlit run app.py` run this file. Models
run in-process by default (`LocalBackend`), or on a running `quill serve` (`ApiBackend`). Both
stream `Chunk`s: new text and, for each token, its probability and top alternatives, which the
probability view (quillgpt/playground/view.py) colours token by token.

Settings come from the command line after `--` (`--model`, repeatable; `--api-url`) or, failing
that, from $QUILL_PLAYGROUND_MODELS (os.pathsep-separated) and $QUILL_API_URL.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import streamlit as st

from quillgpt.checkpoint import (
    CONFIG_FILE,
    CheckpointError,
    LoadedModel,
    load_model,
    read_model_config,
    resolve_model_path,
)
from quillgpt.device import resolve_device
from quillgpt.playground.api import ApiBackend
from quillgpt.playground.backend import Backend, BackendError, BackgroundStream, Chunk, ModelCard, TokenView
from quillgpt.playground.local import LocalBackend, warm_up
from quillgpt.playground.settings import PlaygroundSettings, parse_seed, parse_stop_strings, read_settings
from quillgpt.playground.train_page import train_page
from quillgpt.playground.training import runs_dir, trained_models
from quillgpt.playground.view import CSS, CURSOR, LEGEND, LiveView, prompt_html, render_tokens
from quillgpt.sampling import LIMITS, SamplingError, SamplingParams, sampling_params

log = logging.getLogger(__name__)

# Module-level strings would be drawn on the page by Streamlit's "magic" when this file is the
# script being run, so the constants here are explained in comments.
# How often the page sends new text while it streams in; tokens arriving in between go out
# together. Each update costs Streamlit's server and the browser a few milliseconds of the CPU the
# model runs on, whatever its size, so they are coalesced by time rather than sent per token.
REDRAW_SECONDS = 0.1

# The click on Generate, timed by the browser: the status line's rate runs from it to the frame
# that shows the finished text, which is what the user waits for (the server sees the click late).
CLICK_JS = """<script>
if (!window.quillClickTimer) {
  window.quillClickTimer = true;
  document.addEventListener("click", (e) => {
    if (e.target.closest && e.target.closest(".st-key-generate")) window.quillClickAt = e.timeStamp;
  }, true);
}
</script>"""

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

NO_MODELS = """**No model to run yet.** The bundled Shakespeare model (`models/shakespeare-char`) is not in
this checkout, and no model directory was given.

Point the playground to a model directory — one holding `config.json` and `model.safetensors`, as
written by training — in the sidebar, or start it with `quill playground --model path/to/model`
(`streamlit run app.py -- --model path/to/model`)."""


@st.cache_resource(show_spinner="Loading and preparing the model…", max_entries=8)
def _load_cached(path: str, stamp: float) -> LoadedModel:
    loaded = load_model(path, device=resolve_device("auto"), weights="auto")
    warm_up(loaded)  # when the model is selected, not inside the first Generate
    return loaded


def cached_load(name: str) -> LoadedModel:
    """`load_model`, cached across reruns and sessions; a rewritten config.json loads afresh."""
    path = resolve_model_path(name).resolve()
    config = path / CONFIG_FILE
    return _load_cached(str(path), config.stat().st_mtime if config.is_file() else 0.0)


@st.cache_resource
def _api_backend(url: str) -> ApiBackend:
    return ApiBackend(url)


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
    """When the click's rerun began (the server's earliest sight of it)."""
    elapsed: float = 0.0
    key: str = field(default_factory=lambda: uuid.uuid4().hex)

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
    return LocalBackend(extra, loader=cached_load, trained=trained_models(runs_dir()))


def main() -> None:
    st.session_state.run_started = time.monotonic()
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
    """Generate, or (with models run in this process) Train: a mode chosen in the sidebar."""
    with st.sidebar:
        st.html(CLICK_JS, unsafe_allow_javascript=True)
        st.title("QuillGPT playground")
        modes = ["Generate"] if settings.api_url else ["Generate", "Train"]
        mode = st.radio("Mode", modes, key="mode", horizontal=True, label_visibility="collapsed")
    if mode == "Train":
        train_page()
    else:
        generate_page(settings)


def generate_page(settings: PlaygroundSettings) -> None:
    backend = make_backend(settings)
    with st.sidebar:
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
                    res = Result(model, prompt, describe(params[side]), started=st.session_state.run_started)
                    st.session_state[f"result_{side}"] = res

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
    facts += [f"{card.facts['Val bits per byte']} bits/byte"] if "Val bits per byte" in card.facts else []
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
            "Temperature",
            0.0,
            5.0,
            float(LIMITS["temperature"].default),
            0.1,
            key=f"temperature_{side}",
            help="0 = always the most likely token",
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
        return sampling_params(
            dict(
                max_new_tokens=int(max_new),
                temperature=float(temperature),
                top_k=int(top_k) or None,
                top_p=float(top_p),
                repetition_penalty=float(penalty),
                stop=parse_stop_strings(stop),
                seed=parse_seed(seed),
            )
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
    """Stream every side at once, each read in its own thread, sending the new tokens as they arrive.

    The page takes what has arrived at most every REDRAW_SECONDS and appends only those tokens to the
    view (`LiveView`), so neither the model nor the browser waits on the other."""
    wake = threading.Event()
    streams: dict[str, BackgroundStream] = {}
    views, live = {}, {}
    try:
        for side, res in results.items():
            try:
                streams[side] = BackgroundStream(backend.stream(res.model, res.prompt, params[side]), wake)
            except BackendError as e:
                res.status, res.error = "error", str(e)
                continue
            live[side] = outputs[side].container(key=f"quill_live_{side}")
            live[side].html(prompt_html(res.prompt) + CURSOR)
            views[side] = LiveView()
        drawn = 0.0
        while streams:
            wake.wait(timeout=REDRAW_SECONDS)
            wake.clear()
            for side in list(streams):
                res = results[side]
                try:
                    for chunk in streams[side].take():
                        res.add(chunk)
                    if streams[side].done:
                        res.status = "done"
                except BackendError as e:
                    res.status, res.error = "error", str(e)
                except Exception as e:  # one side failing must not take the other down
                    log.exception("generation failed")
                    res.status, res.error = "error", f"Generation failed: {type(e).__name__}: {e}"
                if res.status != "running":
                    del streams[side]
            if streams and time.monotonic() - drawn >= REDRAW_SECONDS:
                for side in streams:
                    if new := views[side].update(results[side].text, results[side].tokens):
                        live[side].html(new + CURSOR)
                drawn = time.monotonic()
    finally:  # Stop, or another widget, interrupts the script here: the threads stop too
        for stream in streams.values():
            stream.close()


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
    if res.tokens:  # in the browser, the rate becomes the user's: from their click to this line's frame
        st.html(RATE_JS % (json.dumps(res.key), len(res.tokens)), unsafe_allow_javascript=True)
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


if __name__ == "__main__":
    main()
