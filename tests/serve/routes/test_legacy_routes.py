"""The original QuillGPT's /generate and /generate_stream."""

from quillgpt.generate import generate
from quillgpt.sampling import SamplingParams


def test_generate_with_query_parameters(client):
    r = client.post("/generate", params={"prompt": "ROMEO:", "max_length": 12, "temperature": 0.7})
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"prompt", "response"} and body["prompt"] == "ROMEO:"
    assert len(body["response"]) == 12  # one character per token


def test_generate_with_a_json_body_matches_the_library(client, serve_model):
    r = client.post("/generate", json={"prompt": "ab", "max_length": 20, "temperature": 0.5, "seed": 3})
    (expected,) = generate(
        serve_model.model, serve_model.tokenizer, "ab", SamplingParams(max_new_tokens=20, temperature=0.5, seed=3)
    )
    assert r.json() == {"prompt": "ab", "response": expected.text}


def test_body_values_win_over_the_query(client):
    r = client.post("/generate", params={"prompt": "query", "max_length": 3}, json={"prompt": "body", "seed": 1})
    assert r.json()["prompt"] == "body" and len(r.json()["response"]) == 3


def test_default_length_is_the_originals_500(client):
    assert len(client.post("/generate", params={"prompt": "a"}).json()["response"]) == 500


def test_generate_stream_sends_plain_text(client):
    body = {"prompt": "ab", "max_length": 30, "seed": 5}
    r = client.post("/generate_stream", json=body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert r.text == client.post("/generate", json=body).json()["response"]


def test_legacy_errors_are_4xx(client):
    assert client.post("/generate").status_code == 422
    assert client.post("/generate_stream").status_code == 422
    assert client.post("/generate", params={"prompt": "a", "max_length": 0}).status_code == 422
    assert client.post("/generate", params={"prompt": "a", "max_length": 10**6}).status_code == 422
    assert client.post("/generate", params={"prompt": "a", "temperature": -1}).status_code == 422
    r = client.post("/generate", params={"prompt": "\u00e9"})
    assert r.status_code == 422 and "vocabulary" in r.json()["error"]["message"]
