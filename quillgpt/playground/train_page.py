"""The Train mode of the playground: a text and minutes in, a model out, the learning in between.

Runs are `quill train` processes that quillgpt/playground/training.py starts, stops and reads back;
this file only draws them. While a run trains, its panel redraws itself every REFRESH_SECONDS (a
Streamlit fragment), so the rest of the page stays still; a refresh or a new tab finds the run again.
Watching must cost the run little (the page, the browser and the run share the same cores): a look
reads only what metrics.jsonl gained since the last one, and the loss chart keeps its spec and sends
its points as a table (Streamlit's dataset), so the browser swaps the data of the chart it has
instead of building a new one, and a look that adds no point changes nothing there.
"""

from __future__ import annotations

import math
from pathlib import Path

import altair as alt
import pandas as pd
import streamlit as st

from quillgpt.checkpoint import CONFIG_FILE
from quillgpt.data import REGISTRY
from quillgpt.playground.backend import human_count
from quillgpt.playground.training import (
    MAX_UPLOAD_MB,
    MINUTES,
    RunStatus,
    TrainingError,
    active_run,
    list_runs,
    resume,
    runs_dir,
    sample,
    save_upload,
    start,
    status,
    stop,
)

# How often a training run's panel redraws itself, and the most points its loss chart draws (per
# CHART_POINTS planned steps, one point every step; more steps thin it to every 2nd, 4th, ... step).
REFRESH_SECONDS = 5.0
CHART_POINTS = 300
DATASET, UPLOAD = "A registered dataset", "Upload a .txt file"


def train_page() -> None:
    runs = runs_dir()
    st.header("Train a GPT on your text")
    form, panel = st.columns([1, 2], gap="large")
    with form:
        new_run_form(runs)
    with panel:
        run = current_run(runs)
        if run is None:
            st.info(
                "No run yet. Choose a text and a time budget, then press **Train**: the recipe sizes the "
                "model for both, and the run trains in its own process, here or with the tab closed."
            )
        else:
            run_panel(run)


def current_run(runs: Path) -> Path | None:
    """The run this session started or picked; else the one training now; else the newest."""
    chosen = st.session_state.get("train_run")
    if chosen and Path(chosen).is_dir():
        return Path(chosen)
    return active_run(runs) or next(iter(list_runs(runs)), None)


def new_run_form(runs: Path) -> None:
    st.subheader("New run")
    source = st.radio("Text", [DATASET, UPLOAD], key="train_source", horizontal=True)
    upload = name = None
    if source == DATASET:
        names = [n for n, d in REGISTRY.items() if any(f.path.endswith(".txt") for f in d.files)]
        name = st.selectbox("Dataset", names, key="train_dataset")
        st.caption(REGISTRY[name].description)
    else:
        upload = st.file_uploader(
            f"Your text: a .txt file of UTF-8 text, up to {MAX_UPLOAD_MB} MB",
            type=["txt"],
            key="train_upload",
            help="stored under the runs directory with a generated name; the last 10% validates",
        )
    minutes = st.radio(
        "Minutes of training", MINUTES, index=1, key="train_minutes", horizontal=True, format_func=lambda m: f"{m}"
    )
    if st.button("Train", type="primary", key="train_start", width="stretch"):
        try:
            if busy := active_run(runs):
                raise TrainingError(f"{busy.name} is still training: stop it, or wait for it to finish, first.")
            if source == UPLOAD:
                if upload is None:
                    raise TrainingError("Choose a .txt file to upload first.")
                data, label = save_upload(upload.getvalue(), runs), Path(upload.name).stem
            else:
                data, label = name, name
            run = start(data, minutes, runs, label=label)
        except TrainingError as e:
            st.error(str(e))
        else:
            st.session_state.train_run = str(run)
            st.rerun()
    st.caption(
        "The recipe picks the tokenizer, the model's size, dropout and the schedule for the text and the "
        "minutes (docs/results.md, *Recipe rules*); `quill train --data FILE --minutes N` does the same."
    )


def run_panel(run: Path) -> None:
    others = [str(r) for r in list_runs(run.parent)]
    if len(others) > 1 and str(run) in others:
        picked = st.selectbox("Run", others, index=others.index(str(run)), format_func=lambda p: Path(p).name)
        if picked != str(run):
            st.session_state.train_run = picked
            run = Path(picked)
    s = status(run)
    if s.active:
        live_run(run)
    else:
        show_run(s)
    run_buttons(s)


@st.fragment(run_every=REFRESH_SECONDS)
def live_run(run: Path) -> None:
    s = status(run)
    show_run(s)
    if not s.active:  # finished or stopped: the whole page changes (buttons, the model picker)
        st.rerun()


