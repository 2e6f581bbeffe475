"""`quill export hf`: a directory that HuggingFace transformers loads with its Auto classes.

GPT-2-style models (learned positions, LayerNorm, GELU/ReLU) become a `GPT2LMHeadModel`: missing
biases are written as zeros and weightless norms as ones, which is exact. The modern recipe
(rotary, weightless RMSNorm, QK-norm, ReLU², optional soft-cap) maps onto transformers' NanoChat:
its rotation turns the other way, folded into the q/k weights by swapping the two halves of every
head; its norm on the embeddings cannot be folded, so that model ships `modeling_quillgpt.py` (a
small subclass of NanoChat) and loads with `trust_remote_code=True`. Options no architecture
reproduces are refused in one line that names them.

The tokenizer goes with it: BPE as its own `tokenizer.json`; the character tokenizer as a
`tokenizers` WordLevel model over single characters, so the ids are ours.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from quillgpt.checkpoint import CheckpointError, LoadedModel
from quillgpt.config import GPTConfig
from quillgpt.interop.hf_gpt2 import CONV1D
from quillgpt.tokenizer import EOT, UNK_TEXT, BPETokenizer, CharTokenizer

REMOTE_CODE = Path(__file__).with_name("hf_remote_code.py")
GPT2_ACTIVATIONS = {"gelu": "gelu_new", "gelu_exact": "gelu", "relu": "relu"}


def _failing(checks: list[tuple[str, bool]]) -> list[str]:
    return [reason for reason, bad in checks if bad]


def gpt2_mismatches(c: GPTConfig) -> list[str]:
    """What stops `c` from being an exact GPT2LMHeadModel (empty: nothing)."""
    return _failing(
        [
            (f"pos_emb={c.pos_emb!r}", c.pos_emb != "learned"),
            (f"norm={c.norm!r}", c.norm != "layernorm"),
            (f"activation={c.activation!r}", c.activation not in GPT2_ACTIVATIONS),
            ("qk_norm", c.qk_norm),
            ("logit_softcap", c.logit_softcap is not None),
            ("lm_head_bias", c.lm_head_bias),
            ("head_size * n_head != n_embd", c.head_dim * c.n_head != c.n_embd),
        ]
    )


def nanochat_mismatches(c: GPTConfig) -> list[str]:
    """What stops `c` from being the NanoChat-based architecture (empty: nothing)."""
    return _failing(
        [
            (f"pos_emb={c.pos_emb!r}", c.pos_emb != "rope"),
            (f"norm={c.norm!r}", c.norm != "rmsnorm"),
            ("norm_affine", c.norm_affine),
            ("qk_norm=false", not c.qk_norm),
            (f"activation={c.activation!r}", c.activation != "relu2"),
            ("bias", c.bias or bool(c.qkv_bias)),
            ("lm_head_bias", c.lm_head_bias),
            ("head_size * n_head != n_embd", c.head_dim * c.n_head != c.n_embd),
        ]
    )


def export_hf(loaded: LoadedModel, out: str | Path) -> Path:
    """Write `loaded` as a transformers model directory (weights, config, tokenizer)."""
    config = loaded.model.config
    gpt2, nanochat = gpt2_mismatches(config), nanochat_mismatches(config)
    if gpt2 and nanochat:
        raise CheckpointError(
            f"no transformers architecture reproduces this model: GPT-2 lacks {', '.join(gpt2)}; "
            f"the NanoChat-based one lacks {', '.join(nanochat)}"
        )
    try:
        import transformers  # the optional `interop` extra
    except ImportError:
        raise CheckpointError("exporting needs transformers: pip install 'quillgpt[interop]'") from None
    transformers.utils.logging.disable_progress_bar()
    out = Path(out)
    special = _special_ids(loaded.tokenizer)
    state = {k: v.detach().float().cpu() for k, v in loaded.model.state_dict().items()}
    if not gpt2:
        _gpt2_model(transformers, config, state, special).save_pretrained(out)
    else:
        _nanochat_model(config, state, special).save_pretrained(out)
        shutil.copyfile(REMOTE_CODE, out / "modeling_quillgpt.py")
        data = json.loads((out / "config.json").read_text(encoding="utf-8"))
        data["auto_map"] = {
            "AutoConfig": "modeling_quillgpt.QuillGPTConfig",
            "AutoModelForCausalLM": "modeling_quillgpt.QuillGPTForCausalLM",
        }
        (out / "config.json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    write_tokenizer(loaded.tokenizer, out, config.block_size)
    return out


def _special_ids(tokenizer) -> dict[str, int | None]:
    eot = tokenizer.eot_id if isinstance(tokenizer, BPETokenizer) else None
    return {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": None}


def _gpt2_model(transformers, c: GPTConfig, state: dict[str, torch.Tensor], special):
    hf_config = transformers.GPT2Config(
        vocab_size=c.vocab_size,
        n_positions=c.block_size,
        n_embd=c.n_embd,
        n_layer=c.n_layer,
        n_head=c.n_head,
        n_inner=c.hidden_dim,
        activation_function=GPT2_ACTIVATIONS[c.activation],
        layer_norm_epsilon=c.norm_eps,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=c.tie_embeddings,
        **special,
    )
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    converted = {}
    for key, target in hf.state_dict().items():
        if key in state:
            converted[key] = state[key].t() if key.endswith(CONV1D) else state[key]
        elif key.endswith(".bias"):  # a bias or norm shift the model does without
            converted[key] = torch.zeros_like(target)
        elif ".ln_" in key:  # a weightless norm's scale
            converted[key] = torch.ones_like(target)
    hf.load_state_dict(converted, strict=True)
    return hf


def _nanochat_model(c: GPTConfig, state: dict[str, torch.Tensor], special):
    spec = importlib.util.spec_from_file_location("modeling_quillgpt", REMOTE_CODE)
    remote = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(remote)
    hf_config = remote.QuillGPTConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.n_embd,
        intermediate_size=c.hidden_dim,
        num_hidden_layers=c.n_layer,
        num_attention_heads=c.n_head,
        num_key_value_heads=c.n_head,
        max_position_embeddings=c.block_size,
        rms_norm_eps=c.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_base},
        final_logit_softcapping=c.logit_softcap,
        tie_word_embeddings=c.tie_embeddings,
        **special,
    )
    hf = remote.QuillGPTForCausalLM(hf_config).eval()
    inner = c.n_head * c.head_dim
    converted = {
        "model.embed_tokens.weight": state["transformer.wte.weight"],
        "lm_head.weight": state["lm_head.weight"],
    }
    for i in range(c.n_layer):
        src, dst = f"transformer.h.{i}.", f"model.layers.{i}."
        q, k, v = state[src + "attn.c_attn.weight"].split(inner)
        converted[dst + "self_attn.q_proj.weight"] = _swap_rotary_halves(q, c.n_head)
        converted[dst + "self_attn.k_proj.weight"] = _swap_rotary_halves(k, c.n_head)
        converted[dst + "self_attn.v_proj.weight"] = v
        converted[dst + "self_attn.o_proj.weight"] = state[src + "attn.c_proj.weight"]
        converted[dst + "mlp.fc1.weight"] = state[src + "mlp.c_fc.weight"]
        converted[dst + "mlp.fc2.weight"] = state[src + "mlp.c_proj.weight"]
    hf.load_state_dict(converted, strict=True)
    return hf


def _swap_rotary_halves(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of q or k with each head's two halves swapped: NanoChat rotates (x1, x2) by -θ where we
    rotate by +θ, and rotating the swapped pair by -θ gives our rotation, swapped. Dot products of
    queries and keys, both swapped alike, are unchanged, and so is the (rotation-blind) RMS QK-norm."""
    rows, C = w.shape
    return w.view(n_head, 2, rows // n_head // 2, C).flip(1).reshape(rows, C)


def char_tokenizer_json(tokenizer: CharTokenizer) -> Tokenizer:
    """A `tokenizers` Tokenizer giving each character our id: split into single characters, look up."""
    vocab, unk = dict(tokenizer.stoi), None
    if tokenizer.unk_id is not None:  # characters outside the vocabulary map to the unknown token
        vocab[UNK_TEXT], unk = tokenizer.unk_id, UNK_TEXT
    tok = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return tok


def write_tokenizer(tokenizer, out: Path, max_length: int) -> None:
    """tokenizer.json plus the tokenizer_config.json that AutoTokenizer reads."""
    if isinstance(tokenizer, CharTokenizer):
        char_tokenizer_json(tokenizer).save(str(out / "tokenizer.json"))
        special = {}
    else:
        tokenizer.tokenizer.save(str(out / "tokenizer.json"))
        special = {"bos_token": EOT, "eos_token": EOT} if tokenizer.eot_id is not None else {}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
        **special,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
