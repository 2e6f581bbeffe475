"""The automatic CPU recipe: a full `TrainConfig` sized for a text and a time budget.

`quill train --data PATH --minutes N` (no config file) trains with `recipe`. Every rule below
comes from a run in docs/results.md ("Recipe rules" there gives the same rules with their evidence);
the anchor is the speedrun, `configs/shakespeare-speedrun.json`: 6 × 256 on Tiny Shakespeare (1.1 MB)
for 19.5 minutes, 1.4667 on the whole validation split. At that size and budget the recipe resolves
to that config, but for the 12-epoch cap on `max_iters` (rule 4), which that run did not reach.

1. Throughput, measured. Before choosing, a few training steps of each candidate shape are timed on
   this machine at the run's batch, context and dtype, and cached per machine and shape
   (`quillgpt.throughput`, seconds per shape). The rate is the median step, timed in a process whose
   malloc keeps freed memory as the run's does (`keep_freed_memory`): steps still faulting their
   memory in had planned runs well under what they saw. The chosen shape is timed once more with its
   dropout, which the ladder leaves out, and whenever its rate came from the cache, since a virtual
   machine's speed drifts from hour to hour. The planned tokens are the steps that fit the budget at
   that rate, less the evaluations (their batches at the measured forward rate, their checkpoints)
   and, for a compiled run, the compile warm-up. Compiling is not timed before a run, as it takes up
   to a minute. A compiled run records what it did (its steady steps over the plan's eager rate, its
   first step's extra seconds) for the next plans on the machine (`learn_from_run`). Before the
   first, the reference machine's `COMPILE_SPEEDUP` and `COMPILE_SECONDS` stand. The reference
   machine's FLOP rate (`reference_rate`) is what the recipe assumed before it measured; it
   overestimated other CPUs by up to 1.6×.
2. Shape: a ladder of shapes with 64-wide heads (4 × 128, 4 × 192, 6 × 256, 8 × 384, 10 × 512).
   Take the largest whose planned tokens reach 1.1 × its non-embedding parameter count (the speedrun
   planned 1.12 and won; 6 × 384 at that budget, ~0.5, lost: attempt 2; seeing 0.86–0.96 (one planned
   1.02), the larger shape lost to the smaller one in the three pairs run for issue 27; timed
   from small to large, up to the first one not fed), and
   whose parameters are at most 5 × the training tokens (Tiny Shakespeare: 4.7 and fine). The
   smallest shape is the floor.
3. Tokenizer: characters, unless the training text is longer than the 16M characters the 6 × 256
   character model reads in an hour: then byte-level BPE with 4,096 tokens, whose tokens each carry
   ~3.3 bytes of English (2.9–4.0 measured), so the same steps cover ~3× the text. Also BPE when
   the text has more distinct characters than the BPE vocabulary. Tiny Shakespeare (1.1 MB), TinyStories (2.9 MB)
   and the Gutenberg selection (5.8 MB) stay character-level at every budget.
4. Epochs: at most 12 passes over the training text (`max_iters`; the schedule follows whichever
   of steps and time is further along). Beyond ~10–15 the 4.75M model overfits ~1 MB (attempts 3
   and 10: the validation loss rose during the decay); 12 epochs with dropout 0.2 was the best run
   (attempt 4). So a small text ends before its minutes are up.
5. Dropout: 0 up to 6 planned epochs (the speedrun: 5.4 epochs, dropout 0); 0.2 beyond (attempts 4
   and 11; 0.15 overfit, 0.25 learned slower); 0.3 when the model has more than 5 parameters per
   training token (a small text: extrapolated, not measured). Never on attention weights (it takes
   attention off the fused CPU kernel: attempt 1).
6. Context 256 tokens (attempt 8: 512 did not pay on ~1M characters), shortened to a power of two
   (≥ 32) for texts whose validation split cannot hold 4 windows. Batch 16, halved (to 4 at least)
   until an epoch is 50 steps or more, so a small text still gets a few hundred updates
   (extrapolated, not measured).
7. Optimizers and schedule, as the speedrun: Muon (lr 0.02, momentum 0.95) on the block matrices,
   AdamW (lr 3e-3, betas 0.9/0.99, no weight decay: attempt 5) on the rest; constant learning rate,
   then a linear decay over the second half of the wall-clock budget (attempt 7: an earlier decay
   gained nothing). The budget keeps min(0.5, 5%) of the minutes for start-up and the final
   whole-split evaluation (the speedrun: 19.5 of 20).
8. `torch.compile` for runs of 10 minutes or more (after rule 4): its warm-up (about a minute on
   2 cores, not measured separately) is repaid by the 18% faster steps only in longer runs.
9. Evaluation about 5 times per run (every planned_steps / 5 steps, between 25 and 250), on 20
   batches (10 below 100 steps apart), so a short run still draws a validation curve.

Not in the recipe, though they helped the 48-minute model: bfloat16 matmuls (+9–30% tokens/s, but
not measured against the speedrun at 20 minutes) and an EMA of the weights (+0.004, inside the
0.008 seed-to-seed spread of attempt 9).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from quillgpt.config import ConfigError, GPTConfig, TrainConfig
from quillgpt.rundir import pace, read_metrics, read_plan
from quillgpt.throughput import Compiled, Rate, cached_rate, fresh_rate, record_compiled

RateFn = Callable[[TrainConfig], Rate]
"""How fast a config trains (eager): `cached_rate` measures this machine, `reference_rate` assumes another."""
REFERENCE_FLOPS = 142e9
"""Eager training FLOP/s of the optimizer steps on the reference machine (2 cores): 4,289 tokens/s at 6 × 256,
33M FLOPs per token (docs/results.md). With compiling, evaluations and checkpoints, the speedrun saw 4,580."""
REFERENCE_CHECKPOINT_S = 0.5
COMPILE_SPEEDUP = 1.18
"""Compiled over eager tokens/s at 6 × 256 on the reference machine (5,043 / 4,289, docs/results.md): what a
plan assumes until a compiled run on its machine has measured it (`learn_from_run`)."""
COMPILE_SECONDS = 60.0
"""The compile warm-up inside the first step on the reference machine (about a minute on 2 cores, torch's
kernel cache empty): assumed likewise."""
OPTIMISM = 1.5
"""A larger shape runs at most this much faster, in FLOP/s, than the next smaller one measured: past that,
it is not timed."""
SHAPES = ((4, 128), (4, 192), (6, 256), (8, 384), (10, 512))
"""(n_layer, n_embd) from small to large; heads are 64 wide."""
HEAD_DIM = 64
TOKENS_PER_PARAM = 1.1
"""Planned training tokens per block parameter for a shape to count as fed (rule 2)."""
MAX_PARAMS_PER_TRAIN_TOKEN = 5.0
MAX_EPOCHS = 12.0
BPE_VOCAB = 4096
BPE_BYTES_PER_TOKEN = 3.3
"""Bytes per token of a 4,096-token byte-level BPE trained on the training split, measured on the
validation split: 2.9 on Tiny Shakespeare, 3.1 on the Gutenberg selection, 4.0 on TinyStories."""
BPE_FROM_CHARS = 16_000_000
"""Characters the 6 × 256 character model reads in 60 minutes at the reference rate (16.1M)."""
CONTEXT = 256
MIN_CONTEXT = 32
BATCH = 16
MIN_BATCH = 4
MIN_STEPS_PER_EPOCH = 50
VAL_FRACTION = 0.1
COMPILE_FROM_MINUTES = 10.0
MIN_CHARS = 1_000
"""Shorter texts cannot fill a validation split of a few windows of the smallest context."""


class RecipeError(ConfigError):
    """A text or budget the recipe cannot size a run for."""


@dataclass(frozen=True)
class TextStats:
    """What the recipe needs to know about a text."""

    chars: int
    bytes: int
    distinct: int

    @classmethod
    def of(cls, text: str) -> TextStats:
        return cls(len(text), len(text.encode("utf-8")), len(set(text)))


@dataclass(frozen=True)
class Plan:
    """The recipe's choice and the estimates behind it."""

    config: TrainConfig
    tokens: float
    """Tokens the run is expected to train on."""
    epochs: float
    """Passes over the training split."""
    params: int
    """Non-embedding parameters (the blocks)."""
    shortened: bool
    """The run ends at MAX_EPOCHS passes, before its minutes are up."""
    rate: Rate
    """How fast the chosen shape trains here (eager), and whether that was measured now or before."""

    def to_dict(self, minutes: float) -> dict:
        """What `quill train --data` saves as recipe.json beside the run: the plan, to compare with what it saw."""
        cfg = self.config
        return {
            "minutes": minutes,
            "description": describe(self, minutes),
            "tokens": round(self.tokens),
            "steps": round(self.tokens / (cfg.batch_size * cfg.grad_accum * cfg.model.block_size)),
            "epochs": round(self.epochs, 3),
            "block_params": self.params,
            "shortened": self.shortened,
            "compiled": cfg.compile,
            "rate": self.rate.to_dict(),
        }


