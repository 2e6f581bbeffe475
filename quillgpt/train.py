"""The training loop: optimizers, LR schedule, evaluation, checkpoints, exact resume, DDP.

Output directory of a run:
    config.json, model.safetensors (+ tokenizer.json)   the best model by val loss (`quill generate OUT`);
                                                       with `ema_decay`, the weight average once it starts
    last/                                              the latest state, for --resume
    metrics.jsonl, loss.png, train_config.json         what happened, and the exact resolved config

Under `torchrun --nproc_per_node=N` every process draws the same global batch and trains on its own
rows of it (DistributedDataParallel averages the gradients); rank 0 alone evaluates, logs and saves.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from quillgpt.checkpoint import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    load_model,
    load_weights,
    read_model_config,
    save_model,
    update_provenance,
)
from quillgpt.config import TrainConfig, train_config_from_dict
from quillgpt.data import DataError, TokenSplits, get_batch, load_text, tokenize_splits
from quillgpt.device import resolve_device
from quillgpt.evaluate import evaluate_ids
from quillgpt.fileio import atomic_write, write_json, write_text
from quillgpt.model import GPT
from quillgpt.tokenizer import CharTokenizer, TokenizerError, build_tokenizer, tokenizer_from_spec

LAST_DIR = "last"
STATE_FILE = "train_state.pt"
RUN_FILES = (CONFIG_FILE, WEIGHTS_FILE, "tokenizer.json", "metrics.jsonl", "loss.png", "train_config.json", LAST_DIR)


class TrainError(RuntimeError):
    """A run that cannot start (bad data, output dir, resume) — raised before any training."""


@dataclass
class TrainSummary:
    out_dir: str
    steps: int
    tokens: int
    wall_time_s: float
    tokens_per_s: float
    best_val_loss: float | None
    last_train_loss: float | None
    mfu: float | None
    interrupted: bool = False
    full_val_loss: float | None = None
    """Loss of the best model over the whole validation split (when `final_eval` is on)."""


# ---------------------------------------------------------------- optimizers and schedule


def build_optimizers(model: GPT, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
    """AdamW with decay on matrices only; with `optimizer="muon"`, Muon takes the blocks' matrices."""
    embeddings = {id(model.transformer.wte.weight)}
    if model.transformer.wpe is not None:
        embeddings.add(id(model.transformer.wpe.weight))
    muon, decay, no_decay = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if cfg.optimizer == "muon" and p.ndim == 2 and name.startswith("transformer.h."):
            muon.append(p)
        elif p.ndim >= 2 and id(p) not in embeddings:
            decay.append(p)
        else:
            no_decay.append(p)
    kw: dict = {"lr": cfg.learning_rate, "betas": (cfg.beta1, cfg.beta2)}
    if next(model.parameters()).device.type in ("cpu", "cuda"):
        kw["fused"] = True
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizers: list[torch.optim.Optimizer] = [torch.optim.AdamW([g for g in groups if g["params"]], **kw)]
    if muon:
        optimizers.append(
            torch.optim.Muon(
                muon,
                lr=cfg.muon_lr,
                momentum=cfg.muon_momentum,
                nesterov=True,
                weight_decay=cfg.weight_decay,
                adjust_lr_fn="original",
            )
        )
    for opt in optimizers:
        for g in opt.param_groups:
            g["base_lr"] = g["lr"]
    return optimizers


def lr_factor(cfg: TrainConfig, step: int, progress: float) -> float:
    """Multiplier on each group's base LR: linear warmup, then the schedule over progress in [0, 1]."""
    if step < cfg.warmup_iters:
        return (step + 1) / (cfg.warmup_iters + 1)
    floor = cfg.min_lr / cfg.learning_rate
    p = min(max(progress, 0.0), 1.0)
    if cfg.lr_schedule == "constant":
        return 1.0
    if cfg.lr_schedule == "linear":
        return 1.0 - (1.0 - floor) * p
    if cfg.lr_schedule == "trapezoid":
        hold = 1.0 - cfg.decay_frac
        return 1.0 if p <= hold else floor + (1.0 - floor) * (1.0 - p) / cfg.decay_frac
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * p))


def new_ema(model: GPT, cfg: TrainConfig) -> AveragedModel:
    """An exponential moving average of `model`'s weights; its first update copies them."""
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay))


