"""The app as a whole: lifespan and readiness, auth, CORS, request ids, body limit, error shape."""

import threading

import pytest
from fastapi.testclient import TestClient

from quillgpt.checkpoint import bundled_models, load_model
from quillgpt.data import default_prompt
from quillgpt.serve import app as app_module
from quillgpt.serve.app import create_app
from quillgpt.serve.settings import ServeSettings
from tests.serve.conftest import wait_until


def test_health_ready_and_info(client):
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready")
    assert ready.status_code == 200 and ready.json() == {"status": "ready", "models": {"tiny": "running"}}
    info = client.get("/").json()
    assert info["name"] == "QuillGPT" and info["models"] == ["tiny"] and "/v1/completions" in info["endpoints"]
    assert client.get("/openapi.json").json()["info"]["title"] == "QuillGPT"


def test_ready_is_503_until_models_are_loaded(monkeypatch, serve_model):
    release = threading.Event()

    def slow_load(settings):
        release.wait(10)
        return {"tiny": serve_model}

    monkeypatch.setattr(app_module, "load_models", slow_load)
    with TestClient(create_app(ServeSettings(models=["whatever"]))) as client:
        assert client.get("/health").status_code == 200
        r = client.get("/ready")
        assert r.status_code == 503 and r.json()["status"] == "loading" and r.headers["retry-after"] == "5"
        r = client.post("/v1/completions", json={"prompt": "a"})
        assert r.status_code == 503 and "loading" in r.json()["error"]["message"]
        release.set()
        wait_until(lambda: client.get("/ready").status_code == 200, 10, "/ready")
        assert client.post("/v1/completions", json={"prompt": "a", "max_tokens": 3}).status_code == 200


def test_default_server_lists_every_bundled_model_with_its_default_prompt():
    """No --model: every model under models/ is served, each listed with the prompt a UI starts it
    from, and each continues that prompt."""
    bundled = bundled_models()
    with TestClient(create_app(ServeSettings(device="cpu"))) as client:
        wait_until(lambda: client.get("/ready").status_code == 200, 60, "/ready")
        listed = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
        assert sorted(listed) == sorted(bundled)
        for name, entry in listed.items():
            assert entry["default_prompt"] == default_prompt(load_model(bundled[name], device="meta").info) != ""
            body = {"model": name, "prompt": entry["default_prompt"], "max_tokens": 8, "seed": 1}
            r = client.post("/v1/completions", json=body)
            assert r.status_code == 200 and 1 <= r.json()["usage"]["completion_tokens"] <= 8


def test_models_load_from_directories_with_aliases(tiny_model_dir, monkeypatch):
    settings = ServeSettings(models=[str(tiny_model_dir), f"other={tiny_model_dir}"], device="cpu")
    with TestClient(create_app(settings)) as client:
        wait_until(lambda: client.get("/ready").status_code == 200, 20, "/ready")
        ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
        assert ids == ["tiny", "other"]
        for model in ids:
            r = client.post("/v1/completions", json={"model": model, "prompt": "All", "max_tokens": 4, "seed": 1})
            assert r.status_code == 200 and r.json()["model"] == model
        texts = {
            client.post("/v1/completions", json={"model": m, "prompt": "All", "max_tokens": 8, "seed": 1}).json()[
                "choices"
            ][0]["text"]
            for m in ids
        }
        assert len(texts) == 1  # the same weights under two names


def test_a_model_that_fails_to_load_keeps_ready_503():
    with TestClient(create_app(ServeSettings(models=["/nonexistent/model"]))) as client:
        wait_until(lambda: client.get("/ready").json()["status"] != "loading", 10, "the load to fail")
        r = client.get("/ready")
        assert r.status_code == 503 and r.json()["status"] == "unavailable"
        assert "/nonexistent/model" in r.json()["error"]
        r = client.post("/v1/completions", json={"prompt": "a"})
        assert r.status_code == 503 and "failed to load" in r.json()["error"]["message"]


def test_shutdown_stops_the_engines(make_client):
    client = make_client()
    engine = client.app.state.serve.engines["tiny"]
    assert engine.alive
    client.__exit__(None, None, None)
    assert not engine.alive


