"""Starting the server: flags over environment, and errors the user can fix exit 2 before binding."""

import argparse
import os

import pytest

from quillgpt.checkpoint import served_models
from quillgpt.serve.server import add_serve_arguments, main, settings_from_args


def parse(argv):
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return parser.parse_args(argv)


def test_flags_override_the_environment(monkeypatch):
    monkeypatch.setenv("QUILL_PORT", "9000")
    monkeypatch.setenv("QUILL_HOST", "0.0.0.0")
    argv = "--model a b --model c=d --port 7000 --api-key k --workers 2 --cors-origin https://x".split()
    s = settings_from_args(parse(argv))
    assert s.models == ["a", "b", "c=d"] and s.port == 7000 and s.host == "0.0.0.0"
    assert s.api_key.get_secret_value() == "k" and s.workers == 2 and s.cors_origins == ["https://x"]
    assert settings_from_args(parse([])).models == served_models()


def test_missing_model_exits_2_before_serving(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("QUILL_MODELS_DIR", str(tmp_path))
    monkeypatch.setattr("quillgpt.serve.server.setup_process", lambda settings: None)
    monkeypatch.setattr("uvicorn.run", lambda *a, **k: pytest.fail("the server must not start"))
    assert main(["--model", "no-such-model"]) == 2
    assert "no-such-model" in capsys.readouterr().err


def test_invalid_setting_exits_2(capsys):
    assert main(["--port", "99999"]) == 2
    assert "port" in capsys.readouterr().err


def test_run_starts_uvicorn_with_the_app(monkeypatch, tiny_model_dir):
    seen = {}
    monkeypatch.setattr("quillgpt.serve.server.setup_process", lambda settings: None)
    monkeypatch.setattr("uvicorn.run", lambda app, **kw: seen.update(app=app, **kw))
    assert main(["--model", str(tiny_model_dir), "--port", "0"]) == 0
    assert seen["app"].state.serve.settings.models == [str(tiny_model_dir)]
    assert (seen["host"], seen["port"], seen["access_log"]) == ("127.0.0.1", 0, False)


def test_several_workers_use_the_factory(monkeypatch, tiny_model_dir):
    seen = {}
    monkeypatch.setattr("quillgpt.serve.server.setup_process", lambda settings: None)
    monkeypatch.setattr("uvicorn.run", lambda app, **kw: seen.update(app=app, **kw))
    monkeypatch.setattr(os, "environ", dict(os.environ))  # run() exports QUILL_* for the workers: keep them here
    assert main(["--model", str(tiny_model_dir), "--workers", "3"]) == 0
    assert seen["app"] == "quillgpt.serve.app:app_from_env" and seen["factory"] and seen["workers"] == 3
    assert os.environ["QUILL_MODELS"] == f'["{tiny_model_dir}"]'