def autocast_context(dtype: str, device: torch.device):
    """The context the forward and backward passes run in: bfloat16 autocast, or nothing (float32)."""
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if dtype == "float32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


# ---------------------------------------------------------------- evaluation and measurement


@torch.no_grad()
def estimate_loss(model: GPT, splits: TokenSplits, cfg: TrainConfig, device: torch.device) -> dict[str, float]:
    """Mean loss on fixed batches: the same `eval_iters` windows of each split at every evaluation."""
    was_training = model.training
    model.eval()
    out = {}
    for i, (name, data) in enumerate((("train", splits.train), ("val", splits.val))):
        g = torch.Generator().manual_seed(cfg.seed + 7919 * (i + 1))
        losses = []
        for _ in range(cfg.eval_iters):
            x, y = get_batch(data, cfg.batch_size, model.config.block_size, g)
            losses.append(model(x.to(device), y.to(device))[1].item())
        out[name] = sum(losses) / len(losses)
    model.train(was_training)
    return out


def flops_per_token(model: GPT) -> float:
    """Training FLOPs per token: 6 per weight (forward + backward) plus attention (nanoGPT's estimate)."""
    c = model.config
    return 6 * model.num_params(non_embedding=True) + 12 * c.n_layer * c.n_head * c.head_dim * c.block_size


