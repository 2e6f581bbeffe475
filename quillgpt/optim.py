"""Optimizers and the learning-rate schedule: AdamW with decay on matrices only (plus Muon for the
blocks' matrices, as an option), linear warmup then a cosine, linear, trapezoid or constant schedule,
and an exponential moving average (EMA) of the weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from quillgpt.config import TrainConfig
from quillgpt.model import GPT

Batch = tuple[torch.Tensor, torch.Tensor]


def optimizer_step(
    forward: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    model: torch.nn.Module,
    optimizers: list[torch.optim.Optimizer],
    cfg: TrainConfig,
    next_batch: Callable[[], Batch],
    autocast: AbstractContextManager,
    hold_sync: Callable[[], AbstractContextManager] | None = None,
) -> float:
    """One optimizer step, as training takes it: `grad_accum` micro-batches from `next_batch` through
    `forward` (the model, compiled or wrapped), each loss backpropagated at 1/grad_accum under
    `autocast`; `model`'s gradients clipped to `grad_clip`; every optimizer stepped and zeroed.
    `hold_sync` gives the context every micro-batch but the last runs in (DDP's `no_sync`, so gradients
    are all-reduced once). Returns this process's mean micro-batch loss."""
    loss_sum = 0.0
    for micro in range(cfg.grad_accum):
        x, y = next_batch()
        last = micro == cfg.grad_accum - 1
        with nullcontext() if last or hold_sync is None else hold_sync(), autocast:
            _, loss = forward(x, y)
            (loss / cfg.grad_accum).backward()
        loss_sum += loss.item()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    for opt in optimizers:
        opt.step()
        opt.zero_grad(set_to_none=True)
    return loss_sum / cfg.grad_accum


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
