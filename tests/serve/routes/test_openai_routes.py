"""/v1/models, /v1/completions and /v1/chat/completions through TestClient."""

import json

from quillgpt.generate import generate
from quillgpt.sampling import SamplingParams
from quillgpt.serve.chat import render_chat


def sse_events(text: str) -> list:
    """Parse a Server-Sent Events body: the JSON of each `data:` line, then "[DONE]"."""
    events = []
    for block in text.split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            payload = block[len("data: ") :]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def complete(client, **body):
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_models(client, serve_model):
    data = client.get("/v1/models").json()
    assert data["object"] == "list"
    (card,) = data["data"]
    assert card["id"] == "tiny" and card["object"] == "model" and card["context_length"] == 32
    assert card["vocab_size"] == 96 and card["parameters"] == serve_model.model.num_params()
    assert client.get("/v1/models/tiny").json() == card
    r = client.get("/v1/models/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_completion_matches_the_library(client, serve_model):
    body = complete(client, model="tiny", prompt="ROMEO:", max_tokens=30, temperature=0.8, top_p=0.9, seed=7)
    (expected,) = generate(
        serve_model.model,
        serve_model.tokenizer,
        "ROMEO:",
        SamplingParams(max_new_tokens=30, temperature=0.8, top_p=0.9, seed=7),
    )
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-") and body["model"] == "tiny"
    (choice,) = body["choices"]
    assert choice == {"index": 0, "text": expected.text, "logprobs": None, "finish_reason": "length"}
    assert body["usage"] == {"prompt_tokens": 6, "completion_tokens": 30, "total_tokens": 36}


def test_model_defaults_to_the_first_served(client):
    assert complete(client, prompt="a", max_tokens=2)["model"] == "tiny"


def test_default_max_tokens_is_openais_16(client):
    assert complete(client, prompt="a", seed=1)["usage"]["completion_tokens"] == 16


def test_n_choices_use_seed_plus_i(client):
    body = complete(client, prompt="Hi", max_tokens=20, n=3, seed=40)
    texts = [c["text"] for c in body["choices"]]
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert texts == [complete(client, prompt="Hi", max_tokens=20, seed=40 + i)["choices"][0]["text"] for i in range(3)]
    assert len(set(texts)) == 3
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 60, "total_tokens": 62}


def test_several_prompts_and_token_ids(client, ascii_tokenizer):
    body = complete(client, prompt=["ab", "cd"], max_tokens=5, n=2, seed=3)
    assert len(body["choices"]) == 4 and body["usage"]["prompt_tokens"] == 4
    as_ids = complete(
        client, prompt=[ascii_tokenizer.encode("ab"), ascii_tokenizer.encode("cd")], max_tokens=5, n=2, seed=3
    )
    assert [c["text"] for c in as_ids["choices"]] == [c["text"] for c in body["choices"]]
    one = complete(client, prompt=ascii_tokenizer.encode("ab"), max_tokens=5, seed=3)
    assert one["choices"][0]["text"] == body["choices"][0]["text"]


def test_stop_strings_end_the_text(client):
    free = complete(client, prompt="a", max_tokens=60, seed=11)["choices"][0]["text"]
    stop = free[10:12]
    stopped = complete(client, prompt="a", max_tokens=60, seed=11, stop=[stop, "\x00"])["choices"][0]
    assert stopped["finish_reason"] == "stop"
    assert stopped["text"] == free[: free.index(stop)]


def test_echo(client):
    plain = complete(client, prompt="ab", max_tokens=5, seed=2)["choices"][0]["text"]
    assert complete(client, prompt="ab", max_tokens=5, seed=2, echo=True)["choices"][0]["text"] == "ab" + plain


def test_logprobs(client):
    choice = complete(client, prompt="ab", max_tokens=8, seed=2, logprobs=3)["choices"][0]
    lp = choice["logprobs"]
    assert "".join(lp["tokens"]) == choice["text"]
    assert len(lp["token_logprobs"]) == 8 and all(v <= 0 for v in lp["token_logprobs"])
    assert all(len(top) == 3 for top in lp["top_logprobs"])
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(8)]
    greedy = complete(client, prompt="ab", max_tokens=4, temperature=0, logprobs=1)["choices"][0]["logprobs"]
    for token, value, top in zip(greedy["tokens"], greedy["token_logprobs"], greedy["top_logprobs"]):
        assert top == {token: value}  # greedy picks the most likely token
    assert complete(client, prompt="ab", max_tokens=2, logprobs=0)["choices"][0]["logprobs"]["top_logprobs"] is None


