"""`create_app(settings)`: the FastAPI application, its middleware, routers and lifespan.

The lifespan loads the models on a background thread (so /health answers at once and /ready tells
when loading is done), starts one engine per model, and stops the engines on shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware

from quillgpt import __version__
from quillgpt.checkpoint import LoadedModel, load_model
from quillgpt.device import resolve_device
from quillgpt.serve.deps import ServeState, require_api_key
from quillgpt.serve.engine import Engine
from quillgpt.serve.errors import install_error_handlers
from quillgpt.serve.metrics import Metrics
from quillgpt.serve.middleware import REQUEST_ID_HEADER, RequestContextMiddleware
from quillgpt.serve.openapi import install_openapi
from quillgpt.serve.process import setup_process
from quillgpt.serve.routes import health, legacy, openai, tokenize
from quillgpt.serve.settings import ServeSettings, parse_model_spec

log = logging.getLogger("quillgpt.serve")


def load_models(settings: ServeSettings) -> dict[str, LoadedModel]:
    """Every model of `settings.models`, by the name it is served under (its alias or directory name)."""
    device = resolve_device(settings.device)
    models: dict[str, LoadedModel] = {}
    for spec in settings.models:
        alias, target = parse_model_spec(spec)
        loaded = load_model(target, device=device, weights=settings.weights)
        name = alias or loaded.name
        if name in models:
            raise ValueError(f"two models are named {name!r}: give one an alias (ALIAS=PATH)")
        models[name] = loaded
    return models


def start_engines(state: ServeState, models: Mapping[str, LoadedModel]) -> None:
    settings = state.settings
    for name, loaded in models.items():
        engine = Engine(
            loaded, name=name, max_batch=settings.max_batch, queue_size=settings.queue_size, observer=state.metrics
        )
        engine.start()
        state.engines[name] = engine
        params = loaded.model.num_params()
        log.info(
            "serving %s (%s parameters) from %s",
            name,
            f"{params:,}",
            loaded.path,
            extra={"fields": {"model": name, "parameters": params, "path": str(loaded.path)}},
        )
    state.ready.set()


def create_app(settings: ServeSettings | None = None, *, models: Mapping[str, LoadedModel] | None = None) -> FastAPI:
    """The API app. `models` serves already-loaded models (by name) instead of loading `settings.models`."""
    settings = settings or ServeSettings()
    state = ServeState(settings=settings, metrics=Metrics(lambda: state.engines))
    closing = threading.Event()
    lock = threading.Lock()

    def load() -> None:
        try:
            loaded = load_models(settings)
        except Exception as e:  # CheckpointError, ConfigError, OSError, ...: /ready reports it
            state.load_error = str(e) or type(e).__name__
            log.error("could not load the models: %s", state.load_error)
            return
        with lock:
            if not closing.is_set():
                start_engines(state, loaded)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = None
        if models is not None:
            start_engines(state, models)
        else:
            loader = threading.Thread(target=load, name="quill-model-loader", daemon=True)
            loader.start()
        yield
        with lock:
            closing.set()
        await asyncio.to_thread(lambda: [engine.stop() for engine in state.engines.values()])

    app = FastAPI(
        title="QuillGPT",
        version=__version__,
        description="GPT models written from scratch, served with an OpenAI-compatible API.",
        lifespan=lifespan,
    )
    app.state.serve = state
    install_error_handlers(app)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_credentials=settings.cors_allow_credentials,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", REQUEST_ID_HEADER],
            expose_headers=[REQUEST_ID_HEADER],
        )
    # added last, so outermost: it sees (and counts, and logs) every response, CORS ones included
    app.add_middleware(RequestContextMiddleware, metrics=state.metrics, max_body_bytes=settings.max_body_bytes)
    app.include_router(health.router)
    protected = [Depends(require_api_key)]
    app.include_router(openai.router, dependencies=protected)
    app.include_router(legacy.router, dependencies=protected)
    app.include_router(tokenize.router, dependencies=protected)
    install_openapi(app, settings)
    return app


def app_from_env() -> FastAPI:
    """Factory for `uvicorn --factory` (one call per worker process): settings from QUILL_* variables."""
    settings = ServeSettings()
    setup_process(settings)  # a worker process starts with no log handlers and default threads
    return create_app(settings)
