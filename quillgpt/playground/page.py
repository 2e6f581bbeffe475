"""The playground page: pick a model, sample from it and see how sure it was (Streamlit).

`quill playground` and `streamlit run app.py` serve this file with its own routes on the same port
(quillgpt/playground/server.py). Models run in-process by default (`LocalBackend`), or on a running
`quill serve` (`ApiBackend`). Both stream `Chunk`s: new text and, for each token, its probability and
top alternatives, which the probability view (quillgpt/playground/view.py) colours token by token.

In a browser, Generate and Stop go to the page's route (quillgpt/playground/live.py), whose lines
the page's script appends to the page without a rerun; the run after a generation ends takes its
results into the session. Without the script (AppTest), the click goes through Streamlit: its
callback starts the model, and the page streams it in with Streamlit's elements.

Settings come from the command line after `--` (`--model`, repeatable; `--api-url`) or, failing
that, from $QUILL_PLAYGROUND_MODELS (os.pathsep-separated) and $QUILL_API_URL.
"""

from __future__ import annotations

import gc
import logging

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
from quillgpt.playground import live
from quillgpt.playground.api import ApiBackend
from quillgpt.playground.backend import Backend, BackendError, ModelCard
from quillgpt.playground.local import LocalBackend, warm_up
from quillgpt.playground.output import Generation, Result, model_label, result_key, run_generation, show_result
from quillgpt.playground.settings import (
    FIELD_RANGES,
    PlaygroundSettings,
    describe,
    read_settings,
    sampling_from_fields,
)
from quillgpt.playground.train_page import train_page
from quillgpt.playground.training import runs_dir, trained_models
from quillgpt.playground.view import CSS
from quillgpt.sampling import LIMITS, SamplingError, SamplingParams

log = logging.getLogger(__name__)

# Module-level strings would be drawn on the page by Streamlit's "magic" when this file is the
# script being run, so the constants here are explained in comments.
NO_MODELS = """**No model to run yet.** The bundled Shakespeare model (`models/shakespeare-char`) is not in
this checkout, and no model directory was given.

Point the playground to a model directory — one holding `config.json` and `model.safetensors`, as
written by training — in the sidebar, or start it with `quill playground --model path/to/model`
(`streamlit run app.py -- --model path/to/model`)."""


@st.cache_resource(show_spinner="Loading and preparing the model…", max_entries=8)
def _load_cached(path: str, stamp: float) -> LoadedModel:
    loaded = load_model(path, device=resolve_device("auto"), weights="auto")
    warm_up(loaded)  # when the model is selected, not inside the first Generate
    # What lives now (torch, Streamlit, the model: hundreds of thousands of objects) lives as long as the
    # server: kept out of the garbage collector's full passes, which would otherwise walk it all while
    # holding the interpreter, and the server would send nothing meanwhile (docs/results.md).
    gc.freeze()
    return loaded


def cached_load(name: str) -> LoadedModel:
    """`load_model`, cached across reruns and sessions; a rewritten config.json loads afresh."""
    path = resolve_model_path(name).resolve()
    config = path / CONFIG_FILE
    return _load_cached(str(path), config.stat().st_mtime if config.is_file() else 0.0)


@st.cache_resource
def _api_backend(url: str) -> ApiBackend:
    return ApiBackend(url)


def make_backend(settings: PlaygroundSettings) -> Backend:
    if settings.api_url:
        return _api_backend(settings.api_url)
    extra = [*settings.models, *st.session_state.get("added_models", [])]
    return LocalBackend(extra, loader=cached_load, trained=trained_models(runs_dir()))


def main() -> None:
    # What Generate's callback started in this run, if anything; stopped at the end of the run unless
    # the page drew it to its end (an interrupted run, or one that found a problem, leaves no thread).
    generation = st.session_state.pop("generation", None)
    st.set_page_config(page_title="QuillGPT playground", page_icon="🪶", layout="wide")
    st.html(CSS)
    try:
        page(read_settings(), generation)
    except BackendError as e:
        st.error(str(e))
    except Exception as e:  # the last line of defence: a message in the page, the traceback in the log
        log.exception("playground error")
        st.error(f"Something went wrong: {type(e).__name__}: {e}")
    finally:
        if generation is not None:
            generation.close()


def page(settings: PlaygroundSettings, generation: Generation | None = None) -> None:
    """Generate, or (with models run in this process) Train: a mode chosen in the sidebar."""
    with st.sidebar:
        st.html(live.SCRIPT, unsafe_allow_javascript=True)  # Generate and Stop over the page's route
        st.title("QuillGPT playground")
        modes = ["Generate"] if settings.api_url else ["Generate", "Train"]
        mode = st.radio("Mode", modes, key="mode", horizontal=True, label_visibility="collapsed")
    if mode == "Train":
        train_page()
    else:
        generate_page(settings, generation)


