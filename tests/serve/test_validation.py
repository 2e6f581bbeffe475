"""A table of bad requests: every one is answered with a 4xx and a message naming the problem."""

import pytest

USER = [{"role": "user", "content": "hi"}]
CASES = [
    # (route, body, status, words the message must contain)
    ("/v1/completions", {"prompt": 5}, 422, "prompt"),
    ("/v1/completions", {"prompt": []}, 422, "prompt"),
    ("/v1/completions", {"prompt": [[]]}, 422, "prompt"),
    ("/v1/completions", {"prompt": [1, "a"]}, 422, "prompt"),
    ("/v1/completions", {"prompt": [-1]}, 422, "prompt"),
    ("/v1/completions", {"prompt": [100_000]}, 422, "token ids"),
    ("/v1/completions", {"prompt": "a" * 20_000}, 422, "longer than"),
    ("/v1/completions", {"prompt": "caf\u00e9"}, 422, "vocabulary"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 0}, 422, "max_tokens"),
    ("/v1/completions", {"prompt": "a", "max_tokens": -5}, 422, "max_tokens"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 3000}, 422, "at most 2048"),
    ("/v1/completions", {"prompt": "a", "max_tokens": "lots"}, 422, "max_tokens"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 1.5}, 422, "max_tokens"),
    ("/v1/completions", {"prompt": "a", "temperature": -0.1}, 422, "temperature"),
    ("/v1/completions", {"prompt": "a", "temperature": 2.5}, 422, "temperature"),
    ("/v1/completions", {"prompt": "a", "temperature": "hot"}, 422, "temperature"),
    ("/v1/completions", {"prompt": "a", "top_p": 0}, 422, "top_p"),
    ("/v1/completions", {"prompt": "a", "top_p": 1.5}, 422, "top_p"),
    ("/v1/completions", {"prompt": "a", "top_k": 0}, 422, "top_k"),
    ("/v1/completions", {"prompt": "a", "n": 0}, 422, "n"),
    ("/v1/completions", {"prompt": "a", "n": 17}, 422, "at most 16"),
    ("/v1/completions", {"prompt": ["a", "b", "c"], "n": 6}, 422, "prompts x n"),
    ("/v1/completions", {"prompt": "a", "stop": ""}, 422, "stop"),
    ("/v1/completions", {"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, 422, "stop"),
    ("/v1/completions", {"prompt": "a", "stop": 5}, 422, "stop"),
    ("/v1/completions", {"prompt": "a", "seed": -1}, 422, "seed"),
    ("/v1/completions", {"prompt": "a", "seed": 2**64}, 422, "seed"),
    ("/v1/completions", {"prompt": "a", "logprobs": 21}, 422, "logprobs"),
    ("/v1/completions", {"prompt": "a", "logprobs": -1}, 422, "logprobs"),
    ("/v1/completions", {"prompt": "a", "presence_penalty": 3}, 422, "presence_penalty"),
    ("/v1/completions", {"prompt": "a", "frequency_penalty": -3}, 422, "frequency_penalty"),
    ("/v1/completions", {"prompt": "a", "repetition_penalty": 0}, 422, "repetition_penalty"),
    # issue 16's HTTP 500: a denormal penalty passed validation and made the probabilities NaN
    (
        "/v1/completions",
        {"prompt": "a", "repetition_penalty": 1e-323, "temperature": 1.61, "presence_penalty": -1.99, "logprobs": 15},
        422,
        "repetition_penalty",
    ),
    ("/v1/completions", {"prompt": "a", "repetition_penalty": 1e308}, 422, "repetition_penalty"),
    ("/v1/completions", {"prompt": "a", "top_p": 5e-324}, 422, "top_p"),
    ("/v1/completions", {"prompt": "a", "temperature": 1e308}, 422, "temperature"),
    ("/v1/completions", {"prompt": "a", "top_k": 10**30}, 422, "top_k"),
    ("/v1/chat/completions", {"messages": USER, "repetition_penalty": 5e-324}, 422, "repetition_penalty"),
    ("/v1/completions", {"prompt": "a", "echo": True, "logprobs": 1}, 422, "echo"),
    ("/v1/completions", {"prompt": "a", "suffix": "x"}, 422, "suffix"),
    ("/v1/completions", {"prompt": "a", "best_of": 3}, 422, "best_of"),
    ("/v1/completions", {"prompt": "a", "logit_bias": {"1": 5}}, 422, "logit_bias"),
    ("/v1/completions", {"prompt": "a", "model": "nope"}, 404, "not served"),
    ("/v1/completions", {"prompt": "a", "model": ""}, 422, "model"),
    ("/v1/completions", {"prompt": "a", "stream": "maybe"}, 422, "stream"),
    ("/v1/completions", {"prompt": "a", "stream_options": 5}, 422, "stream_options"),
    ("/v1/completions", [1, 2], 422, "JSON object"),
    ("/v1/chat/completions", {}, 422, "messages"),
    ("/v1/chat/completions", {"messages": []}, 422, "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, 422, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, 422, "role"),
    ("/v1/chat/completions", {"messages": [{"content": "x"}]}, 422, "role"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        422,
        "content",
    ),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "caf\u00e9"}]}, 422, "vocabulary"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a" * 20_000}]}, 422, "longer than"),
    ("/v1/chat/completions", {"messages": USER, "tools": [{"type": "function"}]}, 422, "tools"),
    ("/v1/chat/completions", {"messages": USER, "response_format": {"type": "json_object"}}, 422, "response_format"),
    ("/v1/chat/completions", {"messages": USER, "top_logprobs": 2}, 422, "top_logprobs"),
    ("/v1/chat/completions", {"messages": USER, "max_completion_tokens": 0}, 422, "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": USER, "max_tokens": 5000}, 422, "at most"),
    ("/v1/chat/completions", {"messages": USER, "n": 100}, 422, "n"),
    ("/generate", {"max_length": 5}, 422, "prompt"),
    ("/generate", {"prompt": "a", "max_length": "x"}, 422, "max_length"),
    ("/generate", {"prompt": "a", "temperature": 9}, 422, "temperature"),
    ("/generate", {"prompt": "a", "top_p": 5e-324}, 422, "top_p"),
    ("/generate", {"prompt": "a", "top_k": 0}, 422, "top_k"),
    ("/generate", {"prompt": "a", "seed": -1}, 422, "seed"),
    ("/generate_stream", {"prompt": "a", "max_length": 0}, 422, "max_length"),
    ("/tokenize", {}, 422, "text"),
    ("/tokenize", {"text": 5}, 422, "text"),
    ("/detokenize", {"tokens": "abc"}, 422, "tokens"),
    ("/detokenize", {"tokens": [1.5]}, 422, "tokens"),
]