def show_run(s: RunStatus) -> None:
    st.subheader(s.run.name)
    if s.recipe:
        st.caption(s.recipe)
    if s.state == "starting":
        st.progress(0.0, text="Starting: reading the text, building the tokenizer and the model…")
    elif s.state == "running":
        left = s.seconds_left
        st.progress(s.fraction, text=f"Training: {s.fraction:.0%}" + (f", {_clock(left)} left" if left else ""))
    elif s.state == "finished":
        val = f": validation loss {s.final_val:.4f} on the whole split" if s.final_val is not None else ""
        st.progress(1.0, text=f"Finished{val}")
        st.success("The model is in the model picker (Generate): press **Generate with this model**.")
    elif s.state == "stopped":
        st.progress(s.fraction, text=f"Stopped at step {s.step:,} ({s.fraction:.0%})")
        st.warning("Stopped: the model so far is kept. **Resume** continues the run where it stopped.")
    else:
        st.error("The run failed. The end of its log:")
        st.code(s.log_tail or "(no output)", language=None)
    c1, c2, c3, c4 = st.columns(4)
    c1.metric("Step", f"{s.step:,}")
    c2.metric("Tokens seen", human_count(s.tokens))
    c3.metric("Parameters", human_count(s.parameters) if s.parameters else "–")
    val = s.evals[-1]["eval"]["val"] if s.evals else None
    c4.metric("Val loss", f"{val:.4f}" if val is not None else "–", help="the latest evaluation, on 10–20 batches")
    if s.steps:
        loss_chart(s)
    if (model := s.model_dir) is not None:
        sample_panel(s, model)


def sample_panel(s: RunStatus, model: Path) -> None:
    """A sample from the best model so far. While the run trains, only when asked: generating takes the
    cores the run trains on, and sampling each new best model on its own slowed a watched run
    (docs/results.md, "Recipe: planned against seen")."""
    st.markdown("**Sample** from the best model so far")
    saved = (model / CONFIG_FILE).stat().st_mtime  # which save of the model: a new one samples anew
    if s.active:
        asked = f"sample_asked_{s.run.name}"  # the save sampled when Sample now was last pressed
        if st.button("Sample now", key=f"sample_{s.run.name}", help="takes the run's cores for a moment"):
            st.session_state[asked] = saved
        if asked not in st.session_state:
            st.caption("Press **Sample now** to read what the model writes at this point.")
            return
        saved = st.session_state[asked]
    st.code(_sample(str(model), saved), language=None, wrap_lines=True)


def loss_chart(s: RunStatus) -> None:
    """Training loss per step (smoothed) and the validation loss at each evaluation."""
    rows, ema = [], None
    every = 1 << max(0, math.ceil(math.log2(max(len(s.steps), 1) / CHART_POINTS)))  # changes seldom: powers of 2
    for r in s.steps:
        ema = r["loss"] if ema is None else 0.9 * ema + 0.1 * r["loss"]
        if r["step"] % every == 0:
            rows.append({"step": r["step"], "loss": ema, "series": "train (smoothed)"})
    rows += [{"step": e["step"], "loss": e["eval"]["val"], "series": "validation"} for e in s.evals]
    rows.sort(key=lambda r: r["step"])  # points once drawn stay as they are: the table only grows
    base = alt.Chart(pd.DataFrame(rows, columns=["step", "loss", "series"]), height=260).encode(
        x=alt.X("step:Q", title="step"),
        y=alt.Y("loss:Q", title="loss (nats/token)", scale=alt.Scale(zero=False)),
        color=alt.Color("series:N", title=None, legend=alt.Legend(orient="top")),
    )
    train = base.mark_line().transform_filter(alt.datum.series != "validation")
    val = base.mark_line(point=alt.OverlayMarkDef(size=40, filled=True)).transform_filter(
        alt.datum.series == "validation"
    )
    st.altair_chart(train + val, width="stretch")


@st.cache_data(max_entries=4, show_spinner=False)
def _sample(path: str, stamp: float) -> str:
    """A sample of the model saved at `path`; `stamp` (its config's mtime) makes a new save sample anew."""
    return sample(Path(path))


def run_buttons(s: RunStatus) -> None:
    c1, c2, c3 = st.columns(3)
    if s.active:
        c1.button("Stop training", key="train_stop", on_click=stop, args=(s.run,), help="saves the model and stops")
    if s.resumable and c2.button("Resume", key="train_resume"):
        try:
            resume(s.run)
        except TrainingError as e:
            st.error(str(e))
        else:
            st.rerun()
    if (model := s.model_dir) is not None and not s.active:
        c3.button("Generate with this model", key="train_generate", on_click=_open_in_generate, args=(str(model),))


def _open_in_generate(model: str) -> None:
    st.session_state.mode = "Generate"
    st.session_state.model_a = model


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}:{s:02d}"
