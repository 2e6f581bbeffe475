"""The training loop: evaluation, checkpoints, exact resume, data parallelism, mixed precision.

Output directory of a run (its files: `quillgpt.rundir`): the best model by val loss (with `ema_decay`,
the weight average once it starts), last/ (the latest state, for --resume), metrics.jsonl, loss.png
and train_config.json (the exact resolved config).

`train()` reads top to bottom in phases: prepare (check everything, build or restore the run), then
per step: step, log, evaluate-and-save; then finish. Under `torchrun --nproc_per_node=N` every
process trains on its own rows of each batch (`quillgpt.distributed`); rank 0 alone evaluates, logs
and saves. Optimizers and schedule: `quillgpt.optim`; writing metrics.jsonl and loss.png: `quillgpt.trainlog`.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import threading
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.swa_utils import AveragedModel

from quillgpt.checkpoint import (
    WEIGHTS_FILE,
    load_model,
    load_weights,
    read_model_config,
    save_model,
    update_provenance,
)
from quillgpt.config import TrainConfig, train_config_from_dict
from quillgpt.data import DataError, get_batch, split_dataset, tokenize_splits
from quillgpt.device import autocast_context, flops_per_token, measure_matmul_peak, resolve_device
from quillgpt.distributed import Processes, init_distributed
from quillgpt.evaluate import estimate_loss, evaluate
from quillgpt.fileio import atomic_dir, atomic_write, recover_dir
from quillgpt.layout import mix_layouts
from quillgpt.model import GPT
from quillgpt.optim import build_optimizers, lr_factor, new_ema
from quillgpt.rundir import (
    LAST_DIR,
    PLOT_FILE,
    RUN_FILES,
    STATE_FILE,
    holds_run,
    read_train_config,
    state_path,
    train_config_path,
    write_train_config,
)
from quillgpt.tokenizer import CharTokenizer, TokenizerError, build_tokenizer, tokenizer_from_spec
from quillgpt.trainlog import MetricsLog, plot_metrics, progress_bar, update_bar


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


# ---------------------------------------------------------------- run setup


def _check_out_dir(out: Path, resume: bool, overwrite: bool) -> None:
    if resume:
        recover_dir(out / LAST_DIR)  # a crash between the renames of the last checkpoint
        if not state_path(out).is_file():
            raise TrainError(f"nothing to resume in {out} (no {LAST_DIR}/{STATE_FILE})")
        return
    if out.exists() and not out.is_dir():
        raise TrainError(f"output path {out} exists and is not a directory")
    if holds_run(out) and not overwrite:
        raise TrainError(f"{out} already holds a run; use --resume to continue it or --overwrite to replace it")
    probe = out if out.is_dir() else next((p for p in out.parents if p.exists()), Path("."))
    if not os.access(probe, os.W_OK):
        raise TrainError(f"output dir {out} is not writable")


def _check_encodable(tokenizer, text: str, source: str, warn: bool) -> None:
    """A char vocabulary must cover the text, or have an unknown token for the rest (then, when the
    vocabulary came from another text, a warning lists the characters that become that token)."""
    unknown = tokenizer.unknown(text) if isinstance(tokenizer, CharTokenizer) else []
    if not unknown:
        return
    shown = ", ".join(repr(c) for c in unknown[:30]) + (" ..." if len(unknown) > 30 else "")
    if tokenizer.unk_id is None:
        raise TrainError(
            f"{source} has {len(unknown)} character(s) the model's tokenizer cannot encode "
            f"(its vocabulary has no unknown token): {shown}"
        )
    if warn:
        warnings.warn(
            f"{source} has {len(unknown)} character(s) outside the model's vocabulary; "
            f"they train as its unknown token: {shown}",
            stacklevel=3,
        )


# ---------------------------------------------------------------- the loop


def _prepare(cfg: TrainConfig, out: Path, data, resume: bool, init_from):
    """Everything that can fail before training: data, tokenizer, splits, the run to resume.

    Returns the resolved config (data path, vocabulary size), tokenizer, text and token splits, the saved
    state to resume from (or None) and the model to fine-tune from (or None).
    """
    state, base = None, None
    if resume:
        try:
            saved = train_config_from_dict(read_train_config(out))
        except (OSError, ValueError) as e:
            raise TrainError(f"cannot read {train_config_path(out)} to resume: {e}") from None
        shape = ("n_layer", "n_head", "n_embd", "head_size", "block_size", "mlp_hidden", "activation", "pos_emb")
        differ = [k for k in shape if getattr(saved.model, k) != getattr(cfg.model, k)]
        if differ:
            raise TrainError(f"--resume with a different model shape ({', '.join(differ)}) than the run in {out}")
        state = torch.load(state_path(out), map_location="cpu", weights_only=True)

    source = data or cfg.data_path
    if source is None:
        raise TrainError("no data: give --data or set data_path in the config")
    try:
        split = split_dataset(source, cfg.val_fraction, cfg.val_split)
    except DataError as e:
        raise TrainError(str(e)) from None
    if cfg.reflow_fraction > 0:  # layout augmentation: the training text only
        split = dataclasses.replace(split, train=mix_layouts(split.train, cfg.reflow_fraction, cfg.seed))
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
            tokenizer = build_tokenizer(cfg, split)
        except TokenizerError as e:
            raise TrainError(str(e)) from None
        if cfg.vocab_size is not None and cfg.vocab_size != tokenizer.vocab_size:
            raise TrainError(
                f"config vocab_size is {cfg.vocab_size} but the tokenizer has {tokenizer.vocab_size} tokens"
            )
        model_cfg = dataclasses.replace(cfg.model, vocab_size=tokenizer.vocab_size)
    _check_encodable(tokenizer, split.train + split.val, str(source), warn=resume or init_from is not None)
    cfg = dataclasses.replace(cfg, model=model_cfg)

    splits = tokenize_splits(split, tokenizer)
    T = model_cfg.block_size
    if len(splits.train) <= T + 1:
        raise TrainError(f"training split has {len(splits.train)} tokens: too short for block_size {T} (+1)")
    if len(splits.val) <= T + 1:
        raise TrainError(f"validation split has {len(splits.val)} tokens: too short for block_size {T} (+1)")

    return cfg, tokenizer, split, splits, state, base


@dataclass
class _Run:
    """What a checkpoint saves and --resume restores: the model, optimizers, EMA, data order, progress."""

    model: GPT
    optimizers: list[torch.optim.Optimizer]
    batch_gen: torch.Generator
    ema: AveragedModel | None = None
    step: int = 0
    tokens_seen: int = 0
    best_val: float | None = None
    elapsed_before: float = 0.0
    """Training seconds of the runs this one resumes."""
    started: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    @property
    def averaged(self) -> GPT:
        """The model that is evaluated and saved: the weight average once it has started."""
        return self.ema.module if self.ema is not None else self.model

    def provenance(self, base: dict) -> dict:
        return base | {"steps": self.step, "tokens": self.tokens_seen, "wall_time_s": round(self.elapsed(), 1)}

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "elapsed": self.elapsed(),
            "best_val": self.best_val,
            "optimizers": [o.state_dict() for o in self.optimizers],
            "batch_rng": self.batch_gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
        }

    def load_state_dict(self, state: dict, cfg: TrainConfig) -> None:
        for opt, sd in zip(self.optimizers, state["optimizers"]):
            opt.load_state_dict(sd)
        self.batch_gen.set_state(state["batch_rng"])
        torch.set_rng_state(state["torch_rng"])
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.elapsed_before, self.best_val = state["elapsed"], state["best_val"]
        if state.get("ema") is not None:
            self.ema = new_ema(self.model, cfg)
            self.ema.load_state_dict(state["ema"])


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
    # prepare: check the output dir, data, tokenizer and run to resume; then build or restore the run
    out = Path(out_dir)
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    _check_out_dir(out, resume, overwrite)
    cfg, tokenizer, text_split, splits, saved, base = _prepare(cfg, out, data, resume, init_from)
    ddp = init_distributed(device)
    if device.type == "cuda" and ddp.world > 1:
        device = torch.device("cuda", ddp.local_rank)
    run = _restore(cfg, out, device, saved, base)
    if ddp.main:
        _start_out_dir(out, cfg, fresh=overwrite and not resume)
    train_model = torch.compile(run.model) if cfg.compile else run.model
    if ddp.world > 1:
        train_model = DDP(train_model, device_ids=[ddp.local_rank] if device.type == "cuda" else None)
    autocast = autocast_context(cfg.dtype, device)
    provenance = {
        "data": cfg.data_path,
        "data_sha256": splits.data_sha256,
        "split": text_split.describe(),
        "val_split": cfg.val_split,
    }
    if cfg.reflow_fraction > 0:
        provenance["reflow_fraction"] = cfg.reflow_fraction
    if cfg.default_prompt is not None:
        provenance["default_prompt"] = cfg.default_prompt
    log = MetricsLog(out, run.step if saved is not None else None) if ddp.main else None
    stopping = stop or threading.Event()
    on_main_thread = threading.current_thread() is threading.main_thread()
    restore_signals = _install_signal_handlers(stopping) if on_main_thread else None

    T = cfg.model.block_size
    tokens_per_step = cfg.batch_size * cfg.grad_accum * ddp.world * T
    rows = slice(ddp.rank * cfg.batch_size, (ddp.rank + 1) * cfg.batch_size)  # this process's rows of a batch

    def next_batch() -> tuple[torch.Tensor, torch.Tensor]:
        x, y = get_batch(splits.train, cfg.batch_size * ddp.world, T, run.batch_gen, rows)
        return x.to(device), y.to(device)

    budget = cfg.max_minutes * 60 if cfg.max_minutes else None
    bar = progress_bar(cfg.max_iters, run.step, time_budgeted=bool(budget)) if progress and ddp.main else None
    loss, interrupted = None, False
    run.started = time.perf_counter()
    run.model.train()
    try:
        while run.step < cfg.max_iters and not (budget and run.elapsed() >= budget):
            # step: set the learning rate, one optimizer step, update the weight average
            done = max(run.step / cfg.max_iters, run.elapsed() / budget if budget else 0.0)
            factor = lr_factor(cfg, run.step, done)
            for opt in run.optimizers:
                for g in opt.param_groups:
                    g["lr"] = g["base_lr"] * factor
            loss = _optimizer_step(train_model, run.model, run.optimizers, cfg, next_batch, autocast, ddp)
            run.step += 1
            run.tokens_seen += tokens_per_step
            if cfg.ema_decay > 0 and (run.ema is not None or done >= cfg.ema_start):
                run.ema = run.ema or new_ema(run.model, cfg)
                run.ema.update_parameters(run.model)

            # log: metrics.jsonl, the progress bar, the caller's hook
            if log is not None:
                log.step(run.step, loss, factor * cfg.learning_rate, run.tokens_seen, run.elapsed())
            if bar is not None:
                update_bar(bar, loss, run.tokens_seen, run.elapsed(), budget)
            if on_step is not None:
                on_step(run.step, loss)

            # evaluate and save: the best model by val loss into out/, the latest state into out/last/
            last = run.step == cfg.max_iters or (budget is not None and run.elapsed() >= budget)
            if run.step % cfg.eval_interval == 0 or last:
                if ddp.main:
                    _evaluate_and_save(run, cfg, out, splits, tokenizer, provenance, loss, log, bar, device)
                if ddp.world > 1:
                    dist.barrier()
            if ddp.any(stopping.is_set(), device):
                interrupted = True
                break
    finally:
        if bar is not None:
            bar.close()
        if restore_signals is not None:
            restore_signals()

    # finish: a checkpoint to resume an interrupted run, the whole-split evaluation, the summary
    if interrupted and ddp.main:
        _save_last(run, out, tokenizer, provenance, loss)
    wall = run.elapsed()
    full_val = None
    if log is not None:
        if not interrupted and cfg.final_eval and run.best_val is not None:
            full_val = _final_eval(out, cfg, device)
            log.final_eval(run.step, full_val, wall)
        log.close()
    tok_s = run.tokens_seen / wall if wall > 0 else 0.0
    mfu = None
    if device.type == "cpu" and ddp.main:
        matmuls = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32  # what autocast ran on the CPU
        mfu = flops_per_token(run.model) * tok_s / measure_matmul_peak(0.3, dtype=matmuls)
    if ddp.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    full_val_loss = full_val["val_loss"] if full_val else None
    return TrainSummary(
        str(out), run.step, run.tokens_seen, wall, tok_s, run.best_val, loss, mfu, interrupted, full_val_loss
    )


def _restore(cfg: TrainConfig, out: Path, device: torch.device, saved: dict | None, base) -> _Run:
    """A new run: seeded weights (or the fine-tuning base's, or the resumed run's) and optimizers."""
    torch.manual_seed(cfg.seed)
    model = GPT(cfg.model)
    if base is not None:
        model.load_state_dict(base.model.state_dict())
    if saved is not None:
        load_weights(model, out / LAST_DIR / WEIGHTS_FILE)
    model.to(device)
    run = _Run(model, build_optimizers(model, cfg), torch.Generator().manual_seed(cfg.seed))
    if saved is not None:
        run.load_state_dict(saved, cfg)
    return run


def _start_out_dir(out: Path, cfg: TrainConfig, fresh: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if fresh:  # --overwrite: the previous run's files go
        for name in RUN_FILES:
            p = out / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    write_train_config(out, cfg)


def _evaluate_and_save(run: _Run, cfg, out, splits, tokenizer, provenance, loss, log, bar, device) -> None:
    """Estimate the losses; save the model if val improved, and the latest state; redraw loss.png."""
    losses = estimate_loss(run.averaged, splits, cfg, device)
    improved = run.best_val is None or losses["val"] < run.best_val
    if improved:
        run.best_val = losses["val"]
    log.eval(run.step, losses, run.elapsed())
    if improved:
        prov = run.provenance(provenance) | {"val_loss": round(run.best_val, 4)}
        if run.ema is not None:
            prov["ema_decay"] = cfg.ema_decay
        save_model(out, run.averaged, tokenizer, provenance=prov, dtype=getattr(torch, cfg.save_dtype))
    _save_last(run, out, tokenizer, provenance, loss)
    plot_metrics(out, out / PLOT_FILE)
    if bar is not None:
        bar.write(
            f"step {run.step}: train {losses['train']:.4f}, val {losses['val']:.4f} ({run.elapsed() / 60:.1f} min)"
        )


def _save_last(run: _Run, out: Path, tokenizer, provenance: dict, loss: float | None) -> None:
    """The latest model and training state, into out/last/ (what --resume continues from): swapped in
    as one folder, so a crash leaves the previous checkpoint or this one, never weights of one step
    beside the optimizer state of another."""
    prov = run.provenance(provenance) | {"train_loss": loss}
    state = run.state_dict()

    def write(folder: Path) -> None:
        save_model(folder, run.model, tokenizer, provenance=prov)
        atomic_write(folder / STATE_FILE, lambda tmp: torch.save(state, tmp))

    atomic_dir(out / LAST_DIR, write)


def _optimizer_step(train_model, model, optimizers, cfg: TrainConfig, next_batch, autocast, ddp: Processes) -> float:
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


def _final_eval(out: Path, cfg: TrainConfig, device: torch.device) -> dict:
    """Loss of the best checkpoint over the whole validation split (every token once), recorded in
    its provenance: what `quill eval` reports (the same function), not an estimate from random batches."""
    best = load_model(out, device=device)
    result = evaluate(best.model, best.tokenizer, cfg.data_path, "val", cfg.val_fraction, cfg.val_split)
    update_provenance(
        out,
        val_loss_full_split=round(result["val_loss"], 4),
        val_tokens=result["tokens"],
        val_bits_per_byte=round(result["bits_per_byte"], 4),
    )
    return result


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
