import json
import math
import struct

import pytest
import torch
from safetensors import safe_open

from quillgpt.checkpoint import CheckpointError, load_model, load_weights, resolve_model_path, save_model
from quillgpt.model import GPT
from quillgpt.tokenizer import BPETokenizer
from tests.conftest import tiny_config


def test_round_trip_keeps_weights_tokenizer_and_provenance(tiny_model_dir, tiny_model, char_tokenizer):
    loaded = load_model(tiny_model_dir)
    for (k, a), (_, b) in zip(tiny_model.state_dict().items(), loaded.model.state_dict().items()):
        assert torch.equal(a, b), k
    assert loaded.tokenizer.chars == char_tokenizer.chars
    assert loaded.provenance == {"steps": 0}
    assert not loaded.model.training
    assert sorted(p.name for p in tiny_model_dir.iterdir()) == ["config.json", "model.safetensors"]
    assert all(p.stat().st_mode & 0o044 == 0o044 for p in tiny_model_dir.iterdir())  # readable by others


def test_untied_rope_model_and_bpe_tokenizer_round_trip(tmp_path):
    tok = BPETokenizer.train(["some text to learn from " * 20], vocab_size=270)
    model = GPT(tiny_config(vocab_size=tok.vocab_size, pos_emb="rope", tie_embeddings=False, norm="rmsnorm"))
    save_model(tmp_path / "m", model, tok)
    loaded = load_model(tmp_path / "m")
    x = torch.randint(0, tok.vocab_size, (1, 8))
    torch.testing.assert_close(loaded.model(x)[0], model.eval()(x)[0])
    assert loaded.tokenizer.encode("some text") == tok.encode("some text")


def test_legacy_pt_state_dict_loads_with_weights_only(tmp_path, tiny_model):
    path = tmp_path / "legacy.pt"
    torch.save(tiny_model.state_dict(), path)
    fresh = GPT(tiny_model.config)
    load_weights(fresh, path)
    assert torch.equal(fresh.lm_head.weight, tiny_model.lm_head.weight)


def test_pickle_that_runs_code_is_refused(tmp_path, tiny_model):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"model": Evil()}, path)
    with pytest.raises(CheckpointError, match="cannot load weights"):
        load_weights(GPT(tiny_model.config), path)


def test_missing_and_corrupt_files_are_named(tiny_model_dir, tmp_path):
    (tiny_model_dir / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(tiny_model_dir)
    (tiny_model_dir / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="weights file not found: .*model.safetensors"):
        load_model(tiny_model_dir)
    (tiny_model_dir / "config.json").write_text("{ broken")
    with pytest.raises(CheckpointError, match="config is corrupt: .*config.json"):
        load_model(tiny_model_dir)
    with pytest.raises(CheckpointError, match="no model directory or bundled model named 'nope'"):
        load_model("nope")


def test_weights_that_do_not_match_the_config(tmp_path, tiny_model, char_tokenizer):
    save_model(tmp_path / "m", tiny_model, char_tokenizer)
    cfg_path = tmp_path / "m" / "config.json"
    data = json.loads(cfg_path.read_text())
    data["model"]["n_embd"] = 32
    cfg_path.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="does not match model.safetensors: vocab_size x n_embd"):
        load_model(tmp_path / "m")
    data["model"]["n_embd"] = 16
    data["model"]["n_layer"] = 3
    cfg_path.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="n_layer is 3, the weights hold 2 layers"):
        load_model(tmp_path / "m")
    data["model"]["n_layer"] = 2
    data["model"]["colour"] = "blue"
    cfg_path.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="unknown model config key 'colour'"):
        load_model(tmp_path / "m")


