"""A training run's state: what its checkpoint in last/ saves and --resume restores, exactly.

The model, its optimizers, the weight average (EMA), the data order (the batch generator and torch's
random state) and the progress (steps, tokens, training seconds, best val loss). `quillgpt.train`
drives it; `quillgpt.rundir` names the files.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.optim.swa_utils import AveragedModel

from quillgpt.checkpoint import WEIGHTS_FILE, load_weights, save_model
from quillgpt.config import TrainConfig
from quillgpt.fileio import atomic_dir, atomic_write
from quillgpt.model import GPT
from quillgpt.optim import build_optimizers, new_ema
from quillgpt.rundir import STATE_FILE
from quillgpt.tokenizer import TextTokenizer


@dataclass
class RunState:
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

    def set_learning_rate(self, factor: float) -> None:
        """Every parameter group at `factor` times its base learning rate (the schedule's value)."""
        for opt in self.optimizers:
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * factor

    def update_average(self, cfg: TrainConfig) -> None:
        """Fold the weights into their average (`ema_decay`), starting it on the first call."""
        self.ema = self.ema or new_ema(self.model, cfg)
        self.ema.update_parameters(self.model)

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

    @classmethod
    def start(
        cls,
        cfg: TrainConfig,
        device: torch.device,
        base: GPT | None = None,
        resume_dir: Path | None = None,
        state: dict | None = None,
    ) -> RunState:
        """A new run: seeded weights (or the fine-tuning `base`'s, or those saved in `resume_dir` with
        their training `state`) and optimizers."""
        torch.manual_seed(cfg.seed)
        model = GPT(cfg.model)
        if base is not None:
            model.load_state_dict(base.state_dict())
        if state is not None:
            load_weights(model, resume_dir / WEIGHTS_FILE)
        model.to(device)
        run = cls(model, build_optimizers(model, cfg), torch.Generator().manual_seed(cfg.seed))
        if state is not None:
            run.load_state_dict(state, cfg)
        return run


def save_state(run: RunState, folder: Path, tokenizer: TextTokenizer, provenance: dict) -> None:
    """The latest model and training state, into `folder` (last/): swapped in as one folder, so a crash
    leaves the previous checkpoint or this one, never weights of one step beside the optimizer state
    of another."""
    state = run.state_dict()

    def write(tmp: Path) -> None:
        save_model(tmp, run.model, tokenizer, provenance=provenance)
        atomic_write(tmp / STATE_FILE, lambda f: torch.save(state, f))

    atomic_dir(folder, write)