def block_params(n_layer: int, n_embd: int) -> int:
    """Weights of the blocks: q, k, v, the attention projection (4 d²) and a 4d-wide MLP (8 d²).
    Norms have no weights and linears no biases in this recipe."""
    return 12 * n_layer * n_embd * n_embd


def shape_flops(n_layer: int, n_embd: int, vocab: int, context: int) -> float:
    """Training FLOPs per token of a ladder shape, counting the blocks and the untied LM head as weights."""
    shape = GPTConfig(vocab_size=vocab, block_size=context, n_layer=n_layer, n_head=n_embd // HEAD_DIM, n_embd=n_embd)
    return shape.flops_per_token(block_params(n_layer, n_embd) + n_embd * vocab)


def reference_rate(cfg: TrainConfig) -> Rate:
    """The reference machine's rate (rule 1), from FLOPs: what the recipe assumed before it measured, and
    what the tests size runs with, so that their plans do not depend on the machine running them."""
    m = cfg.model
    tokens_per_s = REFERENCE_FLOPS / shape_flops(m.n_layer, m.n_embd, m.vocab_size, m.block_size)
    return Rate(tokens_per_s, 3 * tokens_per_s, REFERENCE_CHECKPOINT_S, "reference")


def training_tokens(rate: Rate, cfg: TrainConfig, seconds: float) -> tuple[float, int, int]:
    """Tokens the optimizer steps of `cfg` see in `seconds` of a run's budget at `rate` (rule 1), with the
    evaluations' interval and batches (rule 9) that go with them.

    The budget (`max_minutes`) counts from the first step: it holds the steps, the compile warm-up (in
    the first step) and every evaluation with its checkpoint. Start-up and the final whole-split
    evaluation come after it, in the minutes the budget leaves out (rule 7)."""
    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.model.block_size
    speedup, start_s = compile_figures(rate) if cfg.compile else (1.0, 0.0)
    step_s = tokens_per_step / (rate.train_tokens_per_s * speedup)
    available = max(seconds - start_s, 0.0)
    steps = available / step_s
    for _ in range(4):  # the interval depends on the steps, the steps on the evaluations the interval brings
        interval, batches = _eval_schedule(steps)
        eval_s = 2 * batches * cfg.batch_size * cfg.model.block_size / rate.eval_tokens_per_s + rate.checkpoint_s
        steps = _steps_with_evals(available, step_s, interval, eval_s)
    interval, batches = _eval_schedule(steps)
    return steps * tokens_per_step, interval, batches


def compile_figures(rate: Rate) -> tuple[float, float]:
    """What compiling does for a run here (rule 1): (speed-up over eager steps, start-up seconds), as the
    last compiled run on this machine measured them, else the reference machine's."""
    if rate.compiled is not None:
        return rate.compiled.speedup, rate.compiled.start_s
    return COMPILE_SPEEDUP, COMPILE_SECONDS


def learn_from_run(run: Path, cfg: TrainConfig) -> Compiled | None:
    """After a compiled run the recipe planned (without overrides): what compiling did for it, from its own
    steps against the eager rate its plan measured, kept for the plans that follow on this machine; what
    they will read (the median of the runs kept)."""
    try:
        plan = read_plan(run)
    except (OSError, ValueError):
        return None
    run_pace = pace(read_metrics(run))
    if not cfg.compile or plan.get("overrides") or run_pace is None:
        return None
    return record_compiled(cfg, Compiled(run_pace.tokens_per_s / plan["rate"]["train_tokens_per_s"], run_pace.start_s))


def _steps_with_evals(available: float, step_s: float, interval: int, eval_s: float) -> float:
    """Steps a budget holds when every `interval`-th step is followed by an evaluation of `eval_s`: with k
    evaluations, the steps the rest of the time holds, if they do not reach the (k+1)-th; else the budget
    ends during the k-th evaluation, at its step. (The evaluation of the last step comes after the budget.)"""
    k = 0
    while True:
        steps = (available - k * eval_s) / step_s
        if steps < (k + 1) * interval:
            return max(steps, k * interval)
        k += 1


def _eval_schedule(steps: float) -> tuple[int, int]:
    """Rule 9: evaluate about 5 times, every 25 to 250 steps, on 20 batches (10 when closer than 100)."""
    interval = int(min(250, max(25, steps // 5)))
    return interval, 20 if interval >= 100 else 10


def recipe(stats: TextStats, minutes: float, data_path: str | None = None, rate: RateFn | None = None) -> Plan:
    """The recipe's config for a text of these stats and a budget of `minutes` (wall clock).

    `rate` says how fast a config trains: by default measured on this machine (`cached_rate`: a few
    seconds per shape the first time, then the chosen shape's second or so again, `fresh_rate`); a
    `rate` given is taken as it is (`cached_rate`: the cache alone; `reference_rate`: the reference
    machine)."""
    if minutes <= 0:
        raise RecipeError(f"minutes must be > 0, got {minutes}")
    if stats.chars < MIN_CHARS:
        raise RecipeError(
            f"the text has {stats.chars:,} characters: too short to train on; the recipe needs at least "
            f"{MIN_CHARS:,} (the last {VAL_FRACTION:.0%} validates, in windows of {MIN_CONTEXT}+ characters)"
        )
    retime, rate = rate is None, rate or cached_rate
    budget = minutes - min(0.5, 0.05 * minutes)
    compiled = minutes >= COMPILE_FROM_MINUTES
    seconds = budget * 60

    # rule 3: characters, unless the text is longer than an hour's character-level run reads
    train_chars = stats.chars * (1 - VAL_FRACTION)
    bpe = train_chars > BPE_FROM_CHARS or stats.distinct > BPE_VOCAB
    scale = BPE_BYTES_PER_TOKEN if bpe else 1.0
    size = stats.bytes if bpe else stats.chars
    train_tokens = size * (1 - VAL_FRACTION) / scale
    context = _context(size * VAL_FRACTION / scale)
    vocab = BPE_VOCAB if bpe else stats.distinct
    # rule 6: batch 16, smaller until an epoch has MIN_STEPS_PER_EPOCH steps
    batch = BATCH
    while batch > MIN_BATCH and train_tokens / (batch * context) < MIN_STEPS_PER_EPOCH:
        batch //= 2

    def config(n_layer: int, n_embd: int, dropout: float = 0.0, eval_interval: int = 250, eval_iters: int = 20):
        return _config(data_path, bpe, budget, train_tokens, batch, context, n_layer, n_embd, dropout, compiled,
                       eval_interval, eval_iters)  # fmt: skip

    # rule 2: the largest shape of the ladder that the budget and the text can feed, at this machine's rate
    chosen = None
    for n_layer, n_embd in SHAPES:
        params = block_params(n_layer, n_embd)
        if chosen is not None:
            last_layer, last_embd, last_tokens, last_params, _ = chosen
            if last_tokens < TOKENS_PER_PARAM * last_params or params > MAX_PARAMS_PER_TRAIN_TOKEN * train_tokens:
                break  # the smaller shape is not fed already, or the text is too small for this one
            flops_ratio = shape_flops(last_layer, last_embd, vocab, context) / shape_flops(
                n_layer, n_embd, vocab, context
            )
            if OPTIMISM * last_tokens * flops_ratio < TOKENS_PER_PARAM * params:
                break  # not fed even at OPTIMISM × the FLOP rate just measured: no need to time it
        cfg = config(n_layer, n_embd)
        measured = rate(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab)))
        tokens, _, _ = training_tokens(measured, cfg, seconds)
        if chosen is not None and tokens < TOKENS_PER_PARAM * params:
            break
        chosen = (n_layer, n_embd, tokens, params, measured)
    n_layer, n_embd, tokens, params, measured = chosen

    # rule 5: dropout by the epochs the ladder planned, more where the model outsizes the text
    dropout = 0.0 if tokens / train_tokens <= 6 else 0.2
    if params > MAX_PARAMS_PER_TRAIN_TOKEN * train_tokens:
        dropout = 0.3
    # rule 1 again: the run's own config is timed, its dropout included (the ladder times none), and
    # timed afresh where its figure came from the cache (the machine's speed drifts)
    if dropout or (retime and measured.source == "cached"):
        cfg = config(n_layer, n_embd, dropout)
        timed = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab))
        measured = fresh_rate(timed) if retime else rate(timed)
        tokens, _, _ = training_tokens(measured, cfg, seconds)

    # rule 4: at most MAX_EPOCHS passes (max_iters below): a small text ends early
    epochs = tokens / train_tokens
    shortened = epochs > MAX_EPOCHS
    if shortened:
        seconds *= MAX_EPOCHS / epochs
        tokens, epochs = MAX_EPOCHS * train_tokens, MAX_EPOCHS
        compiled = compiled and seconds >= COMPILE_FROM_MINUTES * 60  # rule 8 holds for the shortened run

    eval_interval, eval_iters = _eval_schedule(tokens / (batch * context))
    cfg = config(n_layer, n_embd, dropout, eval_interval, eval_iters)
    return Plan(cfg, tokens, epochs, params, shortened, measured)


