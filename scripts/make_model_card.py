"""Write a model directory's card (README.md) from what the directory itself records.

    python scripts/make_model_card.py models/shakespeare-char --config configs/shakespeare-char.json \
        --title "Shakespearean GPT" --prompt ROMEO: --prompt JULIET: --prompt "KING HENRY:"
    python scripts/make_model_card.py models/harpoon --config configs/harpoon.json --title "Harpoon GPT" \
        --prompt $'CHAPTER I\n\n' --prompt "The sea was" --layouts

Facts come from config.json (model shape, tokenizer, provenance: data hash, split, steps, tokens,
wall time, the whole-split validation loss), metrics.jsonl (the whole run's wall time) and the
training config; with `--layouts` the card scores the validation text again, book by book, as
stored and re-flowed to one paragraph per line (`quill eval --layout`). Samples are generated at
temperature 0.8 with fixed seeds, so the card is reproducible.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from safetensors import safe_open

from quillgpt.checkpoint import WEIGHTS_FILE, LoadedModel, load_model
from quillgpt.data import default_prompt
from quillgpt.evaluate import LAYOUTS, evaluate, own_val_split
from quillgpt.fileio import write_text
from quillgpt.generate import generate
from quillgpt.rundir import read_metrics
from quillgpt.sampling import SamplingParams
from quillgpt.tokenizer import CharTokenizer


def describe_tokenizer(tokenizer) -> tuple[str, str]:
    """(what kind of model, the tokenizer row) for the card."""
    if isinstance(tokenizer, CharTokenizer):
        unk = ", the last the unknown-character token" if tokenizer.unk_id is not None else ""
        return "character-level", f"characters, {tokenizer.vocab_size} of them{unk}"
    return "byte-level BPE", f"byte-level BPE, {tokenizer.vocab_size:,} tokens, trained on the training split"


def sentence(text: str) -> str:
    return text[:1].upper() + text[1:] + "."


def describe_storage(weights: Path) -> str:
    """How the weights file stores them (`save_dtype`), and its size."""
    with safe_open(weights, "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    size = f"{weights.stat().st_size / 1e6:.1f} MB"
    if "I8" in dtypes:
        return f"the weights are stored as int8 rows, a float32 scale each (`save_dtype`, {size}), loaded into float32"
    if dtypes == {"BF16"}:
        return f"the weights are stored in bfloat16 (`save_dtype`, {size}) and load into float32"
    return f"the weights are stored in float32 ({size})"


def whole_run_minutes(model_dir: Path) -> float | None:
    """The last logged step's time (metrics.jsonl), which may be after the best checkpoint."""
    steps = read_metrics(model_dir).steps
    return steps[-1]["time_s"] / 60 if steps else None


def layout_table(loaded: LoadedModel) -> list[str]:
    """Bits per byte of each validation piece, as stored and re-flowed (`quill eval --layout`)."""
    prov = loaded.provenance
    scores = {
        layout: evaluate(
            loaded.model,
            loaded.tokenizer,
            prov["data"],
            "val",
            val_split=own_val_split(prov, prov["data"]),
            layout=layout,
        )
        for layout in LAYOUTS
    }
    rows = [
        "| validation text | bytes | bits/byte, as stored | bits/byte, one paragraph per line |",
        "| --- | ---: | ---: | ---: |",
    ]
    files = {layout: s.get("files", {prov["data"]: s}) for layout, s in scores.items()}
    for name, a in files["original"].items():
        b = files["paragraph"][name]
        rows.append(f"| {name} | {a['bytes']:,} | {a['bits_per_byte']:.3f} | {b['bits_per_byte']:.3f} |")
    a, b = scores["original"], scores["paragraph"]
    rows.append(f"| **all** | {a['bytes']:,} | **{a['bits_per_byte']:.3f}** | **{b['bits_per_byte']:.3f}** |")
    return rows


