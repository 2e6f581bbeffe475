"""Small source models built in-process: HuggingFace GPT-2 is the independent reference."""

import pytest
import torch

transformers = pytest.importorskip("transformers")


def random_gpt2(vocab_size=60, activation="gelu_new", bias=True, seed=0, **kw):
    """A random GPT2LMHeadModel with non-trivial norms and biases (zero biases for bias=False)."""
    config = transformers.GPT2Config(
        vocab_size=vocab_size,
        n_positions=32,
        n_embd=32,
        n_layer=2,
        n_head=4,
        activation_function=activation,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=None,
        eos_token_id=None,
        **kw,
    )
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p) if bias else torch.zeros_like(p))
            elif "ln" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model
