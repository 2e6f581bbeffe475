"""A real uvicorn server on 127.0.0.1, driven by the official `openai` client and raw HTTP.

Covers what TestClient cannot: real sockets, concurrent clients batched together, and clients
that hang up mid-generation.
"""

import json
import socket
import threading

import httpx
import openai
import pytest

from quillgpt.generate import generate
from quillgpt.sampling import SamplingParams
from quillgpt.serve.chat import TURN_END, render_chat
from tests.serve.conftest import wait_until

KEY = "test-key"


@pytest.fixture
def server(live_server):
    return live_server(api_key=KEY, max_tokens_cap=1_000_000)


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=30)


def expected(serve_model, prompt, **params):
    (completion,) = generate(serve_model.model, serve_model.tokenizer, prompt, SamplingParams(**params))
    return completion


def test_openai_completions(client, serve_model):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    r = client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=20, temperature=0.8, seed=3)
    want = expected(serve_model, "ROMEO:", max_new_tokens=20, temperature=0.8, seed=3)
    assert r.choices[0].text == want.text and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 20 and r.usage.prompt_tokens == 6

    stream = client.completions.create(
        model="tiny",
        prompt="ROMEO:",
        max_tokens=20,
        temperature=0.8,
        seed=3,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text
    assert chunks[-1].usage.completion_tokens == 20

    r = client.completions.create(model="tiny", prompt="ab", max_tokens=5, logprobs=2, seed=1)
    assert len(r.choices[0].logprobs.tokens) == 5 and all(len(t) == 2 for t in r.choices[0].logprobs.top_logprobs)


def test_openai_chat(client, serve_model):
    messages = [{"role": "system", "content": "Answer."}, {"role": "user", "content": "Who are you?"}]
    want = expected(
        serve_model,
        render_chat([(m["role"], m["content"]) for m in messages]),
        max_new_tokens=30,
        seed=5,
        stop=(TURN_END,),
    )
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=30, seed=5)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want.text
    assert r.choices[0].finish_reason == want.finish_reason

    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=30, seed=5, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == want.finish_reason


def test_openai_errors(server, client):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError, match="not served"):
        client.completions.create(model="nope", prompt="a")
    with pytest.raises(openai.UnprocessableEntityError, match="temperature"):
        client.completions.create(model="tiny", prompt="a", temperature=7)


def test_concurrent_requests_are_batched_and_equal_sequential(server, client, serve_model):
    prompts = [f"Speaker {i}:" for i in range(8)]
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def ask(i: int) -> None:
        try:
            r = client.completions.create(model="tiny", prompt=prompts[i], max_tokens=120, temperature=1.0, seed=i)
            results[i] = r.choices[0].text
        except BaseException as e:  # noqa: BLE001 - surfaced below
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(results) == 8
    assert server.engine().peak_batch > 1, "the requests never shared a decode step"
    for i, prompt in enumerate(prompts):
        assert results[i] == expected(serve_model, prompt, max_new_tokens=120, temperature=1.0, seed=i).text


def test_stream_disconnect_stops_generation(server):
    engine = server.engine()
    body = {"prompt": "a", "max_tokens": 1_000_000, "stream": True}
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=10) as http:
        with http.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert json.loads(first[6:])["choices"][0]["finish_reason"] is None
            assert engine.active == 1
        # leaving the block closes the connection mid-stream
    wait_until(lambda: engine.active == 0, 10, "the engine to drop the sequence")
    assert engine.tokens < 1_000_000
    metrics = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    assert 'quill_generations_total{model="tiny",reason="cancelled"} 1.0' in metrics


def test_plain_request_disconnect_stops_generation(server):
    engine = server.engine()
    payload = json.dumps({"prompt": "a", "max_tokens": 1_000_000}).encode()
    request = (
        f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    ).encode() + payload
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        wait_until(lambda: engine.active == 1, 10, "generation to start")
    wait_until(lambda: engine.active == 0, 10, "the engine to drop the sequence")
    metrics = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    assert 'quill_requests_total{method="POST",route="/v1/completions",status="499"} 1.0' in metrics


def test_full_queue_is_503_with_retry_after(live_server):
    server = live_server(max_batch=1, queue_size=0, max_tokens_cap=1_000_000)
    engine = server.engine()
    with httpx.Client(base_url=server.url, timeout=10) as http:
        with http.stream("POST", "/v1/completions", json={"prompt": "a", "max_tokens": 1_000_000, "stream": True}):
            wait_until(lambda: engine.active == 1, 10, "the first request to run")
            r = http.post("/v1/completions", json={"prompt": "a", "max_tokens": 2})
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert "busy" in r.json()["error"]["message"]
        wait_until(lambda: engine.active == 0, 10, "the first request to be dropped")
        assert http.post("/v1/completions", json={"prompt": "a", "max_tokens": 2}).status_code == 200