def _config(
    data_path, bpe, budget, train_tokens, batch, context, n_layer, n_embd, dropout, compiled, eval_interval, eval_iters
) -> TrainConfig:
    """The run's config for the recipe's choices (rule 7's optimizers and schedule are fixed)."""
    model = GPTConfig(
        block_size=context,
        n_layer=n_layer,
        n_head=n_embd // HEAD_DIM,
        n_embd=n_embd,
        dropout=dropout,
        attn_dropout=0.0 if dropout else None,
        bias=False,
        pos_emb="rope",
        norm="rmsnorm",
        norm_affine=False,
        qk_norm=True,
        activation="relu2",
        tie_embeddings=False,
        zero_init_proj=True,
        logit_softcap=15.0,
    )
    return TrainConfig(
        data_path=data_path,
        tokenizer="bpe" if bpe else "char",
        bpe_vocab_size=BPE_VOCAB,
        max_minutes=round(budget, 2),
        max_iters=math.ceil(MAX_EPOCHS * train_tokens / (batch * context)),
        batch_size=batch,
        optimizer="muon",
        muon_lr=0.02,
        muon_momentum=0.95,
        learning_rate=3e-3,
        beta1=0.9,
        beta2=0.99,
        weight_decay=0.0,
        lr_schedule="trapezoid",
        decay_frac=0.5,
        warmup_iters=0,
        grad_clip=1.0,
        eval_interval=eval_interval,
        eval_iters=eval_iters,
        compile=compiled,
        val_fraction=VAL_FRACTION,
        seed=1337,
        model=model,
    )


