"""`quill`: one console command, each subcommand a thin call into the library.

Errors the user can fix (bad config, missing file, bad sampling value) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

import torch

COMMANDS: dict[str, Callable[[argparse.Namespace], int | None]] = {}


def command(name: str):
    def register(fn):
        COMMANDS[name] = fn
        return fn

    return register


def _user_errors() -> tuple[type[BaseException], ...]:
    from quillgpt.checkpoint import CheckpointError
    from quillgpt.config import ConfigError
    from quillgpt.generate import SamplingError
    from quillgpt.tokenizer import TokenizerError

    errors: list[type[BaseException]] = [CheckpointError, ConfigError, SamplingError, TokenizerError, OSError]
    try:
        from quillgpt.data import DataError

        errors.append(DataError)
    except ImportError:  # pragma: no cover
        pass
    try:
        from quillgpt.train import TrainError

        errors.append(TrainError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None)


def sampling_params(args: argparse.Namespace):
    from quillgpt.generate import SamplingParams

    return SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        stop=tuple(args.stop),
        seed=args.seed,
    )


@command("generate")
def cmd_generate(args: argparse.Namespace) -> int:
    from quillgpt.checkpoint import load_model
    from quillgpt.device import resolve_device
    from quillgpt.generate import generate, stream

    params = sampling_params(args)
    loaded = load_model(args.model, device=resolve_device(args.device))
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


@command("info")
def cmd_info(args: argparse.Namespace) -> int:
    from quillgpt.checkpoint import load_model

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


@command("init")
def cmd_init(args: argparse.Namespace) -> int:
    from quillgpt.checkpoint import save_model
    from quillgpt.config import load_train_config
    from quillgpt.model import GPT
    from quillgpt.tokenizer import BPETokenizer, CharTokenizer

    cfg = load_train_config(args.config, args.set)
    if cfg.encode is not None:
        tokenizer = CharTokenizer.from_maps(cfg.encode, cfg.decode)
    elif args.chars is not None:
        tokenizer = CharTokenizer(sorted(set(args.chars)))
    elif cfg.tokenizer == "gpt2" and args.gpt2_dir:
        tokenizer = BPETokenizer.from_gpt2_files(f"{args.gpt2_dir}/vocab.json", f"{args.gpt2_dir}/merges.txt")
    else:
        tokenizer = CharTokenizer([chr(i) for i in range(32, 127)] + ["\n"])
    cfg.model.vocab_size = max(cfg.model.vocab_size if cfg.vocab_size else 0, tokenizer.vocab_size)
    torch.manual_seed(cfg.seed)
    model = GPT(cfg.model)
    save_model(args.out, model, tokenizer, provenance={"init": "random", "seed": cfg.seed})
    print(f"wrote a randomly initialised model ({model.num_params():,} parameters) to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quill", description="QuillGPT: train, run and serve small GPTs.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="generate text from a model")
    p.add_argument("--model", default="shakespeare-char", help="bundled model name or model directory")
    p.add_argument("--prompt", default="", help="text to continue (empty: the tokenizer's start token)")
    add_sampling_args(p)
    p.add_argument("--device", default="auto")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True)

    p = sub.add_parser("info", help="parameters, config and provenance of a model")
    p.add_argument("model")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("init", help="write a randomly initialised model (for tests and benchmarks)")
    p.add_argument("--config", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--chars", default=None, help="build a char tokenizer from these characters")
    p.add_argument("--gpt2-dir", default=None, help="folder with GPT-2's vocab.json and merges.txt")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args) or 0
    except _user_errors() as e:
        print(f"quill {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"quill {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
