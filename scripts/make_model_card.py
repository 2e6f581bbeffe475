"""Write a model directory's card (README.md) from what the directory itself records.

    python scripts/make_model_card.py models/shakespeare-char --config configs/shakespeare-char.json \
        --title "Shakespearean GPT" --prompt ROMEO: --prompt JULIET: --prompt "KING HENRY:"

Facts come from config.json (model shape, tokenizer, provenance: data hash, steps, tokens, wall
time, val loss on the whole split) and from the training config; samples are generated at
temperature 0.8 with fixed seeds, so the card is reproducible.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from quillgpt.checkpoint import load_model
from quillgpt.fileio import write_text
from quillgpt.generate import generate
from quillgpt.sampling import SamplingParams


def card(model_dir: Path, config_path: Path, title: str, prompts: list[str], command: str) -> str:
    loaded = load_model(model_dir)
    c, prov = loaded.model.config, loaded.provenance
    train_cfg = json.loads(config_path.read_text(encoding="utf-8"))
    samples = []
    for i, prompt in enumerate(prompts):
        params = SamplingParams(max_new_tokens=300, temperature=0.8, seed=1000 + i)
        (out,) = generate(loaded.model, loaded.tokenizer, prompt, params)
        samples.append(f"**Prompt `{prompt}`** (temperature 0.8, seed {1000 + i})\n\n```\n{prompt}{out.text}\n```")
    shape = f"{c.n_layer} layers, {c.n_embd} wide, {c.n_head} heads of {c.head_dim}, context {c.block_size}"
    options = (
        f"{c.pos_emb} positions, {c.norm}{'' if c.norm_affine else ' (no weights)'}, {c.activation}, "
        f"QK-norm {'on' if c.qk_norm else 'off'}, logit soft-cap {c.logit_softcap}, "
        f"{'tied' if c.tie_embeddings else 'untied'} embeddings, dropout {c.dropout}"
    )
    optimizer = train_cfg.get("optimizer", "adamw")
    minutes = prov.get("wall_time_s", 0) / 60
    lines = [
        f"# {title}",
        "",
        f"A character-level GPT trained from scratch with QuillGPT on 2 CPU cores in {minutes:.0f} minutes.",
        "",
        "| | |",
        "| --- | --- |",
        f"| validation loss (whole split) | **{prov.get('val_loss_full_split', 'n/a')}** nats/char "
        f"({prov.get('val_tokens', 'n/a')} characters, `quill eval`) |",
        f"| parameters | {loaded.model.num_params():,} |",
        f"| shape | {shape} |",
        f"| architecture | {options} |",
        f"| tokenizer | characters, {loaded.tokenizer.vocab_size} of them |",
        f"| data | {prov.get('data')} (sha256 `{prov.get('data_sha256', '')[:16]}…`), {prov.get('split')} |",
        f"| training | {prov.get('steps')} steps, {prov.get('tokens', 0):,} tokens, {minutes:.1f} min wall time "
        f"(best checkpoint), optimizer {optimizer} |",
        "",
        "![loss curve](loss.png)",
        "",
        "## Reproduce",
        "",
        f"```bash\n{command}\n```",
        "",
        "Evaluate:",
        "",
        f"```bash\nquill eval {model_dir} --data tinyshakespeare --json\n```",
        "",
        "## Samples",
        "",
        *samples,
        "",
        "## Training config",
        "",
        f"```json\n{json.dumps(train_cfg, indent=2)}\n```",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", type=Path)
    p.add_argument("--config", type=Path, required=True, help="the training config it was trained with")
    p.add_argument("--title", default=None)
    p.add_argument("--prompt", action="append", default=None)
    p.add_argument("--command", default=None, help="the command that trained it")
    args = p.parse_args()
    command = args.command or f"quill train {args.config} --out {args.model_dir}"
    text = card(args.model_dir, args.config, args.title or args.model_dir.name, args.prompt or ["ROMEO:"], command)
    write_text(args.model_dir / "README.md", text)
    print(f"wrote {args.model_dir / 'README.md'}")


if __name__ == "__main__":
    main()
