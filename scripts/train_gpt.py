"""The original QuillGPT's training entry point, kept for its users: a thin shell over `quill train`.

    python scripts/train_gpt.py --config_path configs/shakespeare-char.json \
        --data_path ../shared/data/tinyshakespeare/input.txt --output_dir runs --name shakespeare
"""

import argparse
import sys
from pathlib import Path

from quillgpt.cli import main

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config_path", required=True)
    p.add_argument("--data_path", default=None)
    p.add_argument("--output_dir", default="runs")
    p.add_argument("--name", default=None, help="model name: the run goes to OUTPUT_DIR/NAME")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args()
    out = Path(args.output_dir) / (args.name or Path(args.config_path).stem)
    argv = ["train", args.config_path, "--out", str(out)]
    argv += ["--data", args.data_path] if args.data_path else []
    argv += ["--resume"] if args.resume else []
    argv += ["--overwrite"] if args.overwrite else []
    sys.exit(main(argv))
