"""`quill`: one console command, each subcommand a thin call into the library.

Errors the user can fix (bad config, missing file, bad sampling value) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from quillgpt.checkpoint import CheckpointError, add_weights_flags, default_model, load_model, save_model
from quillgpt.config import ConfigError, load_train_config, parse_overrides, train_config_from_dict
from quillgpt.data import REGISTRY, VAL_SPLITS, DataError, cache_dir, get_dataset, load_text
from quillgpt.device import resolve_device
from quillgpt.evaluate import ADAPT_LR, LAYOUTS, SPLITS, check_options, evaluate, own_val_split
from quillgpt.fileio import write_json
from quillgpt.generate import generate, stream
from quillgpt.interop import EXPORT_FORMATS, IMPORT_FORMATS, export_model, import_model
from quillgpt.model import GPT
from quillgpt.playground.launch import launch
from quillgpt.recipe import TextStats, describe, learn_from_run, recipe
from quillgpt.rundir import PLAN_FILE, RUNS_DIR, train_config_path
from quillgpt.sampling import LIMITS, SamplingError, sampling_params
from quillgpt.tokenizer import TokenizerError
from quillgpt.train import TrainError, train
from quillgpt.vocab import build_tokenizer

INIT_CHARS = [chr(i) for i in range(32, 127)] + ["\n"]
"""`quill init`'s vocabulary when no other is given: printable ASCII and the newline."""

Flags = Callable[[argparse.ArgumentParser], None]
Command = Callable[[argparse.Namespace], int | None]
COMMANDS: dict[str, tuple[str, Flags, Command]] = {}
"""The command table: subcommand name → (help, the function adding its flags, the function running it)."""
USER_ERRORS = (CheckpointError, ConfigError, DataError, SamplingError, TokenizerError, TrainError, OSError)
"""Errors the user can fix: one line on stderr and exit code 2."""


def command(name: str, help: str, flags: Flags):
    """Register a subcommand; its flags are declared by `flags`, written just above it."""

    def register(fn: Command) -> Command:
        COMMANDS[name] = (help, flags, fn)
        return fn

    return register


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """Flags for `SamplingParams`; unset ones (None) take the defaults of `quillgpt.sampling.LIMITS`."""
    default = {name: limit.default for name, limit in LIMITS.items()}
    p.add_argument("--max-new-tokens", type=int, help=f"tokens to generate (default {default['max_new_tokens']})")
    p.add_argument("--temperature", type=float, help=f"0 = greedy (default {default['temperature']:g})")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float, help=f"nucleus sampling (default {default['top_p']:g}: off)")
    p.add_argument("--repetition-penalty", type=float, help="> 1 discourages repeats (default 1: off)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--seed", type=int)


def generate_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="bundled model name or model directory (default: the bundled one)")
    p.add_argument("--prompt", default="", help="text to continue (empty: the tokenizer's start token)")
    add_sampling_args(p)
    p.add_argument("--device", default="auto")
    add_weights_flags(p, "auto")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True)


@command("generate", "generate text from a model", generate_flags)
def cmd_generate(args: argparse.Namespace) -> int:
    params = sampling_params(vars(args))
    loaded = load_model(args.model or default_model(), device=resolve_device(args.device), weights=args.weights)
    if args.stream:
        sys.stdout.write(args.prompt)
        for piece in stream(loaded.model, loaded.tokenizer, args.prompt, params):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    else:
        (completion,) = generate(loaded.model, loaded.tokenizer, args.prompt, params)
        print(args.prompt + completion.text)
    return 0


def info_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("model")
    p.add_argument("--json", action="store_true")