def _context(val_tokens: float) -> int:
    """CONTEXT, or the largest power of two (≥ MIN_CONTEXT) of which the validation split holds 4 windows."""
    context = CONTEXT
    while context > MIN_CONTEXT and val_tokens < 4 * (context + 1):
        context //= 2
    return context


def describe(plan: Plan, minutes: float) -> str:
    """The recipe's choice in one line, as `quill train --data` prints it."""
    cfg, m = plan.config, plan.config.model
    tokenizer = f"BPE {cfg.bpe_vocab_size:,}" if cfg.tokenizer == "bpe" else "characters"
    regular = f"dropout {m.dropout:g}" if m.dropout else "no dropout"
    early = f", ends early after {cfg.max_iters:,} steps" if plan.shortened else ""
    eager = ""
    if cfg.compile:
        speedup, _ = compile_figures(plan.rate)
        runs = plan.rate.compiled.runs if plan.rate.compiled is not None else 0
        measured = f"as {runs} run{'s' if runs > 1 else ''} here measured" if runs else "assumed"
        eager = f" before compiling, ×{speedup:.2f} compiled ({measured})"
    return (
        f"recipe for {minutes:g} min: {tokenizer}, {m.n_layer} layers × {m.n_embd} ({m.n_head} heads, "
        f"{_millions(plan.params)} block parameters), context {m.block_size}, batch {cfg.batch_size}, {regular}, "
        f"Muon {cfg.muon_lr:g} + AdamW {cfg.learning_rate:g}, constant then linear decay over the last "
        f"{cfg.decay_frac:.0%} of {cfg.max_minutes:g} min{', compiled' if cfg.compile else ''}; "
        f"~{_millions(plan.tokens)} tokens, {plan.epochs:.1f} epochs{early} "
        f"at {plan.rate.train_tokens_per_s:,.0f} tokens/s ({plan.rate.source}){eager}"
    )


def _millions(n: float) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n / 1e3:.0f}k"
