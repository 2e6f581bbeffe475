"""Figures for docs/how-it-works.md, drawn from a trained model: one command regenerates them all.

    python scripts/make_figures.py --model shakespeare-char --out docs/figures

- attention.png   attention maps of a few heads on a line of verse
- positions.png   how position is encoded: learned embeddings' similarity, or RoPE's rotations
- embeddings.png  the character embeddings projected to 2-D (principal components)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from quillgpt.checkpoint import default_model, load_model  # noqa: E402
from quillgpt.trainlog import save_figure  # noqa: E402

VERSE = "ROMEO:\nBut soft, what light through yonder window breaks?"


def shown(c: str) -> str:
    return {"\n": "⏎", " ": "␣"}.get(c, c)


def attention_figure(model, tokenizer, path: Path, text: str = VERSE) -> None:
    ids = tokenizer.encode(text)[-model.config.block_size :]
    maps = model.attention_maps(torch.tensor([ids]))
    labels = [shown(tokenizer.decode([i])) for i in ids]
    L = len(maps)
    picks = [(0, 0), (0, 1), (L // 2, 0), (L // 2, 1), (L - 1, 0), (L - 1, 1)]
    fig, axes = plt.subplots(2, 3, figsize=(15, 10), dpi=100)
    for ax, (layer, head) in zip(axes.flat, picks):
        head = min(head, maps[layer].shape[0] - 1)
        ax.imshow(maps[layer][head].numpy(), cmap="viridis", vmin=0, vmax=1)
        ax.set_title(f"layer {layer + 1}, head {head + 1}")
        ax.set_xticks(range(len(labels)), labels, fontsize=6, family="monospace")
        ax.set_yticks(range(len(labels)), labels, fontsize=6, family="monospace")
        ax.set_xlabel("attends to (key)")
        ax.set_ylabel("token (query)")
    fig.suptitle("Where each character looks: attention probabilities (rows sum to 1; the future is masked)")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def positions_figure(model, path: Path) -> None:
    c = model.config
    if model.transformer.wpe is not None:
        w = torch.nn.functional.normalize(model.transformer.wpe.weight.detach(), dim=-1)
        fig, ax = plt.subplots(figsize=(7, 6), dpi=100)
        im = ax.imshow((w @ w.T).numpy(), cmap="RdBu_r", vmin=-1, vmax=1)
        ax.set_title("Learned position embeddings: cosine similarity between positions")
        ax.set_xlabel("position")
        ax.set_ylabel("position")
        fig.colorbar(im)
    else:
        hs = c.head_dim
        inv_freq = 1.0 / (c.rope_base ** (torch.arange(0, hs, 2, dtype=torch.float32) / hs))
        pos = torch.arange(c.block_size, dtype=torch.float32)
        angles = torch.outer(pos, inv_freq)  # (T, hs/2)
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 5), dpi=100)
        im = a1.imshow(torch.cos(angles).T.numpy(), aspect="auto", cmap="RdBu_r", vmin=-1, vmax=1)
        a1.set_title("RoPE: cos(position × frequency) for each channel pair")
        a1.set_xlabel("position")
        a1.set_ylabel("channel pair (fast → slow)")
        fig.colorbar(im, ax=a1)
        # a query and a key that are the same vector: their score after rotation depends only on
        # how far apart they are, which is what lets attention read relative position
        rel = torch.arange(c.block_size, dtype=torch.float32)
        score = torch.cos(torch.outer(rel, inv_freq)).mean(-1)
        a2.plot(rel.numpy(), score.numpy())
        a2.set_title("q·k of one vector rotated to two positions, by their distance")
        a2.set_xlabel("distance between query and key (tokens)")
        a2.set_ylabel("normalised score")
        a2.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def embeddings_figure(model, tokenizer, path: Path) -> None:
    w = model.transformer.wte.weight.detach()
    w = w - w.mean(0)
    _, _, v = torch.linalg.svd(w, full_matrices=False)
    xy = (w @ v[:2].T).numpy()
    fig, ax = plt.subplots(figsize=(8, 7), dpi=100)
    ax.scatter(xy[:, 0], xy[:, 1], s=6, alpha=0.3)
    n = min(tokenizer.vocab_size, 400)
    for i in range(n):
        ch = tokenizer.decode([i])
        color = "tab:red" if ch.isupper() else "tab:blue" if ch.islower() else "black"
        ax.annotate(shown(ch), xy[i], fontsize=9, family="monospace", color=color, ha="center", va="center")
    ax.set_title("Character embeddings, first two principal components (upper case red, lower case blue)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model name or directory (default: the bundled one)")
    p.add_argument("--out", default="docs/figures")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_model(args.model or default_model())
    model, tok = loaded.model, loaded.tokenizer
    attention_figure(model, tok, out / "attention.png")
    positions_figure(model, out / "positions.png")
    embeddings_figure(model, tok, out / "embeddings.png")
    print(
        f"wrote attention.png, positions.png, embeddings.png to {out} from {loaded.path} "
        f"({model.num_params() / 1e6:.1f}M parameters)"
    )


if __name__ == "__main__":
    main()