@command("info", "parameters, config and provenance of a model", info_flags)
def cmd_info(args: argparse.Namespace) -> int:
    loaded = load_model(args.model)
    info = {
        "path": str(loaded.path),
        "parameters": loaded.model.num_params(),
        "tokenizer": {"type": loaded.tokenizer.to_spec()["type"], "vocab_size": loaded.tokenizer.vocab_size},
        "config": loaded.model.config.to_dict(),
        "provenance": loaded.provenance,
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{loaded.name}: {info['parameters']:,} parameters ({loaded.path})")
    print(f"tokenizer: {info['tokenizer']['type']}, {info['tokenizer']['vocab_size']} tokens")
    print("config:     " + ", ".join(f"{k}={v}" for k, v in info["config"].items()))
    if loaded.provenance:
        print("provenance: " + ", ".join(f"{k}={v}" for k, v in loaded.provenance.items()))
    return 0


def init_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--chars", default=None, help="build a char tokenizer from these characters")
    p.add_argument("--gpt2-dir", default=None, help="folder with GPT-2's vocab.json and merges.txt")


@command("init", "write a randomly initialised model (for tests and benchmarks)", init_flags)
def cmd_init(args: argparse.Namespace) -> int:
    cfg = load_train_config(args.config, args.set)
    chars = sorted(set(args.chars)) if args.chars is not None else None
    if chars is None and not (cfg.tokenizer == "gpt2" and args.gpt2_dir):
        chars = INIT_CHARS  # there is no text to take characters from or train a BPE on
    tokenizer = build_tokenizer(cfg, chars=chars, gpt2_dir=args.gpt2_dir)
    cfg.model.vocab_size = max(cfg.model.vocab_size if cfg.vocab_size else 0, tokenizer.vocab_size)
    torch.manual_seed(cfg.seed)
    model = GPT(cfg.model)
    save_model(args.out, model, tokenizer, provenance={"init": "random", "seed": cfg.seed})
    print(f"wrote a randomly initialised model ({model.num_params():,} parameters) to {args.out}")
    return 0


def train_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "config",
        nargs="?",
        help="JSON training config (see configs/); none: the automatic recipe (or, with --resume, the run's)",
    )
    p.add_argument("--data", default=None, help="text file, folder of .txt files or dataset name")
    p.add_argument("--minutes", type=float, default=None, help="without a config: the time budget (default 20)")
    p.add_argument("--out", default=None, help="output model directory (default runs/<config or data name>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly")
    p.add_argument("--overwrite", action="store_true", help="replace a previous run in --out")
    p.add_argument("--init-from", default=None, help="start from this model's weights (fine-tuning)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")


@command("train", "train a model from a JSON config, or sized for a text and a time budget", train_flags)
def cmd_train(args: argparse.Namespace) -> int:
    on_step = None
    if args.config is None and args.resume and args.out is not None:  # a run continues with its own config
        args.config = str(train_config_path(Path(args.out)))
    if args.config is not None:
        if args.minutes is not None:
            raise ConfigError("--minutes sizes the automatic recipe; with a config, use --set max_minutes=N")
        cfg = load_train_config(args.config, args.set)
        out = args.out or f"{RUNS_DIR}/{Path(args.config).stem}"
    else:
        cfg, out, plan = recipe_for_args(args)
        if not args.resume:  # the plan beside the run, written once the run has started (not over a refused one's)
            on_step = _save_plan_once(Path(out) / PLAN_FILE, plan)
    s = train(
        cfg, out, data=args.data, resume=args.resume, overwrite=args.overwrite, init_from=args.init_from,
        on_step=on_step,
    )  # fmt: skip
    if int(os.environ.get("RANK", "0")) == 0:
        if on_step is not None and not s.interrupted and (compiled := learn_from_run(Path(out), cfg)):
            runs = f"{compiled.runs} run{'s' if compiled.runs > 1 else ''}"
            print(f"compiling, kept for the next plans here: ×{compiled.speedup:.2f} the eager rate after "
                  f"{compiled.start_s:.0f} s (the median of {runs})")  # fmt: skip
        best = f"{s.best_val_loss:.4f}" if s.best_val_loss is not None else "n/a"
        if s.full_val_loss is not None:
            best += f" (whole val split: {s.full_val_loss:.4f})"
        mfu = f", MFU {s.mfu:.1%}" if s.mfu is not None else ""
        state = "interrupted; resume with --resume" if s.interrupted else "done"
        print(
            f"{state}: {s.steps} steps, best val loss {best}, {s.tokens:,} tokens in {s.wall_time_s / 60:.1f} min "
            f"({s.tokens_per_s:,.0f} tokens/s{mfu}) -> {s.out_dir}"
        )
    return 130 if s.interrupted else 0