def generate_page(settings: PlaygroundSettings, generation: Generation | None) -> None:
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
        # the click's callback starts the model before this script draws the page again
        go = b1.button("Generate", type="primary", key="generate", width="stretch",
                       on_click=start_generation, args=(backend, sides))  # fmt: skip
        b2.button("Stop", key="stop", width="stretch", help="stop generating and keep the text so far")
        # clicked by the page's script once a generation over the route has ended: this rerun takes its
        # results into the session and draws them whole (hidden by `CSS`)
        st.button("Show the last generation", key="quill_sync")
        started = False
        if go:
            if generation is None or any(cards[s] is None or params[s] is None for s in sides):
                st.error("Fix the problems above before generating.")
            else:
                started = True
                for side in sides:
                    st.session_state[f"result_{side}"] = generation.results[side]

    # Per side, the result drawn whole (`outputs`), in every run but the one that generates it, where
    # it streams in and is finished in place instead, in one of two slots taken in turn. The other one,
    # drawn empty, clears the result the last generation finished there: Streamlit reuses a container
    # drawn again at the same place, and would keep the old result's elements under the new text.
    if started:
        st.session_state.stream_slot = 1 - st.session_state.get("stream_slot", 0)
    turn = st.session_state.get("stream_slot", 0)
    # What Generate over the page's route (live.py) has finished is the session's now, unless this run
    # started a generation through Streamlit, which supersedes it.
    session_live = st.session_state.setdefault("live", live.Live())
    session_live.show(backend, {s: st.session_state[f"model_{s}"] for s in sides}, all(cards.values()))
    if started:
        session_live.stop()
        session_live.take_finished()  # dropped
    else:
        for side, res in session_live.take_finished().items():
            st.session_state[f"result_{side}"] = res
    streaming, outputs = {}, {}
    for side, col in zip(sides, output_cols):
        with col:
            st.html(session_live.anchor(side))
            streaming[side] = [st.empty(), st.empty()][turn]
            outputs[side] = st.empty()
    results = {s: st.session_state.get(f"result_{s}") for s in sides}
    for res in results.values():
        if res is not None and res.status == "running" and not started:
            res.status = "stopped"  # the run generating it was interrupted: Stop, or another widget
    finished = run_generation(generation, streaming, compare) if started else set()
    for side, res in results.items():
        if side not in finished:
            with outputs[side].container(key=result_key(res, side)):
                show_result(res, side, compare)


def start_generation(backend: Backend, sides: list[str]) -> None:
    """Generate's callback: start every side's generation from the settings in the session, before the
    script draws the page (`Generation`). With a setting the page will reject, nothing starts."""
    try:
        params = {side: read_sampling(side) for side in sides}
    except SamplingError:
        return
    prompt = st.session_state.prompt
    results = {s: Result(st.session_state[f"model_{s}"], prompt, describe(params[s])) for s in sides}
    st.session_state.generation = Generation.start(backend, params, results)


def model_picker(backend: Backend, names: list[str], side: str, compare: bool) -> ModelCard | None:
    """The model selectbox of one side and a line about the model; its card, or None if it cannot load."""
    label = f"Model {side.upper()}" if compare else "Model"
    default = 1 if side == "b" and len(names) > 1 else 0
    name = st.selectbox(label, names, index=default, key=f"model_{side}", format_func=model_label)
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
    """The sampling widgets of one side; the SamplingParams they hold, or None after showing what is wrong."""
    if compare:
        frame = st.expander(f"Sampling settings {side.upper()}", expanded=True)
    else:
        frame = st.container()
        frame.markdown("**Sampling**")
    with frame:
        c1, c2 = st.columns(2)
        c3, c4 = st.columns(2)
        r = FIELD_RANGES
        c1.number_input(
            "Temperature",
            *r["temperature"],
            float(LIMITS["temperature"].default),
            0.1,
            key=f"temperature_{side}",
            help="0 = always the most likely token",
        )
        c2.number_input("Top-k", *r["top_k"], 0, 1, key=f"top_k_{side}", help="0 = off")
        c3.number_input("Top-p", *r["top_p"], 1.0, 0.05, key=f"top_p_{side}", help="1 = off")
        c4.number_input("Max new tokens", *r["max_new_tokens"], 300, 50, key=f"max_new_tokens_{side}")
        d1, d2 = st.columns(2)
        d1.number_input(
            "Repetition penalty",
            *r["repetition_penalty"],
            1.0,
            0.05,
            key=f"repetition_penalty_{side}",
            help=">1 discourages repeats",
        )
        d2.text_input("Seed", key=f"seed_{side}", placeholder="random", help="same seed, same text")
        st.text_area(
            "Stop strings",
            key=f"stop_{side}",
            height=68,
            placeholder="one per line; \\n is a newline",
            help="generation ends before the first of these; one per line, \\n for a newline",
        )
    try:
        return read_sampling(side)
    except SamplingError as e:
        st.error(f"Bad setting: {e}")
        return None


def read_sampling(side: str) -> SamplingParams:
    """The SamplingParams one side's widgets hold (read from the session, as callbacks see them too);
    SamplingError names a bad one."""
    return sampling_from_fields(lambda name: st.session_state[f"{name}_{side}"])


if __name__ == "__main__":
    main()
