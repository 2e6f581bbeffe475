"""What the user types: the page's settings (arguments after `--`, or the environment), stop strings, seeds."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field

from quillgpt.playground.backend import BackendError
from quillgpt.sampling import SamplingError


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