def test_bundled_models_are_found_by_name(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("QUILL_MODELS_DIR", str(tiny_model_dir.parent))
    assert resolve_model_path("tiny") == tiny_model_dir
    assert load_model("tiny").name == "tiny"


def test_save_replaces_files_atomically(tmp_path, tiny_model, char_tokenizer, monkeypatch):
    save_model(tmp_path / "m", tiny_model, char_tokenizer, provenance={"v": 1})
    before = (tmp_path / "m" / "model.safetensors").read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("quillgpt.checkpoint.st_save_model", crash)
    with pytest.raises(OSError, match="disk full"):
        save_model(tmp_path / "m", GPT(tiny_model.config), char_tokenizer, provenance={"v": 2})
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before
    assert load_model(tmp_path / "m").provenance == {"v": 1}
    assert [p.name for p in (tmp_path / "m").iterdir() if p.name.startswith(".")] == []


def test_int8_quantized_loading(tiny_model_dir, tiny_model):
    q = load_model(tiny_model_dir, weights="int8")
    assert not any(type(m) is torch.nn.Linear for m in q.model.modules())  # every linear layer is int8 now
    x = torch.randint(0, tiny_model.config.vocab_size, (2, 12))
    with torch.no_grad():
        ref, quant = tiny_model(x)[0], q.model(x)[0]
    assert (quant - ref).abs().max() < 0.05 * ref.abs().max()  # close to the fp32 model, not identical
    with pytest.raises(CheckpointError, match="unknown weights 'int4'"):
        load_model(tiny_model_dir, weights="int4")
    for weights in ("int8", "bfloat16"):  # CPU-only packings, refused on any other device in one line
        with pytest.raises(CheckpointError, match=f"{weights} inference weights run on the CPU only"):
            load_model(tiny_model_dir, device="meta", weights=weights)


def test_without_onednn_int8_is_refused_in_one_line_and_auto_stays_float32(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    for weights in ("int8", "bfloat16"):
        with pytest.raises(CheckpointError, match=f"{weights} inference weights need a CPU build of PyTorch with"):
            load_model(tiny_model_dir, weights=weights)
    auto = load_model(tiny_model_dir, weights="auto").model
    assert all(type(m) is torch.nn.Linear for m in auto.modules() if "Linear" in type(m).__name__)  # as it is


def test_default_model_prefers_the_first_bundled(tmp_path, monkeypatch, tiny_model, char_tokenizer):
    from quillgpt.checkpoint import DEFAULT_MODELS, default_model

    monkeypatch.setattr("quillgpt.checkpoint.REPO_MODELS_DIR", tmp_path / "none")
    monkeypatch.setenv("QUILL_MODELS_DIR", str(tmp_path))
    assert default_model() == DEFAULT_MODELS[0]  # nothing bundled: the name the error will mention
    save_model(tmp_path / DEFAULT_MODELS[1], tiny_model, char_tokenizer)
    assert default_model() == DEFAULT_MODELS[1]
    save_model(tmp_path / DEFAULT_MODELS[0], tiny_model, char_tokenizer)
    assert default_model() == DEFAULT_MODELS[0]


def test_servers_offer_every_bundled_model_the_default_first(tmp_path, monkeypatch, tiny_model, char_tokenizer):
    from quillgpt.checkpoint import DEFAULT_MODELS, served_models

    monkeypatch.setattr("quillgpt.checkpoint.REPO_MODELS_DIR", tmp_path / "none")
    monkeypatch.setenv("QUILL_MODELS_DIR", str(tmp_path))
    assert served_models() == [DEFAULT_MODELS[0]]  # nothing bundled: the name the error will mention
    for name in ("aardvark", DEFAULT_MODELS[1], "harpoon"):
        save_model(tmp_path / name, tiny_model, char_tokenizer)
    assert served_models() == [DEFAULT_MODELS[1], "aardvark", "harpoon"]


def _config_edit(**model):
    def edit(directory):
        data = json.loads((directory / "config.json").read_text())
        data["model"].update(model)
        (directory / "config.json").write_text(json.dumps(data))

    return edit


def _header_edit(change):
    """Rewrite model.safetensors' JSON header with `change(header)`; the tensor bytes stay as they are."""

    def edit(directory):
        raw = (directory / "model.safetensors").read_bytes()
        n = struct.unpack("<Q", raw[:8])[0]
        header = json.loads(raw[8 : 8 + n])
        change(header)
        new = json.dumps(header).encode()
        (directory / "model.safetensors").write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])

    return edit


def _set(header, name, key, value):
    header[name][key] = value


def _length(directory):
    raw = (directory / "model.safetensors").read_bytes()
    (directory / "model.safetensors").write_bytes(struct.pack("<Q", 2**60) + raw[8:])


def _tokenizer(spec, files=None):
    def edit(directory):
        data = json.loads((directory / "config.json").read_text())
        data["tokenizer"] = spec
        (directory / "config.json").write_text(json.dumps(data))
        for name, text in (files or {}).items():
            (directory / name).write_text(text)

    return edit


