"""Reading weights files without running their code, and `CheckpointError`, which every model file
that cannot be read or written raises.

A pickle can name any importable callable and have it called while loading, so every pickle here
is read by an unpickler that admits plain data only: `torch.load(weights_only=True)` for tensors,
and `load_plain_pickle` (dicts, lists, tuples, strings, numbers, booleans, None) for small
metadata such as nanoGPT's `meta.pkl`. Anything more is refused with one line naming the file.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch


class CheckpointError(RuntimeError):
    """A model directory or weights file that cannot be read or written."""


class _PlainDataUnpickler(pickle.Unpickler):
    """Builds containers and scalars from their opcodes; every reference to a class or function fails."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"{module}.{name}")


def load_plain_pickle(path: str | Path) -> Any:
    """A pickle holding only dicts, lists, tuples, strings, numbers, booleans and None."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return _PlainDataUnpickler(f).load()
    except FileNotFoundError:
        raise CheckpointError(f"file not found: {path}") from None
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refusing to unpickle {path}: it references {e}, and only plain data (dicts, lists, strings, numbers) "
            "is read"
        ) from None
    except (EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError) as e:
        raise CheckpointError(f"cannot read {path}: {type(e).__name__}: {e}") from None


def load_torch_file(path: str | Path) -> Any:
    """`torch.load(weights_only=True)` on the CPU, its refusals and failures as one line naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        needs = re.search(r"GLOBAL (\S+)", str(e))
        hint = f" ({needs[1]})" if needs else ""
        raise CheckpointError(
            f"refusing to load {path}: it needs arbitrary unpickling{hint}, which could run code"
        ) from None
    except Exception as e:  # torch.load raises many kinds on a corrupt or foreign file
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"cannot load {path}: {type(e).__name__}: {first}") from None


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A `.pt`/`.bin` file holding a state dict of tensors (or `{"model": state_dict, ...}`)."""
    state = load_torch_file(path)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return state
