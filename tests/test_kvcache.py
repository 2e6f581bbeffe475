"""The KV cache: decoding through it gives the full forward's logits, and it stays out of the state dict."""

import torch

from quillgpt.kvcache import KVCache
from quillgpt.model import GPT
from tests.conftest import tiny_config
from tests.test_model import VARIANTS


def test_cached_forward_matches_full_forward():
    torch.manual_seed(0)
    for variant in ("gpt2", "modern"):
        model = GPT(tiny_config(**VARIANTS[variant])).eval()
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.2)
        idx = torch.randint(0, 40, (2, 10))
        full, _ = model(idx)
        cache = KVCache.allocate(model.config, 2)
        first, _ = model(idx[:, :6], cache=cache)
        steps = [model(idx[:, t : t + 1], pos=torch.full((2, 1), t), cache=cache)[0] for t in range(6, 10)]
        torch.testing.assert_close(torch.cat([first] + steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_kv_cache_is_not_in_state_dict(tiny_model):
    assert not any("cache" in k or "rotary" in k for k in tiny_model.state_dict())