def test_penalties_reach_the_sampler(client):
    plain = complete(client, prompt="a", max_tokens=40, temperature=0)["choices"][0]["text"]
    penalised = complete(client, prompt="a", max_tokens=40, temperature=0, frequency_penalty=2, presence_penalty=2)
    assert penalised["choices"][0]["text"] != plain


def test_stream_equals_the_plain_response(client):
    body = {"prompt": "ROMEO:", "max_tokens": 25, "seed": 9, "n": 2}
    plain = complete(client, **body)
    r = client.post("/v1/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks, usage = events[:-2], events[-2]
    assert usage["choices"] == [] and usage["usage"] == plain["usage"]
    for i in range(2):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == i]
        assert "".join(c["text"] for c in mine) == plain["choices"][i]["text"]
        assert [c["finish_reason"] for c in mine][-1] == "length"
        assert all(c["finish_reason"] is None for c in mine[:-1])
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)


def test_stream_without_usage_and_with_logprobs(client):
    r = client.post("/v1/completions", json={"prompt": "a", "max_tokens": 5, "seed": 1, "stream": True, "logprobs": 1})
    events = sse_events(r.text)
    assert all("usage" not in e for e in events[:-1])
    token_chunks = [e for e in events[:-1] if e["choices"][0]["finish_reason"] is None]
    assert len(token_chunks) == 5
    offsets = [c["choices"][0]["logprobs"]["text_offset"][0] for c in token_chunks]
    assert offsets == [0, 1, 2, 3, 4]


def test_chat_template():
    text = render_chat([("system", "Be brief."), ("user", "Hello"), ("assistant", "Hi."), ("user", "Speak\n")])
    assert text == "Be brief.\n\nUser:\nHello\n\nAssistant:\nHi.\n\nUser:\nSpeak\n\nAssistant:\n"


def test_chat_completion_continues_the_transcript(client, serve_model):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    r = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 20, "seed": 4})
    assert r.status_code == 200, r.text
    body = r.json()
    prompt = render_chat([("system", "Be brief."), ("user", "Hello")])
    (expected,) = generate(
        serve_model.model, serve_model.tokenizer, prompt, SamplingParams(max_new_tokens=20, seed=4, stop=("\n\n",))
    )
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    (choice,) = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": expected.text}
    assert choice["finish_reason"] == expected.finish_reason
    assert body["usage"]["prompt_tokens"] == len(prompt)


def test_chat_content_parts_and_max_completion_tokens(client):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]}]
    plain = [{"role": "user", "content": "Hello"}]
    a = client.post("/v1/chat/completions", json={"messages": parts, "max_completion_tokens": 6, "seed": 1}).json()
    b = client.post("/v1/chat/completions", json={"messages": plain, "max_tokens": 6, "seed": 1}).json()
    assert a["choices"][0]["message"] == b["choices"][0]["message"]
    assert a["usage"]["completion_tokens"] <= 6


def test_chat_stream_and_logprobs(client):
    body = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 12, "seed": 8, "temperature": 1.5}
    plain = client.post("/v1/chat/completions", json={**body, "logprobs": True, "top_logprobs": 2}).json()
    content = plain["choices"][0]["logprobs"]["content"]
    assert "".join(t["token"] for t in content).startswith(plain["choices"][0]["message"]["content"])
    assert all(len(t["top_logprobs"]) == 2 and t["bytes"] == list(t["token"].encode()) for t in content)
    events = sse_events(client.post("/v1/chat/completions", json={**body, "stream": True}).text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == plain["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]


def test_request_timeout_is_504(make_client):
    client = make_client(request_timeout=0.2, max_tokens_cap=1_000_000)
    r = client.post("/v1/completions", json={"prompt": "a", "max_tokens": 1_000_000})
    assert r.status_code == 504 and r.json()["error"]["type"] == "timeout"
    r = client.post("/v1/completions", json={"prompt": "a", "max_tokens": 1_000_000, "stream": True})
    events = sse_events(r.text)
    assert events[-1] == "[DONE]" and events[-2]["error"]["type"] == "timeout"
    assert client.post("/v1/completions", json={"prompt": "a", "max_tokens": 3}).status_code == 200
