"""`quill export onnx`: one ONNX graph that prefills and decodes with a key/value cache, and
`OnnxDecoder`, which runs it with onnxruntime.

The graph takes `input_ids` (B, T) and the keys and values of the P tokens before them,
`past_keys`/`past_values` (n_layer, B, n_head, P, head_size); it returns `logits` (B, T, V) and
`present_keys`/`present_values` with P + T positions. A prefill passes P = 0. The new tokens sit at
positions P..P+T-1, so every row of a batch has the same length. ONNX has no in-place buffers, so
instead of our preallocated `KVCache` the graph concatenates; the model's own forward runs with
`ConcatCache` (a `quillgpt.kvcache.Cache`) in the cache's place, so the exported computation is the
one we test.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from quillgpt.checkpoint import CheckpointError, LoadedModel
from quillgpt.config import GPTConfig
from quillgpt.kvcache import Cache, CacheStep, pytorch_attention
from quillgpt.model import GPT

INPUTS = ("input_ids", "past_keys", "past_values")
OUTPUTS = ("logits", "present_keys", "present_values")
METADATA_KEY = "quillgpt_config"


class ConcatCache(Cache, CacheStep):
    """The cache the exported graph decodes with, and its own step (`quillgpt.kvcache`'s protocol):
    past keys and values in, all of them out; PyTorch's attention (the graph has no place for the
    CPU kernel)."""

    def __init__(self, past_keys: torch.Tensor, past_values: torch.Tensor):
        self.past_keys, self.past_values = past_keys, past_values
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.mask: torch.Tensor | None = None
        self.causal = False

    def prepare(self, pos: torch.Tensor) -> ConcatCache:
        kv_len = self.past_keys.shape[3] + pos.shape[1]
        self.mask = torch.arange(kv_len, device=pos.device) <= pos[:, None, :, None]  # (B, 1, T, P + T)
        return self

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k = torch.cat([self.past_keys[layer], k], dim=2)  # (B, nh, P + T, hs)
        v = torch.cat([self.past_values[layer], v], dim=2)
        self.keys.append(k)
        self.values.append(v)
        return pytorch_attention(q, k, v, self.mask, self.causal)


class CachedStep(nn.Module):
    """The exported function: new tokens and the past keys/values -> logits and the present ones."""

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def forward(self, input_ids, past_keys, past_values):
        B, T = input_ids.shape
        pos = (torch.arange(T, device=input_ids.device) + past_keys.shape[3]).expand(B, T)
        cache = ConcatCache(past_keys, past_values)
        logits, _ = self.model(input_ids, pos=pos, cache=cache)
        return logits, torch.stack(cache.keys), torch.stack(cache.values)


def export_onnx(loaded: LoadedModel, out: str | Path) -> Path:
    """Write the model's cached-step graph to `out` (a .onnx file), with its config as metadata."""
    try:
        import onnx  # the optional `interop` extra
    except ImportError:
        raise CheckpointError("exporting to ONNX needs onnx and onnxscript: pip install 'quillgpt[interop]'") from None
    model = loaded.model.float().cpu().eval()
    c = model.config
    out = Path(out)
    if out.suffix != ".onnx":
        raise CheckpointError(f"the ONNX output must be a .onnx file, got {out}")
    B, T, P = 2, 3, 2  # example shapes; all three are dynamic in the graph
    # two distinct past tensors: the exporter would treat one object passed twice as one input
    example = (torch.zeros(B, T, dtype=torch.long), *(torch.zeros(c.n_layer, B, c.n_head, P, c.head_dim) for _ in "kv"))
    batch, new, past = torch.export.Dim("batch"), torch.export.Dim("new", max=c.block_size), torch.export.Dim("past")
    dynamic = {"input_ids": {0: batch, 1: new}, "past_keys": {1: batch, 3: past}, "past_values": {1: batch, 3: past}}
    with torch.no_grad(), warnings.catch_warnings(), _quiet("torch.onnx"):
        warnings.simplefilter("ignore")  # the exporter's notes on renamed axes and deprecations
        program = torch.onnx.export(
            CachedStep(model).eval(),
            example,
            input_names=list(INPUTS),
            output_names=list(OUTPUTS),
            dynamic_shapes=dynamic,
            dynamo=True,
            verbose=False,
        )
    proto = program.model_proto
    meta = {"model": c.to_dict(), "tokenizer": loaded.tokenizer.to_spec()}
    onnx.helper.set_model_props(proto, {METADATA_KEY: json.dumps(meta, ensure_ascii=False)})
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(out))
    return out


@contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """Silence a logger below errors (the exporter warns that torchvision's ops are not registered)."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


class OnnxDecoder:
    """Prefill a batch of equal-length prompts, then decode it one token per row per step.

    `prefill(ids)` and `step(ids)` return the logits of each row's last position (B, V) as numpy
    arrays; the keys and values stay here between calls. Sampling is the caller's.
    """

    def __init__(self, path: str | Path, threads: int | None = None):
        import onnxruntime as ort  # the optional `interop` extra

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        meta = json.loads(self.session.get_modelmeta().custom_metadata_map[METADATA_KEY])
        self.config = GPTConfig.from_dict(meta["model"])
        self.tokenizer_spec = meta["tokenizer"]
        self.keys = self.values = None

    @property
    def length(self) -> int:
        """Tokens per row in the cache."""
        return 0 if self.keys is None else self.keys.shape[3]

    def _run(self, ids: np.ndarray) -> np.ndarray:
        if self.length + ids.shape[1] > self.config.block_size:
            raise ValueError(f"{self.length + ids.shape[1]} tokens exceed the context of {self.config.block_size}")
        feed = {"input_ids": ids.astype(np.int64), "past_keys": self.keys, "past_values": self.values}
        logits, self.keys, self.values = self.session.run(list(OUTPUTS), feed)
        return logits[:, -1]

    def prefill(self, ids) -> np.ndarray:
        """Start over with prompts `ids` (B, T); logits (B, V) for each row's next token."""
        ids = np.asarray(ids, dtype=np.int64)
        c = self.config
        self.keys = np.zeros((c.n_layer, ids.shape[0], c.n_head, 0, c.head_dim), dtype=np.float32)
        self.values = self.keys
        return self._run(ids)

    def step(self, ids) -> np.ndarray:
        """Append one token per row, `ids` (B,); logits (B, V) for the next one."""
        return self._run(np.asarray(ids, dtype=np.int64).reshape(-1, 1))

    def greedy(self, ids, max_new_tokens: int) -> np.ndarray:
        """The prompts `ids` (B, T) continued greedily by `max_new_tokens` tokens: (B, T + n)."""
        out = [np.asarray(ids, dtype=np.int64)]
        logits = self.prefill(out[0])
        for _ in range(max_new_tokens):
            out.append(logits.argmax(-1)[:, None])
            if len(out) - 1 < max_new_tokens:
                logits = self.step(out[-1][:, 0])
        return np.concatenate(out, axis=1)