def recipe_for_args(args: argparse.Namespace):
    """`quill train --data PATH [--minutes N]`: the recipe's config (and --set on top), printed in one line."""
    if args.data is None:
        raise ConfigError("give a JSON config, or --data PATH (and --minutes N) for the automatic recipe")
    minutes = 20.0 if args.minutes is None else args.minutes
    plan = recipe(TextStats.of(load_text(args.data)), minutes, data_path=str(args.data))
    resolved = {k: v for k, v in plan.config.to_dict().items() if k != "vocab_size"}  # the tokenizer's, later
    cfg = train_config_from_dict(resolved | parse_overrides(args.set))
    if int(os.environ.get("RANK", "0")) == 0:
        print(describe(plan, minutes) + (f" (with {', '.join(args.set)})" if args.set else ""), flush=True)
    saved = plan.to_dict(minutes) | ({"overrides": list(args.set)} if args.set else {})
    return cfg, args.out or f"{RUNS_DIR}/{Path(str(args.data)).stem}-{minutes:g}min", saved


def _save_plan_once(path: Path, plan: dict):
    """An on_step hook that writes `plan` at the first step (rank 0), then does nothing."""
    written = False

    def on_step(step: int, loss: float) -> None:
        nonlocal written
        if not written and int(os.environ.get("RANK", "0")) == 0:
            write_json(path, plan)
        written = True

    return on_step


def data_flags(p: argparse.ArgumentParser) -> None:
    data_sub = p.add_subparsers(dest="data_command", required=True)
    data_sub.add_parser("list", help="registered datasets")
    g = data_sub.add_parser("get", help="download (or copy --from a local path) and verify a dataset")
    g.add_argument("name")
    g.add_argument("--from", dest="source", default=None, help="local file or folder holding the files")


@command("data", "list or fetch registered datasets", data_flags)
def cmd_data(args: argparse.Namespace) -> int:
    if args.data_command == "list":
        for d in REGISTRY.values():
            print(f"{d.name:16} {d.description} [{d.license}]")
            for f in d.files:
                print(f"{'':16}   {f.path}  sha256 {f.sha256[:12]}…  {f.url}")
        print(f"cache: {cache_dir() / 'datasets'}")
        return 0
    folder = get_dataset(args.name, source=args.source)
    print(f"{args.name}: ready in {folder}")
    return 0


def eval_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("model")
    p.add_argument("--data", required=True, help="dataset name, text file or folder")
    p.add_argument("--split", choices=SPLITS, default="val", help="all: the whole text")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument(
        "--val-split",
        choices=VAL_SPLITS,
        default=None,
        help="per_file: the last --val-fraction of each file, scored and reported per file "
        "(default: the model's own split when --data is its training data, else concat)",
    )
    p.add_argument(
        "--layout",
        choices=LAYOUTS,
        default="original",
        help="paragraph: re-flow hard-wrapped paragraphs to one line each before scoring",
    )
    p.add_argument(
        "--stride",
        type=int,
        default=None,
        help="overlapping windows that advance N tokens, so every token after the first window is "
        "predicted from at least context - N tokens, as a compressor would (context / N times the "
        "compute); default: the context length, consecutive windows",
    )
    p.add_argument(
        "--adapt",
        type=float,
        nargs="?",
        const=ADAPT_LR,
        default=None,
        metavar="LR",
        help="dynamic evaluation: after scoring each window, one Adam step on it (learning rate LR, "
        f"default {ADAPT_LR:g}), as an adaptive compressor learns from what it has coded; every text "
        "starts from the model's weights; 2-3x the compute, windows one at a time",
    )
    p.add_argument("--device", default="auto")
    add_weights_flags(p, "float32")
    p.add_argument("--json", action="store_true", help="end with one JSON line")


