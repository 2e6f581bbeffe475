"""How fast this machine trains a config: a few real training steps, timed, and remembered.

The recipe sizes a run (tokens, epochs, dropout, shape) from the rate a config trains at here, not
from another machine's. `measure` builds the model and optimizers the run will use, takes one
warm-up step (it allocates the optimizer state), then times a few optimizer steps at the run's batch
size, context and dtype (their median, with malloc keeping freed memory as the run's does), a few
evaluation forwards (what `estimate_loss` runs) and one checkpoint's writes. `cached_rate` keeps
each measurement in a small JSON file, per machine (CPU model, torch threads, torch version, device)
and per shape, so a second plan on the same machine costs nothing:
`$QUILL_THROUGHPUT_CACHE`, else `throughput.json` in `$QUILL_CACHE_DIR` (default `~/.cache/quillgpt/`);
delete it to measure again. The shape a recipe chooses is timed again when it plans (`fresh_rate`).
Compiled steps are not timed here (compiling takes longer than the plan may): a compiled run records
what compiling did for it (`record_compiled`), and the rates read afterwards carry it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from quillgpt.config import TrainConfig
from quillgpt.data import cache_dir
from quillgpt.device import autocast_context, cpu_model, keep_freed_memory, release_freed_memory, resolve_device
from quillgpt.fileio import write_json
from quillgpt.model import GPT
from quillgpt.optim import build_optimizers, optimizer_step

CACHE_FILE = "throughput.json"
COMPILED_KEY = "compiled"
"""The machine's entry for what compiling did in its last runs (beside its shapes' entries)."""
MEASURE_SECONDS = 1.0
"""Time the timed training steps may take together, per shape (at least MIN_STEPS are timed)."""
MIN_STEPS, MAX_STEPS = 3, 6
EVAL_BATCHES = 2


@dataclass(frozen=True)
class Compiled:
    """What `torch.compile` did for a recipe's run on this machine, measured from the run's own steps: too
    slow to time before a run (compiling a model takes up to a minute on 2 cores), so each compiled run
    leaves its figures for the next plans here (`record_compiled`)."""

    speedup: float
    """The run's compiled tokens per second over the eager rate its plan timed just before it."""
    start_s: float
    """Seconds the first step took beyond a steady one: compiling (seconds once torch's cache holds the
    kernels, up to a minute before)."""
    runs: int = 1
    """Compiled runs behind the figures: read back, each is the median of the last `KEPT_RUNS` (a plan's
    eager rate is a second of timing on a machine whose speed drifts, so one run's ratio is noisy)."""


KEPT_RUNS = 5


@dataclass(frozen=True)
class Rate:
    """How fast a config trains on a machine, and where that figure came from."""

    train_tokens_per_s: float
    """Tokens per second of optimizer steps (forward, backward, clipping, the optimizers' step), eager."""
    eval_tokens_per_s: float
    """Tokens per second of evaluation forwards (no gradients), as `estimate_loss` runs them."""
    checkpoint_s: float
    """Seconds one evaluation spends writing: the best model and the latest state (weights + optimizers)."""
    source: str
    """"measured" (now), "cached" (measured earlier on this machine) or "reference" (another machine's rule)."""
    compiled: Compiled | None = None
    """What compiling did for a run on this machine, once one has run compiled here (`record_compiled`)."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def cache_file() -> Path:
    return Path(os.environ.get("QUILL_THROUGHPUT_CACHE") or cache_dir() / CACHE_FILE)


def machine_key(device: torch.device | None = None) -> str:
    """What a measurement holds for: the processor, torch's threads, torch's version and the device."""
    device = device or torch.device("cpu")
    if device.type == "cuda":
        chip = torch.cuda.get_device_name(device)
    else:
        chip = cpu_model()
    return f"{chip} | {torch.get_num_threads()} threads | torch {torch.__version__} | {device.type}"


def shape_key(cfg: TrainConfig) -> str:
    """What a measurement depends on in the config: the model's shape and the step's size and kind
    (dropout's masks cost time too)."""
    m = cfg.model
    return (
        f"{m.n_layer}x{m.n_embd} h{m.n_head} vocab {m.vocab_size} context {m.block_size} batch {cfg.batch_size}"
        f" accum {cfg.grad_accum} {cfg.optimizer} {cfg.dtype} {m.activation} {m.pos_emb} {m.norm}"
        + (f" dropout {m.dropout:g}" if m.dropout else "")
    )


def cached_rate(cfg: TrainConfig, cache: Path | None = None) -> Rate:
    """The rate of `cfg` on this machine: from the cache when measured before, else measured and cached."""
    path = cache or cache_file()
    machine, shape = machine_key(resolve_device(cfg.device)), shape_key(cfg)
    entries = _read(path).get(machine, {})
    if (hit := entries.get(shape)) is not None:
        rate = Rate(hit["train_tokens_per_s"], hit["eval_tokens_per_s"], hit["checkpoint_s"], "cached")
        return dataclasses.replace(rate, compiled=_compiled(entries))
    return fresh_rate(cfg, path)


def fresh_rate(cfg: TrainConfig, cache: Path | None = None) -> Rate:
    """The rate of `cfg` measured now; it replaces what the cache held for this machine and shape.

    A cached figure ranks shapes well, but a virtual machine's speed drifts (runs here have gone 20-30%
    faster than the rate cached an hour before): the recipe times the shape it chose once more."""
    path = cache or cache_file()
    machine, shape = machine_key(resolve_device(cfg.device)), shape_key(cfg)
    rate = measure(cfg)
    entries = _read(path)  # another process may have written meanwhile
    entries.setdefault(machine, {})[shape] = {
        k: v for k, v in rate.to_dict().items() if k not in ("source", "compiled")
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, entries)
    return dataclasses.replace(rate, compiled=_compiled(entries[machine]))


def record_compiled(cfg: TrainConfig, compiled: Compiled, cache: Path | None = None) -> Compiled:
    """Keep what compiling did for a run of `cfg` on this machine; what the plans that follow will read."""
    path = cache or cache_file()
    entries = _read(path)
    machine = entries.setdefault(machine_key(resolve_device(cfg.device)), {})
    runs = [r for r in machine.get(COMPILED_KEY, []) if isinstance(r, dict)]
    machine[COMPILED_KEY] = [*runs, {"speedup": compiled.speedup, "start_s": compiled.start_s, "shape": shape_key(cfg)}]
    machine[COMPILED_KEY] = machine[COMPILED_KEY][-KEPT_RUNS:]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, entries)
    return _compiled(machine)


