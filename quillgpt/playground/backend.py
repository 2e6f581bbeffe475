"""What every playground backend gives the page: models, their cards, and streamed `Chunk`s of text.

Two backends implement `Backend`: `LocalBackend` (quillgpt/playground/local.py) runs models in this
process; `ApiBackend` (quillgpt/playground/api.py) asks a running `quill serve`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from quillgpt.checkpoint import DEFAULT_MODELS
from quillgpt.sampling import SamplingParams

TOP_ALTERNATIVES = 5  # alternatives shown per token (OpenAI's completions API allows at most 5)


class BackendError(RuntimeError):
    """A problem the user can fix: a missing model, an unreachable API, a prompt the model cannot read."""


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


class BackgroundStream:
    """A backend's stream, read in a thread of its own while the page draws what has arrived.

    Streamlit's script thread sends each update to the browser; reading the stream in that thread
    would make the model wait for every update. Here the model decodes without pausing, and the page
    takes whatever has come in since its last update (`take`), as often as it draws. An error in the
    stream comes out of `take`, after the chunks before it. `close` stops it after the current step.
    """

    def __init__(self, chunks: Iterator[Chunk], wake: threading.Event | None = None):
        """`wake` is set when the first chunk arrives and when the stream ends (one event can serve many
        streams). Not per chunk: a page thread woken for every token takes the interpreter from the
        model's thread hundreds of times a second, and it only draws every so often anyway."""
        self._chunks = chunks
        self._lock = threading.Lock()
        self._ready: list[Chunk] = []
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self.wake = wake or threading.Event()
        self.done = False
        """True once every chunk has been taken (and any error raised)."""
        self._ended = False
        self._thread = threading.Thread(target=self._read, name="quill-stream", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for n, chunk in enumerate(self._chunks):
                with self._lock:
                    self._ready.append(chunk)
                if n == 0:
                    self.wake.set()
                if self._stop.is_set():
                    break
        except BaseException as e:  # handed to the page's thread, which shows it
            self._error = e
        finally:
            close = getattr(self._chunks, "close", None)
            if close is not None:
                close()  # here, in the thread that runs it: its clean-up (torch threads) happens here too
            with self._lock:
                self._ended = True
            self.wake.set()

    def take(self) -> list[Chunk]:
        """The chunks that arrived since the last call (maybe none); raises the stream's error after them.

        The call that hands over the last chunks of a stream that ended well also sets `done`, so the
        page finishes at once rather than one more wait later. With an error to come, `wake` stays set
        and the next call raises it."""
        with self._lock:
            ready, self._ready = self._ready, []
            ended = self._ended
        if ended and ready and self._error is not None:
            self.wake.set()
        elif ended:
            self.done = True
            if self._error is not None:
                error, self._error = self._error, None
                raise error
        return ready

    def close(self, timeout: float | None = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)


def default_first(names: list[str]) -> list[str]:
    """`names` with the default models (`shakespeare-char` first) ahead of the rest, the rest in order:
    the page opens on the model the README names, however it is launched."""
    defaults = [n for n in DEFAULT_MODELS if n in names]
    return [*defaults, *(n for n in names if n not in defaults)]


def provenance_facts(prov: dict[str, Any]) -> dict[str, str]:
    facts: dict[str, str] = {}
    data, sha = prov.get("dataset") or prov.get("data"), prov.get("data_sha256")
    if isinstance(data, dict):  # a dataset described by its fields rather than named
        data, sha = data.get("name") or data.get("dataset") or data.get("path"), sha or data.get("sha256")
    if data:
        facts["Training data"] = f"{data}" + (f" (sha256 {str(sha)[:12]}…)" if sha else "")
    if isinstance(prov.get("val_loss_full_split"), int | float):  # every token of the split
        facts["Val loss"] = f"{prov['val_loss_full_split']:.4f} nats/token (whole split)"
    elif isinstance(prov.get("val_loss"), int | float):  # the training loop's estimate
        facts["Val loss"] = f"{prov['val_loss']:.4f} nats/token"
    if isinstance(prov.get("val_bits_per_byte"), int | float):  # the figure that compares across tokenizers
        facts["Val bits per byte"] = f"{prov['val_bits_per_byte']:.4f}"
    if isinstance(prov.get("steps"), int):
        facts["Training steps"] = f"{prov['steps']:,}"
    if isinstance(prov.get("tokens"), int | float):
        facts["Tokens seen"] = human_count(prov["tokens"])
    if isinstance(prov.get("wall_time_s"), int | float):
        facts["Training time"] = _duration(prov["wall_time_s"])
    return facts


def human_count(n: float) -> str:
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
