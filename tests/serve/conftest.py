"""Serving fixtures: a tiny model over printable ASCII, apps around it, and real uvicorn servers.

Everything is in-process and hermetic: QUILL_* serve settings from the environment are cleared,
servers bind 127.0.0.1 on a free port and are always shut down, and every wait is bounded.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient

from quillgpt.checkpoint import LoadedModel
from quillgpt.model import GPT
from quillgpt.serve.app import create_app
from quillgpt.serve.settings import ServeSettings
from quillgpt.tokenizer import CharTokenizer
from tests.conftest import tiny_config

ASCII = [chr(i) for i in range(32, 127)] + ["\n"]


@pytest.fixture(autouse=True)
def _no_serve_env(monkeypatch):
    for name in ServeSettings.model_fields:
        monkeypatch.delenv(f"QUILL_{name.upper()}", raising=False)


@pytest.fixture(scope="session")
def ascii_tokenizer() -> CharTokenizer:
    return CharTokenizer(ASCII)


@pytest.fixture(scope="session")
def serve_model(ascii_tokenizer) -> LoadedModel:
    torch.manual_seed(0)
    model = GPT(tiny_config(vocab_size=ascii_tokenizer.vocab_size, block_size=32)).eval()
    return LoadedModel(model, ascii_tokenizer, Path("tiny"), provenance={"steps": 0})


def wait_until(condition: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


@pytest.fixture
def make_client(serve_model) -> Iterator[Callable[..., TestClient]]:
    """make_client(**settings) → a started TestClient serving the tiny model as "tiny"."""
    clients: list[TestClient] = []

    def make(models: dict[str, LoadedModel] | None = None, **settings) -> TestClient:
        app = create_app(ServeSettings(**settings), models=models or {"tiny": serve_model})
        client = TestClient(app)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client) -> TestClient:
    return make_client()


def engine_of(client: TestClient, name: str = "tiny"):
    return client.app.state.serve.engines[name]


class LiveServer:
    """A real uvicorn server on 127.0.0.1 (free port) in a background thread."""

    def __init__(self, app: FastAPI):
        self.app = app
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn-test", daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        wait_until(lambda: self.server.started or not self.thread.is_alive(), 20, "uvicorn to start")
        if not self.server.started:
            raise RuntimeError("uvicorn did not start")
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(20)
        assert not self.thread.is_alive(), "uvicorn did not shut down"

    @property
    def state(self):
        return self.app.state.serve

    def engine(self, name: str = "tiny"):
        return self.state.engines[name]


@pytest.fixture
def live_server(serve_model) -> Iterator[Callable[..., LiveServer]]:
    """live_server(**settings) → a running LiveServer; all are stopped at the end of the test."""
    servers: list[LiveServer] = []

    def start(**settings) -> LiveServer:
        app = create_app(ServeSettings(**settings), models={"tiny": serve_model})
        server = LiveServer(app).__enter__()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.__exit__(None, None, None)
