import pytest
from pydantic import ValidationError

from quillgpt.checkpoint import served_models
from quillgpt.serve.settings import ServeSettings, parse_model_spec


def test_defaults():
    s = ServeSettings()
    assert s.models == served_models() and (s.host, s.port) == ("127.0.0.1", 8080)
    assert s.api_key is None and s.cors_origins == [] and s.workers == 1


def test_environment_variables(monkeypatch):
    monkeypatch.setenv("QUILL_MODELS", "a, b=/models/x")
    monkeypatch.setenv("QUILL_PORT", "9000")
    monkeypatch.setenv("QUILL_API_KEY", "k")
    monkeypatch.setenv("QUILL_CORS_ORIGINS", '["https://a.example", "https://b.example"]')
    monkeypatch.setenv("QUILL_LOG_LEVEL", "WARNING")
    s = ServeSettings()
    assert s.models == ["a", "b=/models/x"] and s.port == 9000 and s.api_key.get_secret_value() == "k"
    assert s.cors_origins == ["https://a.example", "https://b.example"] and s.log_level == "warning"
    assert ServeSettings(port=1).port == 1  # keywords (command-line flags) win over the environment
    monkeypatch.setenv("QUILL_API_KEY", "")
    monkeypatch.setenv("QUILL_CORS_ORIGINS", "")
    s = ServeSettings()  # compose passes unset variables as empty strings
    assert s.api_key is None and s.cors_origins == []


def test_to_env_round_trips(monkeypatch):
    s = ServeSettings(models=["a", "b=c"], api_key="k", cors_origins=["https://x"], max_batch=3)
    for key, value in s.to_env().items():
        monkeypatch.setenv(key, value)
    assert ServeSettings() == s


@pytest.mark.parametrize(
    "kwargs",
    [
        {"port": 70000},
        {"max_batch": 0},
        {"queue_size": -1},
        {"request_timeout": 0},
        {"models": []},
        {"models": ["a=x", "a=y"]},
        {"log_level": "loud"},
        {"max_body_bytes": 10},
        {"unknown": 1},
        {"cors_origins": ["*"], "cors_allow_credentials": True},
    ],
)
def test_invalid_settings(kwargs):
    with pytest.raises(ValidationError):
        ServeSettings(**kwargs)


def test_model_specs(tmp_path):
    assert parse_model_spec("shakespeare-char") == (None, "shakespeare-char")
    assert parse_model_spec("fast=models/x") == ("fast", "models/x")
    assert parse_model_spec("./weird=name") == (None, "./weird=name")
    odd = tmp_path / "a=b"
    odd.mkdir()
    assert parse_model_spec(str(odd)) == (None, str(odd))