def measure_matmul_peak(seconds: float = 1.0, n: int = 1024) -> float:
    """fp32 matmul FLOP/s of this machine, measured now (the MFU denominator on CPU)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - start)


# ---------------------------------------------------------------- run setup


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device: torch.device) -> _Dist:
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return _Dist()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def _check_out_dir(out: Path, resume: bool, overwrite: bool) -> None:
    if resume:
        if not (out / LAST_DIR / STATE_FILE).is_file():
            raise TrainError(f"nothing to resume in {out} (no {LAST_DIR}/{STATE_FILE})")
        return
    if out.exists() and not out.is_dir():
        raise TrainError(f"output path {out} exists and is not a directory")
    if out.is_dir() and any((out / f).exists() for f in RUN_FILES) and not overwrite:
        raise TrainError(f"{out} already holds a run; use --resume to continue it or --overwrite to replace it")
    probe = out if out.is_dir() else next((p for p in out.parents if p.exists()), Path("."))
    if not os.access(probe, os.W_OK):
        raise TrainError(f"output dir {out} is not writable")


def _check_encodable(tokenizer, text: str, source: str) -> None:
    if isinstance(tokenizer, CharTokenizer) and tokenizer.unk_char is None:
        unknown = sorted(set(text) - set(tokenizer.stoi))
        if unknown:
            shown = ", ".join(repr(c) for c in unknown[:30])
            raise TrainError(f"{source} has {len(unknown)} character(s) the model's tokenizer cannot encode: {shown}")


# ---------------------------------------------------------------- the loop


def _prepare(cfg: TrainConfig, out: Path, data, resume: bool, init_from):
    """Everything that can fail before training: data, tokenizer, splits, the run to resume.

    Returns the resolved config (data path, vocabulary size), tokenizer, token splits, the saved
    state to resume from (or None) and the model to fine-tune from (or None).
    """
    state, base = None, None
    if resume:
        try:
            saved = train_config_from_dict(json.loads((out / "train_config.json").read_text(encoding="utf-8")))
        except (OSError, ValueError) as e:
            raise TrainError(f"cannot read {out / 'train_config.json'} to resume: {e}") from None
        shape = ("n_layer", "n_head", "n_embd", "head_size", "block_size", "mlp_hidden", "activation", "pos_emb")
        differ = [k for k in shape if getattr(saved.model, k) != getattr(cfg.model, k)]
        if differ:
            raise TrainError(f"--resume with a different model shape ({', '.join(differ)}) than the run in {out}")
        state = torch.load(out / LAST_DIR / STATE_FILE, map_location="cpu", weights_only=True)

    source = data or cfg.data_path
    if source is None:
        raise TrainError("no data: give --data or set data_path in the config")
    try:
        text = load_text(source)
    except DataError as e:
        raise TrainError(str(e)) from None
    cfg = dataclasses.replace(cfg, data_path=str(source))

    if resume:
        last = read_model_config(out / LAST_DIR)
        tokenizer = tokenizer_from_spec(last["tokenizer"], out / LAST_DIR)
        model_cfg = dataclasses.replace(cfg.model, vocab_size=last["model"]["vocab_size"])
    elif init_from is not None:
        base = load_model(init_from)
        tokenizer = base.tokenizer
        model_cfg = dataclasses.replace(base.model.config, dropout=cfg.model.dropout)
    else:
        try:
            tokenizer = build_tokenizer(cfg, text)
        except TokenizerError as e:
            raise TrainError(str(e)) from None
        if cfg.vocab_size is not None and cfg.vocab_size != tokenizer.vocab_size:
            raise TrainError(
                f"config vocab_size is {cfg.vocab_size} but the tokenizer has {tokenizer.vocab_size} tokens"
            )
        model_cfg = dataclasses.replace(cfg.model, vocab_size=tokenizer.vocab_size)
    _check_encodable(tokenizer, text, str(source))
    cfg = dataclasses.replace(cfg, model=model_cfg)

    splits = tokenize_splits(text, tokenizer, cfg.val_fraction)
    T = model_cfg.block_size
    if len(splits.train) <= T + 1:
        raise TrainError(f"training split has {len(splits.train)} tokens: too short for block_size {T} (+1)")
    if len(splits.val) <= T + 1:
        raise TrainError(f"validation split has {len(splits.val)} tokens: too short for block_size {T} (+1)")

    return cfg, tokenizer, splits, state, base


def train(
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    data: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    init_from: str | Path | None = None,
    progress: bool = True,
    stop: threading.Event | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainSummary:
    """Train per `cfg`, writing into `out_dir`. Everything that can be checked is checked first."""
    out = Path(out_dir)
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    _check_out_dir(out, resume, overwrite)

    cfg, tokenizer, splits, state, base = _prepare(cfg, out, data, resume, init_from)
    model_cfg, T = cfg.model, cfg.model.block_size

    ddp = _init_distributed(device)
    if device.type == "cuda" and ddp.world > 1:
        device = torch.device("cuda", ddp.local_rank)
    torch.manual_seed(cfg.seed)
    model = GPT(model_cfg)
    if base is not None:
        model.load_state_dict(base.model.state_dict())
    if resume:
        load_weights(model, out / LAST_DIR / WEIGHTS_FILE)
    model.to(device)
    optimizers = build_optimizers(model, cfg)
    batch_gen = torch.Generator().manual_seed(cfg.seed)
    step, tokens_seen, elapsed_before, best_val, ema = 0, 0, 0.0, None, None
    if state is not None:
        for opt, sd in zip(optimizers, state["optimizers"]):
            opt.load_state_dict(sd)
        batch_gen.set_state(state["batch_rng"])
        torch.set_rng_state(state["torch_rng"])
        step, tokens_seen = state["step"], state["tokens_seen"]
        elapsed_before, best_val = state["elapsed"], state["best_val"]
        if state.get("ema") is not None:
            ema = new_ema(model, cfg)
            ema.load_state_dict(state["ema"])

    if ddp.main:
        out.mkdir(parents=True, exist_ok=True)
        if overwrite and not resume:
            for name in RUN_FILES:
                p = out / name
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        write_json(out / "train_config.json", cfg.to_dict())

    train_model = torch.compile(model) if cfg.compile else model
    if ddp.world > 1:
        train_model = DDP(train_model, device_ids=[ddp.local_rank] if device.type == "cuda" else None)
    autocast = autocast_context(cfg.dtype, device)
    provenance_base = {
        "data": cfg.data_path,
        "data_sha256": splits.data_sha256,
        "split": f"first {1 - cfg.val_fraction:.0%} train, last {cfg.val_fraction:.0%} val",
    }
    metrics_path = out / "metrics.jsonl"
    if ddp.main and state is not None:
        _truncate_metrics(metrics_path, step)
    stopping = stop or threading.Event()
    restore_signals = (
        _install_signal_handlers(stopping) if threading.current_thread() is threading.main_thread() else None
    )

    def save(last_loss: float | None) -> None:
        if not ddp.main:
            return
        prov = provenance_base | {"steps": step, "tokens": tokens_seen, "wall_time_s": round(elapsed(), 1)}
        save_model(out / LAST_DIR, model, tokenizer, provenance=prov | {"train_loss": last_loss})
        snapshot = {
            "step": step,
            "tokens_seen": tokens_seen,
            "elapsed": elapsed(),
            "best_val": best_val,
            "optimizers": [o.state_dict() for o in optimizers],
            "batch_rng": batch_gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "ema": ema.state_dict() if ema is not None else None,
        }
        atomic_write(out / LAST_DIR / STATE_FILE, lambda tmp: torch.save(snapshot, tmp))

    start = time.perf_counter()
    elapsed = lambda: elapsed_before + time.perf_counter() - start  # noqa: E731
    tokens_per_step = cfg.batch_size * cfg.grad_accum * ddp.world * T
    rows = slice(ddp.rank * cfg.batch_size, (ddp.rank + 1) * cfg.batch_size)

    def next_batch() -> tuple[torch.Tensor, torch.Tensor]:
        x, y = get_batch(splits.train, cfg.batch_size * ddp.world, T, batch_gen, rows)
        return x.to(device), y.to(device)

    budget = cfg.max_minutes * 60 if cfg.max_minutes else None
    bar = _progress_bar(cfg, step, enabled=progress and ddp.main)
    metrics = open(metrics_path, "a", encoding="utf-8") if ddp.main else None
    loss_value, interrupted = None, False
    model.train()
    try:
        while step < cfg.max_iters and not (budget and elapsed() >= budget):
            progress = max(step / cfg.max_iters, elapsed() / budget if budget else 0.0)
            factor = lr_factor(cfg, step, progress)
            for opt in optimizers:
                for g in opt.param_groups:
                    g["lr"] = g["base_lr"] * factor
            loss_value = _optimizer_step(train_model, model, optimizers, cfg, next_batch, autocast, ddp)
            step += 1
            tokens_seen += tokens_per_step
            if cfg.ema_decay > 0 and (ema is not None or progress >= cfg.ema_start):
                ema = ema or new_ema(model, cfg)
                ema.update_parameters(model)
            if metrics is not None:
                record = {"step": step, "loss": round(loss_value, 5), "lr": factor * cfg.learning_rate}
                metrics.write(json.dumps(record | {"tokens": tokens_seen, "time_s": round(elapsed(), 2)}) + "\n")
            if bar is not None:
                bar.update(1)
                info = {"loss": f"{loss_value:.4f}", "tok_s": f"{tokens_seen / max(elapsed(), 1e-9):,.0f}"}
                if budget:
                    info["min_left"] = f"{max(budget - elapsed(), 0) / 60:.1f}"
                bar.set_postfix(info, refresh=False)
            if on_step is not None:
                on_step(step, loss_value)
            last = step == cfg.max_iters or (budget is not None and elapsed() >= budget)
            if step % cfg.eval_interval == 0 or last:
                if ddp.main:
                    current = ema.module if ema is not None else model
                    losses = estimate_loss(current, splits, cfg, device)
                    improved = best_val is None or losses["val"] < best_val
                    if improved:
                        best_val = losses["val"]
                    metrics.write(json.dumps({"step": step, "eval": losses, "time_s": round(elapsed(), 2)}) + "\n")
                    metrics.flush()
                    if improved:
                        prov = provenance_base | {
                            "steps": step,
                            "tokens": tokens_seen,
                            "wall_time_s": round(elapsed(), 1),
                            "val_loss": round(best_val, 4),
                        }
                        if ema is not None:
                            prov["ema_decay"] = cfg.ema_decay
                        save_model(out, current, tokenizer, provenance=prov)
                    save(loss_value)
                    plot_metrics(metrics_path, out / "loss.png")
                    if bar is not None:
                        bar.write(
                            f"step {step}: train {losses['train']:.4f}, val {losses['val']:.4f}"
                            f" ({elapsed() / 60:.1f} min)"
                        )
                if ddp.world > 1:
                    dist.barrier()
            if _agree(stopping.is_set(), ddp, device):
                interrupted = True
                break
    finally:
        if bar is not None:
            bar.close()
        if restore_signals is not None:
            restore_signals()
    if interrupted:
        save(loss_value)
    wall = elapsed()
    full_val = None
    if metrics is not None:
        if not interrupted and cfg.final_eval and best_val is not None:
            full_val = _final_eval(out, splits, device)
            metrics.write(json.dumps({"step": step, "final_eval": full_val, "time_s": round(wall, 2)}) + "\n")
        metrics.close()
    tok_s = tokens_seen / wall if wall > 0 else 0.0
    mfu = None
    if device.type == "cpu" and ddp.main:
        mfu = flops_per_token(model) * tok_s / measure_matmul_peak(0.3)
    if ddp.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return TrainSummary(
        str(out),
        step,
        tokens_seen,
        wall,
        tok_s,
        best_val,
        loss_value,
        mfu,
        interrupted,
        full_val["val_loss"] if full_val else None,
    )


def _optimizer_step(train_model, model, optimizers, cfg: TrainConfig, next_batch, autocast, ddp: _Dist) -> float:
    """One optimizer step over `grad_accum` micro-batches; returns the mean loss over all processes.
    Under DDP, gradients are all-reduced only on the last micro-batch (`no_sync` before it)."""
    loss_sum = 0.0
    for micro in range(cfg.grad_accum):
        x, y = next_batch()
        sync = micro == cfg.grad_accum - 1 or ddp.world == 1
        with nullcontext() if sync else train_model.no_sync(), autocast:
            _, loss = train_model(x, y)
            (loss / cfg.grad_accum).backward()
        loss_sum += loss.item()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    for opt in optimizers:
        opt.step()
        opt.zero_grad(set_to_none=True)
    loss_value = loss_sum / cfg.grad_accum
    if ddp.world > 1:
        t = torch.tensor(loss_value, device=x.device)
        dist.all_reduce(t)
        loss_value = t.item() / ddp.world
    return loss_value


def _final_eval(out: Path, splits: TokenSplits, device: torch.device) -> dict:
    """Loss of the best checkpoint over the whole validation split (every token once), recorded in
    its provenance: the number `quill eval` reports, not an estimate from random batches."""
    best = load_model(out, device=device)
    nll, tokens = evaluate_ids(best.model, splits.val)
    result = {"val_loss": nll / tokens, "bits_per_token": nll / tokens / math.log(2), "tokens": tokens}
    update_provenance(out, val_loss_full_split=round(result["val_loss"], 4), val_tokens=tokens)
    return result


def _agree(flag: bool, ddp: _Dist, device: torch.device) -> bool:
    """Whether any process wants to stop (so all stop at the same step)."""
    if ddp.world == 1:
        return flag
    t = torch.tensor(float(flag), device=device)
    dist.all_reduce(t)
    return t.item() > 0


def _install_signal_handlers(event: threading.Event) -> Callable[[], None]:
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum, frame):
        if event.is_set():  # a second Ctrl-C: stop now
            signal.default_int_handler(signum, frame)
        event.set()

    for s in previous:
        signal.signal(s, handler)

    def restore() -> None:
        for s, h in previous.items():
            signal.signal(s, h)

    return restore


def _progress_bar(cfg: TrainConfig, step: int, enabled: bool):
    """Steps, loss, tokens/s and ETA; a time-budgeted run shows the minutes left instead of an ETA."""
    if not enabled:
        return None
    from tqdm import tqdm

    total = None if cfg.max_minutes else cfg.max_iters
    return tqdm(total=total, initial=step, desc="train", unit="step", dynamic_ncols=True, mininterval=1.0)


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop lines logged after the checkpoint we resume from."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text(encoding="utf-8").splitlines() if json.loads(line)["step"] <= step]
    write_text(path, "".join(line + "\n" for line in keep))


def read_metrics(path: str | Path) -> tuple[list[dict], list[dict]]:
    """(per-step records, evaluation records) of a run's metrics.jsonl."""
    records = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]
    return [r for r in records if "loss" in r], [r for r in records if "eval" in r]


def plot_metrics(metrics_path: str | Path, png_path: str | Path, title: str | None = None) -> None:
    """Train loss per step (smoothed) and eval train/val losses, written atomically as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, evals = read_metrics(metrics_path)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if steps:
        xs = [r["step"] for r in steps]
        ys, ema = [], None
        for r in steps:
            ema = r["loss"] if ema is None else 0.95 * ema + 0.05 * r["loss"]
            ys.append(ema)
        ax.plot(xs, ys, color="tab:blue", alpha=0.5, lw=1, label="train (batch, smoothed)")
    for split, colour in (("train", "tab:blue"), ("val", "tab:orange")):
        ys = [r["eval"][split] for r in evals]
        ax.plot([r["step"] for r in evals], ys, "o-", color=colour, ms=3, label=f"{split} (eval)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title or "training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(png_path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