def card(
    model_dir: Path, config_path: Path, title: str, prompts: list[str], command: str, layouts: bool = False
) -> str:
    loaded = load_model(model_dir)
    c, prov = loaded.model.config, loaded.provenance
    train_cfg = json.loads(config_path.read_text(encoding="utf-8"))
    kind, tokenizer_row = describe_tokenizer(loaded.tokenizer)
    samples = []
    for i, prompt in enumerate(prompts):
        params = SamplingParams(max_new_tokens=300, temperature=0.8, seed=1000 + i)
        (out,) = generate(loaded.model, loaded.tokenizer, prompt, params)
        samples.append(f"**Prompt `{prompt!r}`** (temperature 0.8, seed {1000 + i})\n\n```\n{prompt}{out.text}\n```")
    shape = f"{c.n_layer} layers, {c.n_embd} wide, {c.n_head} heads of {c.head_dim}, context {c.block_size}"
    options = (
        f"{c.pos_emb} positions, {c.norm}{'' if c.norm_affine else ' (no weights)'}, {c.activation}, "
        f"QK-norm {'on' if c.qk_norm else 'off'}, logit soft-cap {c.logit_softcap}, "
        f"{'tied' if c.tie_embeddings else 'untied'} embeddings, dropout {c.dropout}"
    )
    optimizer = train_cfg.get("optimizer", "adamw")
    best = prov.get("wall_time_s", 0) / 60
    whole = whole_run_minutes(model_dir)
    if whole is None:
        run = f"{best:.1f} minutes of training"
    elif whole - best < 0.1:
        run = f"a {whole:.1f}-minute run, whose last checkpoint was also its best and is what ships"
    else:
        run = (
            f"a {whole:.1f}-minute run whose best checkpoint (by the run's own validation estimate) came at "
            f"{best:.1f} minutes and is what ships"
        )
    extras = []
    if prov.get("ema_decay"):
        extras.append(f"the weights are an exponential moving average (`ema_decay` {prov['ema_decay']})")
    if train_cfg.get("dtype") == "bfloat16":
        extras.append("the matmuls ran in bfloat16 (`dtype`)")
    extras.append(describe_storage(model_dir / WEIGHTS_FILE))
    if prov.get("reflow_fraction"):
        extras.append(
            f"{prov['reflow_fraction']:.0%} of the training text was re-flowed to one paragraph per line "
            "(`reflow_fraction`), so it reads both layouts"
        )
    bpb = prov.get("val_bits_per_byte")
    validation = (
        f"**{bpb}** bits/byte, {prov.get('val_loss_full_split')} nats/token "
        if bpb is not None
        else f"**{prov.get('val_loss_full_split', 'n/a')}** nats/token "
    )
    lines = [
        f"# {title}",
        "",
        f"A {kind} GPT trained from scratch with QuillGPT on 2 CPU cores: {run}."
        + (" " + sentence("; ".join(extras)) if extras else ""),
        "",
        "| | |",
        "| --- | --- |",
        f"| validation (whole split) | {validation}({prov.get('val_tokens', 'n/a'):,} tokens, `quill eval`) |",
        f"| parameters | {loaded.model.num_params():,} |",
        f"| shape | {shape} |",
        f"| architecture | {options} |",
        f"| tokenizer | {tokenizer_row} |",
        f"| data | {prov.get('data')} (sha256 `{prov.get('data_sha256', '')[:16]}…`), {prov.get('split')} |",
        f"| training | {prov.get('steps')} steps, {prov.get('tokens', 0):,} tokens, {best:.1f} min wall time "
        f"at the best checkpoint, optimizer {optimizer} |",
        "",
        "![loss curve](loss.png)",
        "",
    ]
    if layouts:
        lines += [
            "## Bits per byte, book by book",
            "",
            "Every byte of each validation piece paid for (the first token of each is context). Both layouts "
            "score the same text; the second re-flows hard-wrapped paragraphs to one line each "
            "(`quill eval --layout paragraph`).",
            "",
            *layout_table(loaded),
            "",
        ]
    lines += [
        "## Reproduce",
        "",
        f"```bash\n{command}\n```",
        "",
        "Evaluate:",
        "",
        f"```bash\nquill eval {model_dir} --data {prov.get('data')} --json\n"
        + (f"quill eval {model_dir} --data {prov.get('data')} --layout paragraph --json\n" if layouts else "")
        + "```",
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
    p.add_argument("--prompt", action="append", default=None, help="(default: the model's default prompt)")
    p.add_argument("--command", default=None, help="the command that trained it")
    p.add_argument("--layouts", action="store_true", help="score the validation text per file in both layouts")
    args = p.parse_args()
    command = args.command or f"quill train {args.config} --out {args.model_dir}"
    prompts = args.prompt or [default_prompt(load_model(args.model_dir).info) or "\n"]
    text = card(args.model_dir, args.config, args.title or args.model_dir.name, prompts, command, args.layouts)
    write_text(args.model_dir / "README.md", text)
    print(f"wrote {args.model_dir / 'README.md'}")


if __name__ == "__main__":
    main()
