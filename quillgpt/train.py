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
import signal
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from quillgpt.checkpoint import LoadedModel, load_model, read_model_config, save_model, update_provenance
from quillgpt.config import TrainConfig, train_config_from_dict
from quillgpt.data import DataError, TextSplit, TokenSplits, get_batch, split_dataset, tokenize_splits
from quillgpt.device import autocast_context, keep_freed_memory, peak_matmul_flops, resolve_device
from quillgpt.distributed import Processes, init_distributed
from quillgpt.evaluate import estimate_loss, evaluate
from quillgpt.fileio import recover_dir
from quillgpt.layout import mix_layouts
from quillgpt.optim import lr_factor, optimizer_step
from quillgpt.rundir import (
    LAST_DIR,
    PLOT_FILE,
    STATE_FILE,
    clear_run,
    holds_run,
    read_train_config,
    state_path,
    train_config_path,
    write_train_config,
)
from quillgpt.tokenizer import CharTokenizer, TextTokenizer, TokenizerError, tokenizer_from_spec
from quillgpt.trainlog import MetricsLog, plot_metrics, progress_bar, update_bar
from quillgpt.trainstate import RunState, save_state
from quillgpt.vocab import build_tokenizer


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


@dataclass
class _Prepared:
    """What `_prepare` checked and resolved before any training."""

    cfg: TrainConfig
    """The config resolved: its data path and the model's vocabulary size filled in."""
    tokenizer: TextTokenizer
    text: TextSplit
    """The text split into train and val (what the provenance describes)."""
    tokens: TokenSplits
    resume_state: dict | None = None
    """The saved training state to continue (--resume)."""
    base: LoadedModel | None = None
    """The model to fine-tune from (--init-from)."""


def _prepare(cfg: TrainConfig, out: Path, data, resume: bool, init_from) -> _Prepared:
    """Everything that can fail before training: data, tokenizer, splits, the run to resume."""
    state, base = None, None
    if resume:
        try:
            saved = train_config_from_dict(read_train_config(out))
        except (OSError, ValueError) as e:
            raise TrainError(f"cannot read {train_config_path(out)} to resume: {e}") from None
        differ = [k for k in saved.model.architecture_differences(cfg.model) if k != "vocab_size"]  # the tokenizer's
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

    return _Prepared(cfg, tokenizer, split, splits, state, base)


# ---------------------------------------------------------------- the loop


@dataclass
class _Session:
    """What stays fixed while a run trains: where it writes, what it evaluates on, how it reports.
    `log` and `bar` exist on the main process only (rank 0 alone evaluates, logs and saves)."""

    cfg: TrainConfig
    out: Path
    device: torch.device
    tokenizer: TextTokenizer
    tokens: TokenSplits
    provenance: dict
    """What the saved models record about their data (each save adds the run's progress)."""
    log: MetricsLog | None = None
    bar: Any = None
    """The progress bar (tqdm), when asked for."""


@dataclass
class _Stepper:
    """One optimizer step over `grad_accum` micro-batches of this process's rows of each batch."""

    run: RunState
    cfg: TrainConfig
    ddp: Processes
    device: torch.device
    tokens: TokenSplits
    forward: torch.nn.Module
    """The model as it trains: compiled (`compile`), wrapped in DDP under torchrun."""
    autocast: Any

    @classmethod
    def build(cls, run: RunState, cfg: TrainConfig, ddp: Processes, device: torch.device, tokens: TokenSplits):
        forward = torch.compile(run.model) if cfg.compile else run.model
        if ddp.joined:
            forward = DDP(forward, device_ids=[ddp.local_rank] if device.type == "cuda" else None)
        return cls(run, cfg, ddp, device, tokens, forward, autocast_context(cfg.dtype, device))

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.batch_size * self.cfg.grad_accum * self.ddp.world * self.cfg.model.block_size

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        cfg, ddp = self.cfg, self.ddp
        rows = slice(ddp.rank * cfg.batch_size, (ddp.rank + 1) * cfg.batch_size)  # this process's rows of a batch
        x, y = get_batch(self.tokens.train, cfg.batch_size * ddp.world, cfg.model.block_size, self.run.batch_gen, rows)
        return x.to(self.device), y.to(self.device)

    def __call__(self) -> float:
        """Returns the mean loss over all processes. Under DDP, gradients are all-reduced only on the
        last micro-batch (`no_sync` before it)."""
        ddp = self.ddp
        hold_sync = self.forward.no_sync if ddp.joined else None
        loss_value = optimizer_step(
            self.forward, self.run.model, self.run.optimizers, self.cfg, self.next_batch, self.autocast, hold_sync
        )
        if ddp.joined:
            t = torch.tensor(loss_value, device=self.device)
            dist.all_reduce(t)
            loss_value = t.item() / ddp.world
        return loss_value


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
    prep = _prepare(cfg, out, data, resume, init_from)
    if device.type == "cpu":
        keep_freed_memory()  # no page faults in the steady steps (as the recipe timed them)
    cfg = prep.cfg
    ddp = init_distributed(device)
    if device.type == "cuda" and ddp.joined:
        device = torch.device("cuda", ddp.local_rank)
    base = prep.base.model if prep.base is not None else None
    resume_dir = out / LAST_DIR if prep.resume_state is not None else None
    run = RunState.start(cfg, device, base, resume_dir, prep.resume_state)
    if ddp.main:
        _start_out_dir(out, cfg, fresh=overwrite and not resume)
    optimizer_step = _Stepper.build(run, cfg, ddp, device, prep.tokens)
    session = _Session(cfg, out, device, prep.tokenizer, prep.tokens, _provenance(prep))
    budget = cfg.max_minutes * 60 if cfg.max_minutes else None
    if ddp.main:
        session.log = MetricsLog(out, run.step if prep.resume_state is not None else None)
        if progress:
            session.bar = progress_bar(cfg.max_iters, run.step, time_budgeted=bool(budget))
    stopping = stop or threading.Event()
    on_main_thread = threading.current_thread() is threading.main_thread()
    restore_signals = _install_signal_handlers(stopping) if on_main_thread else None

    loss, interrupted = None, False
    run.started = time.perf_counter()
    run.model.train()
    try:
        while run.step < cfg.max_iters and not (budget and run.elapsed() >= budget):
            # step: set the learning rate, one optimizer step, update the weight average
            done = max(run.step / cfg.max_iters, run.elapsed() / budget if budget else 0.0)
            factor = lr_factor(cfg, run.step, done)
            run.set_learning_rate(factor)
            loss = optimizer_step()
            run.step += 1
            run.tokens_seen += optimizer_step.tokens_per_step
            if cfg.ema_decay > 0 and (run.ema is not None or done >= cfg.ema_start):
                run.update_average(cfg)

            # log: metrics.jsonl, the progress bar, the caller's hook
            if session.log is not None:
                session.log.step(run.step, loss, factor * cfg.learning_rate, run.tokens_seen, run.elapsed())
            if session.bar is not None:
                update_bar(session.bar, loss, run.tokens_seen, run.elapsed(), budget)
            if on_step is not None:
                on_step(run.step, loss)

            # evaluate and save: the best model by val loss into out/, the latest state into out/last/
            last = run.step == cfg.max_iters or (budget is not None and run.elapsed() >= budget)
            if run.step % cfg.eval_interval == 0 or last:
                if ddp.main:
                    _evaluate_and_save(session, run, loss)
                if ddp.joined:
                    dist.barrier()
            if ddp.any(stopping.is_set(), device):
                interrupted = True
                break
    finally:
        if session.bar is not None:
            session.bar.close()
        if restore_signals is not None:
            restore_signals()

    return _finish(session, run, ddp, loss, interrupted)