def _compiled(machine: dict) -> Compiled | None:
    """The median of the compiled runs kept for a machine (any shape: compiling's gain varies less between
    shapes than a second of timing does between minutes); None before the first."""
    try:
        runs = [(float(r["speedup"]), float(r["start_s"])) for r in machine.get(COMPILED_KEY, [])]
    except (KeyError, TypeError, ValueError):
        return None
    if not runs:
        return None
    return Compiled(statistics.median(a for a, _ in runs), statistics.median(b for _, b in runs), len(runs))


def measure(cfg: TrainConfig, seconds: float = MEASURE_SECONDS) -> Rate:
    """Time training steps of `cfg` here (eager: `compile` is not applied), as `quill train` takes them.

    On a CPU the process keeps freed memory from here on, as `train` does (`keep_freed_memory`), and
    what the timing itself freed is handed back at its end (`release_freed_memory`)."""
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if device.type != "cpu":
        return _time_steps(cfg, device, seconds)
    keep_freed_memory()  # as `train` runs its steps
    try:
        return _time_steps(cfg, device, seconds)
    finally:  # the steps' memory, freed with them, back to the kernel: the process may be a server
        release_freed_memory()


def _time_steps(cfg: TrainConfig, device: torch.device, seconds: float) -> Rate:
    """`measure`'s timing, with the CPU's random state left as it was (a run seeds itself anyway)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GPT(cfg.model).to(device)
        optimizers = build_optimizers(model, cfg)
        autocast = autocast_context(cfg.dtype, device)
        B, T = cfg.batch_size, cfg.model.block_size
        data = torch.randint(cfg.model.vocab_size, (B, T + 1), device=device)
        x, y = data[:, :-1].contiguous(), data[:, 1:].contiguous()

        def step() -> float:  # the run reads the loss every step: the same synchronisation
            return optimizer_step(model, model, optimizers, cfg, lambda: (x, y), autocast)

        model.train()
        step()  # warm-up: allocations, the optimizers' state
        train_s = _timed(step, seconds)
        model.eval()
        with torch.no_grad():
            model(x, y)  # warm-up without gradients
            eval_s = _timed(lambda: model(x, y)[1].item(), seconds / 4, EVAL_BATCHES, EVAL_BATCHES)
        checkpoint_s = _checkpoint_seconds(model, optimizers)
    tokens = B * T * cfg.grad_accum
    return Rate(tokens / train_s, B * T / eval_s, checkpoint_s, "measured")


def _timed(fn, seconds: float, min_calls: int = MIN_STEPS, max_calls: int = MAX_STEPS) -> float:
    """Median seconds per call of `fn`: at least `min_calls`, then more while under `seconds` in all.

    The median, as one slow call in three (the machine busy for a moment, a step still faulting its
    memory in) must not set the rate a whole run is planned at."""
    times: list[float] = []
    while len(times) < min_calls or (len(times) < max_calls and sum(times) < seconds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _checkpoint_seconds(model: GPT, optimizers) -> float:
    """Seconds to write what an evaluation writes: the weights twice (the best model, the latest state)
    and the optimizers' state once."""
    with tempfile.TemporaryDirectory(prefix="quill-measure-") as tmp:
        t0 = time.perf_counter()
        for name in ("best.pt", "last.pt"):
            torch.save(model.state_dict(), Path(tmp) / name)
        torch.save([o.state_dict() for o in optimizers], Path(tmp) / "state.pt")
        return time.perf_counter() - t0


def _read(path: Path) -> dict:
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}