PROTECTED = [
    ("get", "/", None),
    ("get", "/metrics", None),
    ("get", "/v1/models", None),
    ("post", "/v1/completions", {"prompt": "a", "max_tokens": 2}),
    ("post", "/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "max_tokens": 2}),
    ("post", "/generate?prompt=a&max_length=2", None),
    ("post", "/generate_stream?prompt=a&max_length=2", None),
    ("post", "/tokenize", {"text": "a"}),
    ("post", "/detokenize", {"tokens": [1]}),
]


@pytest.mark.parametrize(("method", "path", "body"), PROTECTED)
def test_api_key_is_required(make_client, method, path, body):
    client = make_client(api_key="s3cret")
    send = getattr(client, method)
    kwargs = {"json": body} if body is not None else {}
    r = send(path, **kwargs)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert r.json()["error"]["type"] == "authentication_error"
    assert send(path, headers={"Authorization": "Bearer wrong"}, **kwargs).status_code == 401
    assert send(path, headers={"Authorization": "Basic s3cret"}, **kwargs).status_code == 401
    assert send(path, headers={"Authorization": "Bearer s3cret"}, **kwargs).status_code == 200


def test_probes_need_no_api_key(make_client):
    client = make_client(api_key="s3cret")
    assert client.get("/health").status_code == 200
    assert client.get("/ready").status_code == 200
    assert client.get("/metrics").status_code == 401  # metrics name the models and the traffic
    assert client.get("/metrics", headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_the_schema_declares_the_key_only_where_the_server_asks_for_it(make_client):
    """No key: no security scheme and no 401 anywhere. A key: the bearer scheme and a 401 on every
    route (PROTECTED and the rest) but /health and /ready."""
    schema = make_client().get("/openapi.json").json()
    assert "securitySchemes" not in schema["components"]
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            assert "security" not in operation and "401" not in operation["responses"], (method, path)

    schema = make_client(api_key="s3cret").get("/openapi.json").json()
    schemes = schema["components"]["securitySchemes"]
    assert [s | {"description": ""} for s in schemes.values()] == [
        {"type": "http", "scheme": "bearer", "description": ""}
    ]
    secured = {
        (method, path)
        for path, operations in schema["paths"].items()
        for method, operation in operations.items()
        if operation.get("security") == [{name: []} for name in schemes] and "401" in operation["responses"]
    }
    everything = {(method, path) for path, operations in schema["paths"].items() for method in operations}
    assert everything - secured == {("get", "/health"), ("get", "/ready")}
    assert {(method, path.split("?")[0]) for method, path, _ in PROTECTED} <= secured


def test_a_wrong_key_reveals_nothing(make_client):
    """Missing, wrong, a prefix of the key, the key plus more, another scheme: the same answer."""
    client = make_client(api_key="s3cret")
    tries = [{}, {"Authorization": "Bearer "}, {"Authorization": "Bearer s"}, {"Authorization": "Bearer s3cre"}]
    tries += [{"Authorization": "Bearer s3cret2"}, {"Authorization": "Bearer " + "x" * 1000}]
    tries += [{"Authorization": "Basic s3cret"}, {"Authorization": "s3cret"}]
    answers = {(r.status_code, r.text, r.headers["www-authenticate"]) for r in map(_models_with(client), tries)}
    assert len(answers) == 1 and next(iter(answers))[0] == 401
    assert "s3cret" not in next(iter(answers))[1]


def _models_with(client):
    return lambda headers: client.get("/v1/models", headers={**headers, "X-Request-ID": "same"})


def test_cors_allows_only_the_configured_origins(make_client):
    client = make_client(cors_origins=["https://app.example"])
    ok = client.get("/health", headers={"Origin": "https://app.example"})
    assert ok.headers["access-control-allow-origin"] == "https://app.example"
    assert "access-control-allow-credentials" not in ok.headers
    other = client.get("/health", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    preflight = client.options(
        "/v1/completions",
        headers={
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
    )
    assert preflight.status_code == 200 and "POST" in preflight.headers["access-control-allow-methods"]


def test_no_cors_headers_by_default(client):
    r = client.get("/health", headers={"Origin": "https://app.example"})
    assert "access-control-allow-origin" not in r.headers


def test_cors_wildcard_with_credentials_is_refused():
    with pytest.raises(ValueError, match="cannot be combined"):
        ServeSettings(cors_origins=["*"], cors_allow_credentials=True)


def test_request_id_is_echoed_or_made(client):
    assert client.get("/health", headers={"X-Request-ID": "abc-123"}).headers["x-request-id"] == "abc-123"
    made = client.get("/health", headers={"X-Request-ID": "bad id with spaces"}).headers["x-request-id"]
    assert made != "bad id with spaces" and len(made) == 32
    r = client.post("/v1/completions", json={"max_tokens": 0})
    assert r.status_code == 422 and len(r.headers["x-request-id"]) == 32


def test_request_logs_are_structured_with_the_request_id(client, caplog):
    caplog.set_level("INFO", logger="quillgpt.serve.access")
    client.get("/health", headers={"X-Request-ID": "log-me"})
    records = [r for r in caplog.records if r.name == "quillgpt.serve.access"]
    assert records and records[-1].fields["status"] == 200 and records[-1].fields["route"] == "/health"
    from quillgpt.serve.logs import JSONFormatter, request_id

    token = request_id.set("log-me")
    try:
        line = JSONFormatter().format(records[-1])
    finally:
        request_id.reset(token)
    assert '"request_id": "log-me"' in line and '"status": 200' in line


def test_body_size_limit(make_client):
    client = make_client(max_body_bytes=2048)
    big = {"prompt": "a" * 4000}
    r = client.post("/v1/completions", json=big)
    assert r.status_code == 413 and "2048" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: the limit applies while the body arrives
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"a" * 500
        yield b'"}'

    r = client.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    assert client.post("/v1/completions", json={"prompt": "a" * 100, "max_tokens": 1}).status_code == 200


def test_errors_have_one_shape(client):
    for r in (client.get("/nope"), client.get("/v1/completions"), client.post("/v1/completions", json={"n": 0})):
        body = r.json()
        assert 400 <= r.status_code < 500
        assert set(body) == {"error", "detail"} and body["error"]["message"] == body["detail"]


def test_the_schema_states_the_enforced_limits(make_client):
    """Every bound a route enforces is in /openapi.json: the settings' caps, and the sampling ranges
    on the OpenAI and the original routes alike."""
    client = make_client(max_tokens_cap=64, max_choices=4, max_prompt_chars=100)
    schema = client.get("/openapi.json").json()
    models = schema["components"]["schemas"]

    def bounds(prop):
        return {k: v for o in [prop, *prop.get("anyOf", [])] for k, v in o.items() if k in ("minimum", "maximum")}

    assert bounds(models["CompletionRequest"]["properties"]["max_tokens"]) == {"minimum": 1, "maximum": 64}
    assert bounds(models["ChatRequest"]["properties"]["max_completion_tokens"])["maximum"] == 64
    assert models["CompletionRequest"]["properties"]["n"]["maximum"] == 4
    assert models["TokenizeRequest"]["properties"]["text"]["maxLength"] == 100
    for name in ("CompletionRequest", "ChatRequest", "LegacyGenerateBody"):
        assert bounds(models[name]["properties"]["top_p"]) == {"minimum": 1e-6, "maximum": 1}, name
        assert bounds(models[name]["properties"]["temperature"]) == {"minimum": 0, "maximum": 2}, name
    query = {p["name"]: p["schema"] for p in schema["paths"]["/generate"]["post"]["parameters"]}
    assert bounds(query["max_length"]) == {"minimum": 1, "maximum": 64}
    assert bounds(query["temperature"]) == {"minimum": 0, "maximum": 2}
    assert client.post("/generate", params={"prompt": "a", "max_length": 65}).status_code == 422
    assert client.post("/v1/completions", json={"prompt": "a", "max_tokens": 64}).status_code == 200