def _finish(session: _Session, run: RunState, ddp: Processes, loss: float | None, interrupted: bool) -> TrainSummary:
    """A checkpoint to resume an interrupted run, the whole-split evaluation, the summary."""
    cfg, out, device = session.cfg, session.out, session.device
    if interrupted and ddp.main:
        _save_last(session, run, loss)
    wall = run.elapsed()
    full_val = None
    if session.log is not None:
        if not interrupted and cfg.final_eval and run.best_val is not None:
            full_val = _final_eval(out, cfg, device)
            session.log.final_eval(run.step, full_val, wall)
        session.log.close()
    tok_s = run.tokens_seen / wall if wall > 0 else 0.0
    peak = peak_matmul_flops(device, cfg.dtype) if ddp.main else None
    flops = run.model.config.flops_per_token(run.model.num_params(non_embedding=True))
    mfu = flops * tok_s / peak if peak else None
    if ddp.joined:
        dist.barrier()
        dist.destroy_process_group()
    full_val_loss = full_val["val_loss"] if full_val else None
    return TrainSummary(
        str(out), run.step, run.tokens_seen, wall, tok_s, run.best_val, loss, mfu, interrupted, full_val_loss
    )


def _provenance(prep: _Prepared) -> dict:
    """What every saved model of the run records about its data."""
    cfg = prep.cfg
    provenance = {
        "data": cfg.data_path,
        "data_sha256": prep.tokens.data_sha256,
        "split": prep.text.describe(),
        "val_split": cfg.val_split,
    }
    if cfg.reflow_fraction > 0:
        provenance["reflow_fraction"] = cfg.reflow_fraction
    if cfg.default_prompt is not None:
        provenance["default_prompt"] = cfg.default_prompt
    return provenance


def _start_out_dir(out: Path, cfg: TrainConfig, fresh: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if fresh:  # --overwrite: the previous run's files go
        clear_run(out)
    write_train_config(out, cfg)


def _evaluate_and_save(session: _Session, run: RunState, loss: float) -> None:
    """Estimate the losses; save the model if val improved, and the latest state; redraw loss.png."""
    cfg, out = session.cfg, session.out
    losses = estimate_loss(run.averaged, session.tokens, cfg, session.device)
    improved = run.best_val is None or losses["val"] < run.best_val
    if improved:
        run.best_val = losses["val"]
    session.log.eval(run.step, losses, run.elapsed())
    if improved:
        prov = run.provenance(session.provenance) | {"val_loss": round(run.best_val, 4)}
        if run.ema is not None:
            prov["ema_decay"] = cfg.ema_decay
        save_model(out, run.averaged, session.tokenizer, provenance=prov, dtype=getattr(torch, cfg.save_dtype))
    _save_last(session, run, loss)
    plot_metrics(out, out / PLOT_FILE)
    if session.bar is not None:
        session.bar.write(
            f"step {run.step}: train {losses['train']:.4f}, val {losses['val']:.4f} ({run.elapsed() / 60:.1f} min)"
        )


def _save_last(session: _Session, run: RunState, loss: float | None) -> None:
    """The latest model and training state, into out/last/ (what --resume continues from)."""
    save_state(
        run, session.out / LAST_DIR, session.tokenizer, run.provenance(session.provenance) | {"train_loss": loss}
    )


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