HUGE = dict(vocab_size=10_000_000, n_embd=4096, n_head=32)  # a 164 GB token embedding alone
BAD_MODEL_DIRS = {
    "shapes disagree": (_config_edit(n_embd=32), "vocab_size x n_embd is"),
    "n_layer 1e9 (a float)": (_config_edit(n_layer=1e9), "n_layer"),
    "n_layer 1,000,000,000": (_config_edit(n_layer=1_000_000_000), "n_layer is 1,000,000,000"),
    "vocab_size -1": (_config_edit(vocab_size=-1), "vocab_size must be >= 1"),
    "more memory than the machine has": (_config_edit(**HUGE), "10,000,000 x 4,096"),
    "block_size 1e9 (rotary)": (_config_edit(block_size=10**9, pos_emb="rope"), "block_size 1,000,000,000"),
    "header lies about a shape": (
        _header_edit(lambda h: _set(h, "transformer.h.0.attn.c_attn.weight", "shape", [4800, 1600])),
        "the header lies about transformer.h.0.attn.c_attn.weight",
    ),
    "header points past the file": (
        _header_edit(lambda h: _set(h, "transformer.ln_f.bias", "data_offsets", [0, 2**50])),
        "malformed header entry",
    ),
    "header length past the file": (_length, "not a safetensors file"),
    "tokenizer bigger than the vocabulary": (
        _tokenizer({"type": "char", "chars": "".join(map(chr, range(32, 132)))}),
        "tokenizer has 100 tokens but the model only",
    ),
    "tokenizer file that is not one": (
        _tokenizer({"type": "bpe", "file": "tokenizer.json"}, {"tokenizer.json": '{"model": 5}'}),
        "cannot read tokenizer file",
    ),
}


@pytest.mark.parametrize("case", BAD_MODEL_DIRS)
def test_untrusted_model_dirs_fail_before_any_large_allocation(tmp_path, tiny_model_dir, monkeypatch, case):
    edit, words = BAD_MODEL_DIRS[case]
    edit(tiny_model_dir)
    built = []

    def gpt(config):  # the real GPT(config) must not run: only shape checks on the meta device
        built.append(torch.empty(0).device.type)
        return GPT(config)

    monkeypatch.setattr("quillgpt.checkpoint.GPT", gpt)
    with pytest.raises(CheckpointError) as error:
        load_model(tiny_model_dir)
    assert words in str(error.value) and "\n" not in str(error.value)
    assert set(built) <= {"meta"}, "a model was built from an untrusted config before it was checked"


def test_the_huge_case_really_is_huge():
    assert math.prod((HUGE["vocab_size"], HUGE["n_embd"])) * 4 > 24 * 2**30  # more than this machine's 24 GB


def test_weights_stored_in_bfloat16_load_as_their_rounded_float32(tmp_path, tiny_model, char_tokenizer):
    save_model(tmp_path / "fp32", tiny_model, char_tokenizer)
    save_model(tmp_path / "bf16", tiny_model, char_tokenizer, dtype=torch.bfloat16)
    assert next(tiny_model.parameters()).dtype == torch.float32  # the model saved is left as it was
    with safe_open(tmp_path / "bf16" / "model.safetensors", "pt") as f:
        assert all(f.get_slice(k).get_dtype() == "BF16" for k in f.keys())
    fp32_size = (tmp_path / "fp32" / "model.safetensors").stat().st_size
    assert (tmp_path / "bf16" / "model.safetensors").stat().st_size < 0.55 * fp32_size
    loaded = load_model(tmp_path / "bf16")
    for name, p in loaded.model.state_dict().items():
        assert p.dtype == torch.float32
        assert torch.equal(p, tiny_model.state_dict()[name].to(torch.bfloat16).float()), name


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_weights_stored_in_int8_rows_load_within_half_a_step(tmp_path, char_tokenizer, tie):
    torch.manual_seed(0)
    model = GPT(tiny_config(vocab_size=char_tokenizer.vocab_size, tie_embeddings=tie, n_embd=32)).eval()
    save_model(tmp_path / "fp32", model, char_tokenizer)
    save_model(tmp_path / "int8", model, char_tokenizer, dtype=torch.int8)
    fp32_size = (tmp_path / "fp32" / "model.safetensors").stat().st_size
    assert (tmp_path / "int8" / "model.safetensors").stat().st_size < 0.35 * fp32_size
    loaded = load_model(tmp_path / "int8").model
    for name, p in model.state_dict().items():
        q = loaded.state_dict()[name]
        step = p.abs().amax(dim=1, keepdim=True) / 127 if p.dim() == 2 else 0.0
        assert q.dtype == torch.float32 and bool(((q - p).abs() <= step / 2 + 1e-7).all()), name
    if tie:
        assert loaded.lm_head.weight is loaded.transformer.wte.weight
    x = torch.randint(0, char_tokenizer.vocab_size, (2, 16))
    torch.testing.assert_close(loaded(x)[0], model(x)[0], rtol=0, atol=0.05)


def test_int8_weights_with_a_scale_that_fits_no_matrix_are_refused(tmp_path, tiny_model, char_tokenizer):
    from safetensors.torch import load_file, save_file

    save_model(tmp_path / "m", tiny_model, char_tokenizer, dtype=torch.int8)
    path = tmp_path / "m" / "model.safetensors"
    state = load_file(path)
    state["lm_head.weight.int8_scale"] = torch.ones(3)
    save_file(state, path)
    with pytest.raises(CheckpointError, match="lm_head.weight.int8_scale \\[3\\] is not the row scale"):
        load_model(tmp_path / "m")
