"""/tokenize and /detokenize."""


def test_tokenize_round_trip(client, ascii_tokenizer):
    r = client.post("/tokenize", json={"text": "Hi you"})
    assert r.status_code == 200
    body = r.json()
    assert body == {"model": "tiny", "tokens": ascii_tokenizer.encode("Hi you"), "count": 6, "pieces": list("Hi you")}
    assert client.post("/detokenize", json={"model": "tiny", "tokens": body["tokens"]}).json() == {
        "model": "tiny",
        "text": "Hi you",
    }


def test_tokenize_errors(client):
    r = client.post("/tokenize", json={"text": "caf\u00e9"})
    assert r.status_code == 422 and "'\u00e9'" in r.json()["error"]["message"]
    r = client.post("/detokenize", json={"tokens": [1, 96]})
    assert r.status_code == 422 and "96" in r.json()["error"]["message"]
    assert client.post("/detokenize", json={"tokens": [-1]}).status_code == 422
    assert client.post("/tokenize", json={"text": "a", "model": "nope"}).status_code == 404
