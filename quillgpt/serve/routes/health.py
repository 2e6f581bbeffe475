"""Service routes: `/` (what this is), `/health` (liveness), `/ready` (readiness), `/metrics` (Prometheus).

/health and /ready need no API key, so orchestrators can probe them; /ready is 503 until every
model is loaded and its engine running, and again if an engine stops.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response

from quillgpt import __version__
from quillgpt.serve.deps import State, require_api_key
from quillgpt.serve.metrics import CONTENT_TYPE

router = APIRouter(tags=["Service"])


@router.get("/health")
async def health() -> dict:
    return {"status": "ok"}


@router.get("/ready", responses={503: {"description": "Models loading, failed, or an engine stopped."}})
async def ready(state: State) -> JSONResponse:
    models = {name: ("running" if e.alive else "stopped") for name, e in state.engines.items()}
    if state.ready.is_set() and all(e.alive for e in state.engines.values()):
        return JSONResponse({"status": "ready", "models": models})
    status = "loading" if state.load_error is None and not state.ready.is_set() else "unavailable"
    body = {"status": status, "models": models}
    if state.load_error:
        body["error"] = state.load_error
    return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})


@router.get("/", dependencies=[Depends(require_api_key)])
async def info(state: State) -> dict:
    return {
        "name": "QuillGPT",
        "version": __version__,
        "message": "GPT FastAPI Service is running.",
        "ready": state.ready.is_set(),
        "models": list(state.engines),
        "docs": "/docs",
        "endpoints": [
            "/v1/models",
            "/v1/completions",
            "/v1/chat/completions",
            "/generate",
            "/generate_stream",
            "/tokenize",
            "/detokenize",
            "/health",
            "/ready",
            "/metrics",
        ],
    }


@router.get("/metrics", dependencies=[Depends(require_api_key)], response_class=Response)
async def metrics(state: State) -> Response:
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)