@pytest.mark.parametrize(
    ("route", "body", "status", "words"), CASES, ids=[f"{i}-{c[0]}-{str(c[1])[:40]}" for i, c in enumerate(CASES)]
)
def test_bad_input_is_a_clear_4xx(client, route, body, status, words):
    r = client.post(route, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert words in error["message"], error["message"]
    assert error["type"] in ("invalid_request_error", "not_found_error")


@pytest.mark.parametrize("raw", [b"", b"{", b"not json", b'{"prompt": "a",}', b"NaN", b'{"prompt": "a"} x'])
def test_malformed_bodies_are_422(client, raw):
    r = client.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["message"]


def test_non_finite_numbers_are_refused(client):
    r = client.post(
        "/v1/completions", content=b'{"prompt": "a", "temperature": NaN}', headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 422 and "temperature" in r.json()["error"]["message"]


def test_a_tiny_temperature_is_greedy(client):
    body = {"prompt": "ab", "max_tokens": 8, "seed": 1}
    texts = [
        client.post("/v1/completions", json=body | {"temperature": t}).json()["choices"][0]["text"] for t in (0, 5e-324)
    ]
    assert texts[0] == texts[1]


def test_a_body_that_is_not_json_is_422(client):
    r = client.post(
        "/v1/completions", content=b"prompt=a", headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert r.status_code == 422 and "Content-Type: application/json" in r.json()["error"]["message"]


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("get", "/v1/completions", 405),
        ("put", "/generate", 405),
        ("get", "/v2/anything", 404),
        ("delete", "/health", 405),
    ],
)
def test_wrong_routes_and_methods(client, method, path, status):
    r = getattr(client, method)(path)
    assert r.status_code == status and r.json()["error"]["message"]
