"""The original QuillGPT's inference entry point, kept for its users: a thin shell over the library.

    python scripts/inference_gpt.py --config_path models/shakespeare-char/config.json \
        --weights_path models/shakespeare-char/model.safetensors --max_length 300 --prompt "ROMEO:"

`--config_path` may also be an original QuillGPT config with `encode`/`decode` maps, and
`--weights_path` a `.pt` state dict (loaded with torch.load(weights_only=True)).
"""

import argparse
import sys

from quillgpt.checkpoint import load_from_train_config
from quillgpt.cli import run_with_clear_errors
from quillgpt.generate import stream
from quillgpt.sampling import sampling_params


def run(args: argparse.Namespace) -> int:
    loaded = load_from_train_config(args.config_path, args.weights_path)
    params = sampling_params(vars(args), max_new_tokens=args.max_length)
    sys.stdout.write(args.prompt)
    for piece in stream(loaded.model, loaded.tokenizer, args.prompt, params):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config_path", required=True)
    p.add_argument("--weights_path", required=True)
    p.add_argument("--max_length", type=int, default=500, help="new tokens to generate")
    p.add_argument("--prompt", default="")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    sys.exit(run_with_clear_errors("inference_gpt", run, p.parse_args()))
