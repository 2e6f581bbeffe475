"""Starting a server: `run(settings)`, and the command-line flags shared by `quill serve` and `main.py`.

Flags override QUILL_* environment variables, which override the defaults of `ServeSettings`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from quillgpt.checkpoint import CheckpointError, add_weights_flags, resolve_model_path
from quillgpt.serve.process import setup_process
from quillgpt.serve.settings import ServeSettings, parse_model_spec


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The serve flags, each defaulting to None so that unset flags leave env/defaults alone."""
    parser.add_argument(
        "--model",
        dest="models",
        action="extend",
        nargs="+",
        metavar="NAME|DIR",
        help="model(s) to serve: bundled name, directory, or ALIAS=NAME|DIR (repeatable; default: the bundled one)",
    )
    parser.add_argument("--host", help="address to bind (default 127.0.0.1; 0.0.0.0 in containers)")
    parser.add_argument("--port", type=int, help="port (default 8080)")
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (prefer QUILL_API_KEY: ps shows flags)")
    parser.add_argument("--workers", type=int, help="server processes, each with its own models (default 1)")
    parser.add_argument("--device", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    add_weights_flags(parser, None)  # the default: ServeSettings.weights
    parser.add_argument("--torch-threads", type=int, help="PyTorch threads (default: cores - 1, at least 1)")
    parser.add_argument("--max-batch", type=int, help="sequences decoded together per model (default 16)")
    parser.add_argument("--queue-size", type=int, help="sequences that may wait per model before 503 (default 128)")
    parser.add_argument("--request-timeout", type=float, help="seconds per request, queueing included (default 120)")
    parser.add_argument(
        "--cors-origin",
        dest="cors_origins",
        action="append",
        metavar="ORIGIN",
        help="allow browser calls from this origin (repeatable)",
    )
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error", "critical"])


def settings_from_args(args: argparse.Namespace) -> ServeSettings:
    """Flags that were given, over the environment (QUILL_*), over the defaults."""
    names = ServeSettings.model_fields
    given = {k: v for k, v in vars(args).items() if k in names and v is not None}
    return ServeSettings(**given)


def check_models(settings: ServeSettings) -> None:
    """Fail before starting the server if a model cannot be found (CheckpointError)."""
    for spec in settings.models:
        resolve_model_path(parse_model_spec(spec)[1])


def run(settings: ServeSettings) -> None:
    """Serve until interrupted. Several workers each load every model (scale-up on one machine)."""
    import uvicorn  # start-up time: `quill` reads this module to build every subcommand's flags

    check_models(settings)
    setup_process(settings)
    options = dict(
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        log_level=settings.log_level,
        timeout_graceful_shutdown=10,
    )
    if settings.workers > 1:
        os.environ.update(settings.to_env())  # each worker process rebuilds the settings from these
        uvicorn.run("quillgpt.serve.app:app_from_env", factory=True, workers=settings.workers, **options)
    else:
        from quillgpt.serve.app import create_app  # start-up time, as uvicorn above

        uvicorn.run(create_app(settings), **options)


def main(argv: Sequence[str] | None = None, prog: str = "quill serve") -> int:
    parser = argparse.ArgumentParser(prog=prog, description="Serve QuillGPT models over HTTP (OpenAI-compatible).")
    add_serve_arguments(parser)
    return serve_from_args(parser.parse_args(argv), prog)


def serve_from_args(args: argparse.Namespace, prog: str = "quill serve") -> int:
    """Run the server from parsed flags; bad settings or models are one line and exit code 2."""
    try:
        run(settings_from_args(args))
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'settings'}: {err['msg']}" for err in e.errors())
        print(f"{prog}: error: {problems}", file=sys.stderr)
        return 2
    except CheckpointError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0