@command("eval", "loss and bits per byte over a whole split, in consecutive (or --stride) windows", eval_flags)
def cmd_eval(args: argparse.Namespace) -> int:
    loaded = load_model(args.model, device=resolve_device(args.device), weights=args.weights)
    try:
        check_options(loaded.model.config.block_size, args.stride, args.adapt, args.weights, flag="--")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    val_split = args.val_split or own_val_split(loaded.provenance, args.data)
    result = evaluate(
        loaded.model,
        loaded.tokenizer,
        args.data,
        split=args.split,
        val_fraction=args.val_fraction,
        val_split=val_split,
        layout=args.layout,
        stride=args.stride,
        adapt_lr=args.adapt,
    )
    result = {"model": str(loaded.path), "data": str(args.data), **result}
    key = "val_loss" if args.split == "val" else "loss"
    for name, f in result.get("files", {}).items():
        print(f"  {name}: {f['bits_per_byte']:.4f} bits/byte ({f['bytes']:,} bytes)")
    unknown = f", {result['unknown_characters']:,} unknown characters" if result["unknown_characters"] else ""
    print(
        f"{loaded.name} on {args.data} ({args.split}, {val_split}, {args.layout} layout"
        f"{f', stride {args.stride}' if args.stride else ''}"
        f"{f', adapting as it reads with lr {args.adapt:g}' if args.adapt else ''}): "
        f"loss {result[key]:.4f} nats/token, {result['bits_per_char']:.4f} bits/char, "
        f"{result['bits_per_byte']:.4f} bits/byte, {result['tokens']:,} tokens{unknown}"
    )
    if args.json:
        print(json.dumps(result))
    return 0


def import_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("format", choices=IMPORT_FORMATS)
    p.add_argument(
        "sources",
        nargs="+",
        help="quillgpt-v1: CONFIG.json WEIGHTS.pt; nanogpt: ckpt.pt [meta.pkl]; hf-gpt2: a directory",
    )
    p.add_argument("--out", required=True, help="model directory to write")


@command("import", "convert another project's weights into a model directory", import_flags)
def cmd_import(args: argparse.Namespace) -> int:
    out = import_model(args.format, args.sources, args.out)
    print(f"imported {args.format} ({load_model(out).model.num_params():,} parameters) into {out}")
    return 0


def export_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("format", choices=EXPORT_FORMATS)
    p.add_argument("model", help="bundled model name or model directory")
    p.add_argument("--out", required=True, help="hf: a directory; onnx: a .onnx file")


@command("export", "write a model for HuggingFace transformers or ONNX Runtime", export_flags)
def cmd_export(args: argparse.Namespace) -> int:
    loaded = load_model(args.model)
    print(f"exported {loaded.name} to {export_model(args.format, loaded, args.out)}")
    return 0


def serve_flags(p: argparse.ArgumentParser) -> None:
    try:
        from quillgpt.serve.server import add_serve_arguments  # the optional `serve` extra
    except ImportError:  # the `serve` extra is not installed; say so when the command runs
        p.set_defaults(missing_extra="serve")
        return
    add_serve_arguments(p)


@command("serve", "serve models over HTTP (OpenAI-compatible API)", serve_flags)
def cmd_serve(args: argparse.Namespace) -> int:
    if getattr(args, "missing_extra", None):
        print("quill serve: error: the server needs the serve extra: pip install 'quillgpt[serve]'", file=sys.stderr)
        return 2
    from quillgpt.serve.server import serve_from_args  # the optional `serve` extra

    return serve_from_args(args)


def playground_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", action="append", default=[], help="bundled model name or model directory (repeatable)")
    p.add_argument("--api-url", default=None, help="use a running `quill serve` instead of loading models here")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8501)


@command("playground", "the Streamlit playground in a browser", playground_flags)
def cmd_playground(args: argparse.Namespace) -> int:
    return launch(args.model, args.api_url, args.host, args.port)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quill", description="QuillGPT: train, run and serve small GPTs.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help, flags, _) in COMMANDS.items():
        flags(sub.add_parser(name, help=help))
    return parser


def run_with_clear_errors(name: str, fn: Callable[[argparse.Namespace], int | None], args) -> int:
    """Run a command; a user error becomes one line on stderr and exit code 2, not a traceback."""
    try:
        return fn(args) or 0
    except USER_ERRORS as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _, _, run = COMMANDS[args.command]
    return run_with_clear_errors(f"quill {args.command}", run, args)


if __name__ == "__main__":
    sys.exit(main())
