"""What the user types: the page's settings (arguments after `--`, or the environment), stop strings, seeds."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from quillgpt.playground.backend import BackendError
from quillgpt.sampling import SamplingError, SamplingParams, sampling_params


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


# The sampling fields' bounds: the page's number widgets keep to them, and its route checks them.
FIELD_RANGES: dict[str, tuple[int, int] | tuple[float, float]] = {
    "temperature": (0.0, 5.0),
    "top_k": (0, 1_000_000),
    "top_p": (0.0, 1.0),
    "max_new_tokens": (1, 5000),
    "repetition_penalty": (0.0, 10.0),
}


def sampling_from_fields(field_value: Callable[[str], object]) -> SamplingParams:
    """The SamplingParams one side's sampling fields hold, each read by name: numbers as the page's
    widgets keep them, or text as the browser shows them (the page's script sends those); stop strings
    and seed are text. SamplingError names a bad one."""

    def number(name: str) -> int | float:
        value, (low, high) = field_value(name), FIELD_RANGES[name]
        kind = type(low)
        label = name.replace("_", " ")
        try:
            n = kind(value)
        except (TypeError, ValueError, OverflowError):
            raise SamplingError(f"{label} must be a {'whole ' if kind is int else ''}number, got {value!r}") from None
        if not low <= n <= high:  # NaN too
            raise SamplingError(f"{label} must be from {low} to {high}, got {value!r}")
        return n

    return sampling_params(
        dict(
            max_new_tokens=number("max_new_tokens"),
            temperature=number("temperature"),
            top_k=number("top_k") or None,
            top_p=number("top_p"),
            repetition_penalty=number("repetition_penalty"),
            stop=parse_stop_strings(str(field_value("stop"))),
            seed=parse_seed(str(field_value("seed"))),
        )
    )


def describe(p: SamplingParams) -> str:
    """The settings of a result, in a line: "temperature 0.8 · top-k 40 · seed 1"."""
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
