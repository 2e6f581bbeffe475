"""/metrics: Prometheus text whose counts move with the traffic."""

import re


def sample(text: str, name: str, **labels) -> float:
    """The value of one sample in Prometheus text format (0 if absent)."""
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            found = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
            if all(found.get(k) == str(v) for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_count_requests_tokens_and_steps(client):
    before = client.get("/metrics").text
    assert client.get("/metrics").headers["content-type"].startswith("text/plain")
    usage = client.post("/v1/completions", json={"prompt": "a", "max_tokens": 7, "n": 2, "seed": 1}).json()["usage"]
    client.post("/v1/completions", json={"prompt": "a", "max_tokens": 0})
    client.post("/v1/completions", json={"prompt": "a", "max_tokens": 3, "stream": True})
    after = client.get("/metrics").text

    def moved(name, **labels):
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert moved("quill_requests_total", route="/v1/completions", method="POST", status="200") == 2
    assert moved("quill_requests_total", route="/v1/completions", method="POST", status="422") == 1
    assert moved("quill_tokens_generated_total", model="tiny") == usage["completion_tokens"] + 3 == 17
    assert moved("quill_generations_total", model="tiny", reason="length") == 3
    assert moved("quill_time_to_first_token_seconds_count", model="tiny") == 2
    assert moved("quill_request_duration_seconds_count", route="/v1/completions") == 3
    assert moved("quill_batch_size_sum", model="tiny") == 17  # one token per sequence per step
    assert sample(after, "quill_queue_depth", model="tiny") == 0
    assert sample(after, "quill_engine_up", model="tiny") == 1
    assert sample(after, "quill_requests_total", route="unmatched", method="GET", status="404") == 0
    client.get("/no/such/route")
    assert sample(client.get("/metrics").text, "quill_requests_total", route="unmatched", status="404") == 1


def test_each_app_has_its_own_registry(make_client):
    a, b = make_client(), make_client()
    a.post("/v1/completions", json={"prompt": "a", "max_tokens": 4})
    assert sample(a.get("/metrics").text, "quill_tokens_generated_total", model="tiny") == 4
    assert sample(b.get("/metrics").text, "quill_tokens_generated_total", model="tiny") == 0
