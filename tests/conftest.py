"""Shared fixtures: tiny models built in-process, the real data beside the checkout, and a Python
subprocess on glibc's own malloc."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quillgpt.checkpoint import save_model
from quillgpt.config import GPTConfig
from quillgpt.model import GPT
from quillgpt.tokenizer import CharTokenizer

REPO = Path(__file__).resolve().parent.parent

# The playground page for Streamlit's AppTest, run as `streamlit run` runs page.py but through its
# module, so that a test can patch the page's functions
PAGE_SCRIPT = "from quillgpt.playground.page import main\n\nmain()\n"
SHARED_DATA = Path(os.environ.get("QUILL_DATA_DIR", REPO.parent / "shared" / "data"))

# glibc's malloc as it comes: no preloaded allocator, no tunables
PLAIN_MALLOC = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD" and not k.startswith(("MALLOC_", "GLIBC_"))}


def run_python(code: str, *args: str) -> str:
    """`python -c code args` on glibc's own malloc (the allocator tests measure it); its stdout."""
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True,
                          env=PLAIN_MALLOC).stdout  # fmt: skip


# Tiny models run fastest on one thread, and a second thread waiting on a busy core is slow.
torch.set_num_threads(1)

SAMPLE_TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\n\nFirst Citizen:\nYou are all resolved rather to die than to famish?\n"
)


def tiny_config(**overrides) -> GPTConfig:
    kw = dict(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=16)
    kw.update(overrides)
    return GPTConfig(**kw)


@pytest.fixture
def char_tokenizer() -> CharTokenizer:
    return CharTokenizer.from_text(SAMPLE_TEXT)


@pytest.fixture
def tiny_model(char_tokenizer) -> GPT:
    torch.manual_seed(0)
    return GPT(tiny_config(vocab_size=char_tokenizer.vocab_size, block_size=32)).eval()


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_model, char_tokenizer) -> Path:
    return save_model(tmp_path / "tiny", tiny_model, char_tokenizer, provenance={"steps": 0})


@pytest.fixture(scope="session", autouse=True)
def throughput_cache(tmp_path_factory) -> Path:
    """The recipe's measured training rates go to a file of this session, not the user's cache (runs the
    tests start inherit it)."""
    path = tmp_path_factory.mktemp("cache") / "throughput.json"
    os.environ["QUILL_THROUGHPUT_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (set QUILL_DATA_DIR)")
    return SHARED_DATA
