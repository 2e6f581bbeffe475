"""Optimizers and the learning-rate schedule: AdamW with decay on matrices only (plus Muon for the
blocks' matrices, as an option), linear warmup then a cosine, linear, trapezoid or constant schedule,
and an exponential moving average (EMA) of the weights.
"""

from __future__ import annotations

import math

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from quillgpt.config import TrainConfig
from quillgpt.model import GPT


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
