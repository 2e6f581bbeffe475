"""`LocalBackend`: models loaded into this process, streamed through `quillgpt.generate.stream_with_probs`."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from quillgpt.checkpoint import CheckpointError, LoadedModel, bundled_models, load_model
from quillgpt.config import ConfigError
from quillgpt.generate import stream_with_probs
from quillgpt.playground.backend import (
    TOP_ALTERNATIVES,
    BackendError,
    Chunk,
    ModelCard,
    TokenView,
    default_first,
    provenance_facts,
)
from quillgpt.sampling import SamplingParams
from quillgpt.tokenizer import TokenizerError


class LocalBackend:
    """Models loaded into this process: the bundled ones and any directory the user names."""

    local = True

    def __init__(
        self,
        models: Iterable[str] = (),
        loader: Callable[[str], LoadedModel] = load_model,
        trained: Iterable[str] = (),
    ):
        """`loader` turns a name into a model: the page passes one that caches across reruns.
        `trained`: the models of the Train page's runs, listed after the bundled ones."""
        self.extra = list(dict.fromkeys(models))
        self.trained = list(trained)
        self.loader = loader
        self.label = "Models run in this process"

    def models(self) -> list[str]:
        return list(dict.fromkeys([*self.extra, *default_first(list(bundled_models())), *self.trained]))

    def load(self, name: str) -> LoadedModel:
        try:
            return self.loader(name)
        except (CheckpointError, ConfigError, TokenizerError, OSError) as e:
            raise BackendError(f"Cannot load model {name!r}: {e}") from None

    def card(self, name: str) -> ModelCard:
        loaded = self.load(name)
        cfg, tok = loaded.model.config, loaded.tokenizer
        facts = provenance_facts(loaded.provenance)
        facts["Tokenizer"] = f"{tok.to_spec()['type']}, {tok.vocab_size:,} tokens"
        facts["Context"] = f"{cfg.block_size:,} tokens"
        facts["Shape"] = f"{cfg.n_layer} layers × {cfg.n_head} heads × {cfg.n_embd} wide"
        readme, loss = loaded.path / "README.md", loaded.path / "loss.png"
        return ModelCard(
            name=loaded.name,
            source=str(loaded.path),
            parameters=loaded.model.num_params(),
            facts=facts,
            description=readme.read_text(encoding="utf-8", errors="replace") if readme.is_file() else None,
            loss_curve=loss if loss.is_file() else None,
            default_prompt=loaded.default_prompt,
        )

    def stream(self, name: str, prompt: str, params: SamplingParams) -> Iterator[Chunk]:
        loaded = self.load(name)
        try:
            pieces = stream_with_probs(loaded.model, loaded.tokenizer, prompt, params, alternatives=TOP_ALTERNATIVES)
        except TokenizerError as e:
            raise BackendError(f"The prompt does not fit this model's vocabulary: {e}") from None
        for piece in pieces:
            note = None
            if piece.finish_reason and piece.prompt_truncated:
                block = loaded.model.config.block_size
                note = f"The prompt was longer than the model's context: only its last {block} tokens were used."
            tokens = [TokenView(t.text, t.prob, t.top) for t in piece.tokens]
            yield Chunk(piece.text, tokens, piece.finish_reason, note)
