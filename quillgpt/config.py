"""Typed configuration: the model's shape (`GPTConfig`) and a training run (`TrainConfig`).

A training config is one flat JSON object, as in the original QuillGPT (`batch_size, block_size,
max_iters, eval_interval, learning_rate, eval_iters, n_embd, n_head, n_layer, dropout`, ...).
`load_train_config` splits it into the two dataclasses; unknown keys are an error that names the
nearest valid key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints


class ConfigError(ValueError):
    """A configuration value or key that cannot be used."""


@dataclass
class GPTConfig:
    """Shape and options of a GPT decoder. Defaults are GPT-2's choices."""

    vocab_size: int = 65
    """Number of token ids the embedding and the LM head cover."""
    block_size: int = 256
    """Context length: the most tokens the model attends over."""
    n_layer: int = 6
    """Number of transformer blocks."""
    n_head: int = 6
    """Attention heads per block."""
    n_embd: int = 384
    """Width of the residual stream."""
    head_size: int | None = None
    """Width of one attention head; defaults to n_embd // n_head. n_head * head_size may differ from
    n_embd (the original QuillGPT's 226M model: n_embd=1024, n_head=12, heads of 85)."""
    mlp_hidden: int | None = None
    """Hidden width of the MLP; defaults to 4 * n_embd (SwiGLU: 8/3 * n_embd, rounded up to 8)."""
    dropout: float = 0.0
    """Dropout on embeddings, attention weights and residual branches while training."""
    attn_dropout: float | None = None
    """Dropout on attention weights, if different from `dropout`. On CPU any attention dropout
    moves scaled_dot_product_attention off its fused kernel (about 25% slower training)."""
    bias: bool = True
    """Biases in linear layers and norms (GPT-2: yes)."""
    qkv_bias: bool | None = None
    """Biases on the query, key and value projections; None follows `bias`. The original QuillGPT had
    biases everywhere except on q, k and v."""
    lm_head_bias: bool = False
    """A bias on the LM head (the original QuillGPT had one; GPT-2 has none)."""
    pos_emb: Literal["learned", "rope"] = "learned"
    """Learned absolute position embeddings (GPT-2) or rotary embeddings applied to q and k."""
    rope_base: float = 10000.0
    """Base of the rotary frequencies."""
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    """Normalisation before attention, before the MLP and before the LM head."""
    norm_affine: bool = True
    """Whether norms have a learned scale (and, for LayerNorm with bias, a shift)."""
    norm_eps: float = 1e-5
    """Epsilon inside the norms."""
    activation: Literal["gelu", "gelu_exact", "relu", "relu2", "swiglu"] = "gelu"
    """MLP non-linearity. "gelu" is GPT-2's tanh approximation, "gelu_exact" the erf form (nanoGPT's
    nn.GELU()); "relu2" is ReLU squared."""
    tie_embeddings: bool = True
    """Share the token embedding matrix with the LM head (GPT-2: yes)."""
    qk_norm: bool = False
    """Normalise queries and keys per head (with the model's norm type) before attention."""
    logit_softcap: float | None = None
    """If set, logits become softcap * tanh(logits / softcap)."""
    zero_init_proj: bool = False
    """Initialise the residual output projections (and an untied LM head) to zero."""

    def __post_init__(self) -> None:
        _check_types(self)
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.head_size is None:
            if self.n_embd % self.n_head:
                raise ConfigError(
                    f"n_embd ({self.n_embd}) is not divisible by n_head ({self.n_head}); "
                    "set head_size explicitly to use heads of another width"
                )
        elif self.head_size < 1:
            raise ConfigError(f"head_size must be >= 1, got {self.head_size}")
        if self.pos_emb == "rope" and self.head_dim % 2:
            raise ConfigError(f"rotary embeddings need an even head size, got {self.head_dim}")
        if self.mlp_hidden is not None and self.mlp_hidden < 1:
            raise ConfigError(f"mlp_hidden must be >= 1, got {self.mlp_hidden}")
        for name in ("dropout", "attn_dropout"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {value}")
        if self.logit_softcap is not None and self.logit_softcap <= 0:
            raise ConfigError(f"logit_softcap must be > 0, got {self.logit_softcap}")
        if self.norm_eps <= 0:
            raise ConfigError(f"norm_eps must be > 0, got {self.norm_eps}")

    NOT_ARCHITECTURE = ("dropout", "attn_dropout", "zero_init_proj")
    """Fields that only shape training (regularisation, initialisation): two models that differ in
    them load each other's weights and compute the same function."""

    def architecture(self) -> dict[str, Any]:
        """The fields that fix the weights' shapes and what the model computes with them: two
        checkpoints are compatible exactly when these are equal."""
        return {k: v for k, v in self.to_dict().items() if k not in self.NOT_ARCHITECTURE}

    def architecture_differences(self, other: GPTConfig) -> list[str]:
        """The architecture fields whose values differ between this config and `other`."""
        mine, theirs = self.architecture(), other.architecture()
        return [k for k in mine if mine[k] != theirs[k]]

    def flops_per_token(self, params: int) -> float:
        """Training FLOPs per token, forward and backward (PaLM's appendix B, as nanoGPT counts them):
        6 per weight for `params` non-embedding weights (nanoGPT: all but the position embeddings), plus
        12·L·H·Q·T for the attention scores and their weighted sum over a full context."""
        return 6 * params + 12 * self.n_layer * self.n_head * self.head_dim * self.block_size

    @property
    def head_dim(self) -> int:
        return self.head_size if self.head_size is not None else self.n_embd // self.n_head

    @property
    def hidden_dim(self) -> int:
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        if self.activation == "swiglu":
            return -(-(8 * self.n_embd // 3) // 8) * 8
        return 4 * self.n_embd

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPTConfig:
        _reject_unknown(d, cls, "model config")
        return cls(**d)


@dataclass
class TrainConfig:
    """A training run. Keys of the original QuillGPT keep their names and meaning."""

    data_path: str | None = None
    """Text file, folder of .txt files, or registered dataset name (see `quill data list`)."""
    batch_size: int = 16
    """Sequences per optimizer micro-step (per process under torchrun)."""
    max_iters: int = 5000
    """Optimizer steps."""
    max_minutes: float | None = None
    """Optional wall-clock budget; when set the LR schedule follows time instead of steps."""
    eval_interval: int = 500
    """Evaluate (and checkpoint) every this many steps."""
    eval_iters: int = 200
    """Batches per split in each evaluation (fixed, deterministic batches)."""
    final_eval: bool = True
    """At the end, score the best checkpoint on the whole validation split (as `quill eval` does)."""
    learning_rate: float = 1e-3
    """Peak learning rate of AdamW (for all parameters, or those Muon does not handle)."""
    min_lr: float = 0.0
    """Learning rate at the end of the schedule, as an absolute value."""
    warmup_iters: int = 0
    """Linear warmup steps."""
    lr_schedule: Literal["cosine", "linear", "constant", "trapezoid"] = "cosine"
    """Decay after warmup. "trapezoid" holds the peak, then decays linearly over `decay_frac`."""
    decay_frac: float = 0.5
    """Fraction of the run spent decaying, for the trapezoid schedule."""
    weight_decay: float = 0.1
    """AdamW weight decay, applied to matrices only (never to norms, biases or embeddings)."""
    ema_decay: float = 0.0
    """Keep an exponential moving average of the weights with this decay per step (0: off). Once it
    starts, evaluations, the best checkpoint and the final model use the average."""
    ema_start: float = 0.0
    """Fraction of the run (of the steps, or of the time budget) before the average starts; with
    the trapezoid schedule, `1 - decay_frac` averages over the decay phase only."""
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    grad_accum: int = 1
    """Micro-steps per optimizer step."""
    optimizer: Literal["adamw", "muon"] = "adamw"
    """"muon": Muon for the 2-D weight matrices of the blocks, AdamW for everything else."""
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    seed: int = 1337
    device: str = "auto"
    """"auto" (cuda, then mps, then cpu) or a torch device string."""
    compile: bool = False
    """Wrap the model in torch.compile."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Precision of the matmuls under autocast; weights, gradients and optimizer state stay float32.
    "auto": bfloat16 on CUDA GPUs that support it, float32 elsewhere. On a CPU with AVX512-BF16 or
    AMX, "bfloat16" runs the matmuls 2-3x faster (docs/results.md has the measurements)."""
    save_dtype: Literal["float32", "bfloat16", "int8"] = "float32"
    """How the best model's weights are stored in the output directory, for a shipped model's size:
    "bfloat16" halves the file (a rounding that cost ~0.0003 nats on the Shakespeare model); "int8"
    quarters it (each matrix row scaled to int8, `checkpoint.int8_rows`). They load into float32 as
    usual, and the costs are measured in docs/results.md. last/ (what resumes) stays float32."""
    threads: int | None = None
    """torch.set_num_threads for CPU training (default: torch's choice)."""
    tokenizer: Literal["char", "bpe", "gpt2"] = "char"
    """Character-level, byte-level BPE trained on the data, or GPT-2's BPE files."""
    bpe_vocab_size: int = 4096
    """Vocabulary size when training a BPE tokenizer."""
    val_fraction: float = 0.1
    """The last this fraction of the text is validation (nanoGPT's and QuillGPT's split)."""
    val_split: Literal["concat", "per_file"] = "concat"
    """"concat": the last `val_fraction` of a folder's files joined; "per_file": the last
    `val_fraction` of each file, so every book is in validation (`quill eval --val-split`)."""
    unk_token: bool = False
    """Char tokenizer: reserve an unknown-character token. The vocabulary is then the characters
    seen at least `min_char_count` times in the training split; rarer ones (and, later, any text's
    new characters) become the unknown token, which `quill eval` charges honestly."""
    min_char_count: int = 1
    """With `unk_token`: how often a character must occur in the training split to get its own id."""
    reflow_fraction: float = 0.0
    """Layout augmentation: this fraction of the training text's hard-wrapped paragraphs is re-flowed
    to one line each (in runs of paragraphs chosen at random, seeded), so the model learns both
    layouts. Validation text is left as it is."""
    default_prompt: str | None = None
    """Where the playground starts the trained model (saved in its provenance; default: the
    registered dataset's, e.g. "ROMEO:" for tinyshakespeare)."""
    vocab_size: int | None = None
    """Legacy key: checked against the tokenizer if given."""
    encode: dict[str, int] | None = None
    """Legacy key: the original QuillGPT's character-to-id map."""
    decode: dict[str, str] | None = None
    """Legacy key: the original QuillGPT's id-to-character map."""
    model: GPTConfig = field(default_factory=GPTConfig)

    def __post_init__(self) -> None:
        _check_types(self)
        for name in ("batch_size", "max_iters", "eval_interval", "eval_iters", "grad_accum"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.min_lr <= self.learning_rate:
            raise ConfigError(f"min_lr must be in [0, learning_rate], got {self.min_lr}")
        if self.warmup_iters < 0:
            raise ConfigError(f"warmup_iters must be >= 0, got {self.warmup_iters}")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if not 0 <= self.reflow_fraction <= 1:
            raise ConfigError(f"reflow_fraction must be in [0, 1], got {self.reflow_fraction}")
        if self.min_char_count < 1:
            raise ConfigError(f"min_char_count must be >= 1, got {self.min_char_count}")
        if not 0 < self.decay_frac <= 1:
            raise ConfigError(f"decay_frac must be in (0, 1], got {self.decay_frac}")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ConfigError(f"max_minutes must be > 0, got {self.max_minutes}")
        for name in ("beta1", "beta2", "muon_momentum", "ema_decay", "ema_start"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.bpe_vocab_size < 257:
            raise ConfigError(f"bpe_vocab_size must be >= 257 (256 bytes + 1), got {self.bpe_vocab_size}")

    def to_dict(self) -> dict[str, Any]:
        """The flat JSON form (model keys at the top level, like the original configs)."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "model"}
        d.update(self.model.to_dict())
        return {k: v for k, v in d.items() if v is not None or k in _NULLABLE_KEEP}


_NULLABLE_KEEP = {"data_path"}
_MODEL_KEYS = {f.name for f in fields(GPTConfig)}
_TRAIN_KEYS = {f.name for f in fields(TrainConfig)} - {"model"}
# The original QuillGPT spelled the context length `block_size` in both places; it belongs to
# the model here, and vocab_size comes from the tokenizer, so the legacy keys are accepted.
_ALL_KEYS = _MODEL_KEYS | _TRAIN_KEYS


def train_config_from_dict(d: dict[str, Any]) -> TrainConfig:
    """Build a TrainConfig from the flat JSON form. Raises ConfigError on unknown keys."""
    _reject_unknown(d, None, "config")
    model_kw = {k: v for k, v in d.items() if k in _MODEL_KEYS and k != "vocab_size"}
    train_kw = {k: v for k, v in d.items() if k in _TRAIN_KEYS}
    try:
        model = GPTConfig(**model_kw)
    except TypeError as e:  # pragma: no cover - unknown keys are caught above
        raise ConfigError(str(e)) from e
    return TrainConfig(**train_kw, model=model)


def load_train_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read a JSON training config and apply `key=value` overrides (values parsed as JSON)."""
    path = Path(path)
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path} must hold a JSON object, got {type(d).__name__}")
    d.update(parse_overrides(overrides or []))
    return train_config_from_dict(d)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`["lr=3e-4", "compile=true", "data_path=x.txt"]` → dict; non-JSON values stay strings."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override must look like key=value, got {item!r}")
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


def _reject_unknown(d: dict[str, Any], cls: type | None, what: str) -> None:
    valid = {f.name for f in fields(cls)} if cls is not None else _ALL_KEYS
    for key in d:
        if key not in valid:
            near = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.5)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ConfigError(f"unknown {what} key {key!r}{hint}")


def _check_types(obj: Any) -> None:
    """Validate field types (JSON gives ints for floats, which is fine; bool is not an int here)."""
    hints = get_type_hints(type(obj))
    for f in fields(obj):
        if f.name == "model":
            continue
        value = getattr(obj, f.name)
        if not _matches(value, hints[f.name]):
            raise ConfigError(f"{f.name} has an invalid value {value!r} (expected {_describe(hints[f.name])})")
        if isinstance(value, int) and not isinstance(value, bool) and hints[f.name] in (float, float | None):
            setattr(obj, f.name, float(value))


def _matches(value: Any, tp: Any) -> bool:
    origin = get_origin(tp)
    if origin is Literal:
        return value in get_args(tp)
    if origin is not None and type(None) in get_args(tp):  # Optional[X]
        return value is None or any(_matches(value, a) for a in get_args(tp) if a is not type(None))
    if origin is dict:
        return isinstance(value, dict)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def _describe(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " or ".join(repr(a) for a in get_args(tp))
    args = [a for a in get_args(tp) if a is not type(None)]
    if args:
        return " or ".join(_describe(a) for a in args) + " or null"
    return getattr(tp, "__name__", str(tp))
