import json
from pathlib import Path

import pytest

from quillgpt.config import ConfigError, GPTConfig, load_train_config, parse_overrides, train_config_from_dict

ORIGINAL = {  # the original QuillGPT's Shakespeare config, minus its 65-entry maps
    "vocab_size": 65,
    "batch_size": 32,
    "block_size": 256,
    "max_iters": 3000,
    "eval_interval": 300,
    "learning_rate": 3e-5,
    "eval_iters": 50,
    "n_embd": 384,
    "n_head": 6,
    "n_layer": 6,
    "dropout": 0.3,
}


def test_original_keys_load():
    cfg = train_config_from_dict(ORIGINAL)
    assert cfg.batch_size == 32 and cfg.model.block_size == 256 and cfg.model.dropout == 0.3
    assert cfg.vocab_size == 65 and cfg.learning_rate == 3e-5


def test_typo_names_the_nearest_key():
    with pytest.raises(ConfigError, match="unknown config key 'learning_rat'; did you mean 'learning_rate'"):
        train_config_from_dict({**ORIGINAL, "learning_rat": 1e-3})
    with pytest.raises(ConfigError, match="unknown config key 'zzz'$"):
        train_config_from_dict({"zzz": 1})


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("batch_size", 0, "batch_size must be >= 1"),
        ("batch_size", "8", "batch_size has an invalid value"),
        ("learning_rate", -1, "learning_rate must be > 0"),
        ("lr_schedule", "exp", "lr_schedule has an invalid value 'exp'"),
        ("n_head", 5, "not divisible"),
        ("optimizer", "sgd", "optimizer"),
        ("ema_decay", 1.0, r"ema_decay must be in \[0, 1\)"),
        ("ema_start", -0.1, r"ema_start must be in \[0, 1\)"),
        ("val_fraction", 1.0, "val_fraction"),
        ("compile", "yes", "compile"),
        ("dtype", "float16", "dtype has an invalid value 'float16'"),
    ],
)
def test_bad_values(key, value, message):
    with pytest.raises(ConfigError, match=message):
        train_config_from_dict({**ORIGINAL, key: value})


def test_overrides_and_file(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(ORIGINAL))
    cfg = load_train_config(path, ["max_iters=10", "compile=true", "data_path=foo.txt", "pos_emb=rope"])
    assert cfg.max_iters == 10 and cfg.compile is True and cfg.data_path == "foo.txt"
    assert cfg.model.pos_emb == "rope"
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["max_iters"])
    with pytest.raises(ConfigError, match="did you mean 'max_iters'"):
        load_train_config(path, ["max_iter=3"])


def test_unreadable_config_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_train_config(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_train_config(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[1]")
    with pytest.raises(ConfigError, match="JSON object"):
        load_train_config(tmp_path / "list.json")


def test_round_trip_through_flat_dict():
    cfg = train_config_from_dict({**ORIGINAL, "pos_emb": "rope", "optimizer": "muon"})
    again = train_config_from_dict(cfg.to_dict())
    assert again == cfg


def test_int_given_for_float_is_accepted():
    assert GPTConfig(dropout=0).dropout == 0.0
    assert isinstance(train_config_from_dict({"learning_rate": 1}).learning_rate, float)


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.json")))
def test_shipped_configs_are_valid(path):
    cfg = load_train_config(path)
    assert cfg.data_path  # each names its dataset


def test_flops_per_token_matches_pytorchs_count_of_a_training_step():
    """6 FLOPs per weight and 12·L·H·Q·T for attention, against torch's own FLOP counter over a forward
    and backward pass at full context (the math attention path, which it can count)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from quillgpt.model import GPT

    for config in (  # no biases or norm weights: every non-embedding weight is in a matmul
        GPTConfig(vocab_size=96, block_size=32, n_layer=2, n_head=4, n_embd=64, bias=False, norm_affine=False),
        GPTConfig(
            vocab_size=50, block_size=24, n_layer=3, n_head=3, n_embd=48, head_size=20, bias=False, norm_affine=False
        ),
    ):
        model = GPT(config)
        x = torch.randint(0, config.vocab_size, (1, config.block_size))
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model(x, x)[1].backward()
        expected = counter.get_total_flops() / config.block_size
        assert config.flops_per_token(model.num_params(non_embedding=True)) == expected


def test_architecture_fields_are_what_makes_two_checkpoints_compatible():
    base = GPTConfig()
    assert "dropout" not in base.architecture() and "zero_init_proj" not in base.architecture()
    assert {"bias", "norm", "qk_norm", "tie_embeddings", "n_embd", "vocab_size"} <= base.architecture().keys()
    other = GPTConfig(dropout=0.2, attn_dropout=0.1, zero_init_proj=True)
    assert base.architecture_differences(other) == []
    changed = GPTConfig(bias=False, norm="rmsnorm", qk_norm=True, tie_embeddings=False, n_embd=192)
    assert base.architecture_differences(changed) == ["n_embd", "bias", "norm", "tie_embeddings", "qk_norm"]
