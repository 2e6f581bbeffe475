"""Generate over the page's own route (quillgpt/playground/live.py): the JSON lines a browser reads, set
against the playground's backend run directly; every refused request; Stop; a page that goes away."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from quillgpt.playground import live
from quillgpt.playground.local import LocalBackend
from quillgpt.playground.output import model_label
from quillgpt.playground.view import prompt_html, render_tokens
from quillgpt.sampling import SamplingParams

# One side's fields as the page's script reads them off the page (the model as its picker shows it)
FIELDS = {"temperature": "1.00", "top_k": "0", "top_p": "1.00", "max_new_tokens": "12",
          "repetition_penalty": "1.00", "seed": "5", "stop": ""}  # fmt: skip


@pytest.fixture
def fields(tiny_model_dir) -> dict[str, str]:
    return FIELDS | {"model": model_label(str(tiny_model_dir))}


@pytest.fixture
def client():
    with TestClient(Starlette(routes=live.ROUTES)) as c:
        yield c


@pytest.fixture
def session(tiny_model_dir) -> live.Live:
    """A page's Live, as the page leaves it after drawing one side with the tiny model."""
    s = live.Live()
    s.show(LocalBackend([str(tiny_model_dir)]), {"a": str(tiny_model_dir)}, ready=True)
    return s


def post(client, session, prompt="the ", **sides):
    return client.post(live.GENERATE_PATH, json={"ticket": session.ticket, "prompt": prompt, "sides": sides})


def lines(response) -> list[dict]:
    return [json.loads(line) for line in response.text.splitlines()]


def streams_alive() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "quill-stream" and t.is_alive()]


def wait_until(condition, seconds=10.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    return condition()


def test_the_lines_build_the_view_of_the_text_the_backend_generates(client, session, fields, tiny_model_dir):
    r = post(client, session, a=fields)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
    got = lines(r)
    assert all(m["side"] == "a" for m in got)
    first, last = got[0], got[-1]
    assert first["html"] == prompt_html("the ") and re.fullmatch(r"[0-9a-f]{32}", first["key"])
    assert last["end"] == "done", last
    assert last["tokens"] == 12 and last["status"].startswith("finished (max new tokens)")
    # the backend's own stream, same model, prompt and seed: the same text, and the pieces are its view
    direct = list(LocalBackend([str(tiny_model_dir)]).stream(str(tiny_model_dir), "the ", SamplingParams(12, seed=5)))
    text = "".join(c.text for c in direct)
    tokens = [t for c in direct for t in c.tokens]
    whole = render_tokens("the ", text, tokens)
    assert whole == f'<div class="quill-output">{"".join(m["html"] for m in got)}</div>'
    # the session takes the result once, finished
    (res,) = session.take_finished().values()
    assert (
        res.key == first["key"]
        and res.text == text
        and res.status == "done"
        and res.settings == "temperature 1 · seed 5"
    )
    assert session.take_finished() == {}
    assert wait_until(lambda: not streams_alive())


def test_both_sides_of_a_comparison_stream_and_end(client, session, fields, tiny_model_dir):
    session.show(session.backend, {"a": str(tiny_model_dir), "b": str(tiny_model_dir)}, ready=True)
    got = lines(post(client, session, a=fields, b=fields | {"max_new_tokens": "7", "seed": ""}))
    ends = {m["side"]: m for m in got if "end" in m}
    assert ends["a"]["tokens"] == 12 and ends["b"]["tokens"] == 7
    assert set(session.take_finished()) == {"a", "b"}


MODEL = object()  # stands for the tiny model's label in the cases below


@pytest.mark.parametrize(
    "send, status, message",
    [
        (dict(content="{}", headers={"content-type": "text/plain"}), 415, "application/json"),
        (dict(content="{not json", headers={"content-type": "application/json"}), 400, "not valid JSON"),
        (dict(json=["a list"]), 400, "JSON object"),
        (dict(json={"ticket": "nobody's", "prompt": "x", "sides": {"a": FIELDS}}), 409, "reload"),
        (dict(json={"prompt": 3, "sides": {"a": FIELDS}}), 400, "prompt"),
        (dict(json={"prompt": "x", "sides": {}}), 400, "sides"),
        (dict(json={"prompt": "x", "sides": {"a": ["1.0"]}}), 400, "sides"),
        (dict(json={"prompt": "x", "sides": {"b": FIELDS}}), 409, "not drawn these models"),
        (dict(json={"prompt": "x", "sides": {"a": FIELDS | {"model": "another"}}}), 409, "not drawn these models"),
        (dict(json={"prompt": "x", "sides": {"a": {"temperature": "hot"}}}), 422, "temperature must be a number"),
        (dict(json={"prompt": "x", "sides": {"a": {"top_p": "1.5"}}}), 422, "top p must be from 0.0 to 1.0"),
        (dict(json={"prompt": "x", "sides": {"a": {"max_new_tokens": "5001"}}}), 422, "max new tokens must be from"),
        (dict(json={"prompt": "x", "sides": {"a": {"max_new_tokens": 1e300}}}), 422, "max new tokens must be from"),
        (dict(json={"prompt": "x", "sides": {"a": {"seed": "1.5"}}}), 422, "seed must be a whole number"),
        (dict(json={"prompt": "x", "sides": {"a": {"temperature": "nan"}}}), 422, "temperature must be from"),
    ],
)
def test_what_the_route_refuses_it_says_why_and_starts_nothing(client, session, fields, send, status, message):
    if isinstance(send.get("json"), dict) and "ticket" not in send["json"]:
        body = {"ticket": session.ticket} | send["json"]
        # a side's fields are the page's, but for what the case changes
        body["sides"] = {k: fields | v if isinstance(v, dict) else v for k, v in body["sides"].items()}
        send = dict(json=body)
    r = client.post(live.GENERATE_PATH, **send)
    assert r.status_code == status and message in r.json()["error"], r.text
    assert session.generation is None and not streams_alive()


def test_a_number_json_cannot_hold_is_refused_not_crashed_on(client, session, fields):
    """Python's JSON reader takes 1e999 (infinity), which no whole number can be."""
    body = json.dumps({"ticket": session.ticket, "prompt": "", "sides": {"a": fields}})
    body = body.replace('"max_new_tokens": "12"', '"max_new_tokens": 1e999')
    r = client.post(live.GENERATE_PATH, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422 and "max new tokens must be a whole number" in r.json()["error"]


def test_stop_is_refused_like_generate(client, session):
    assert client.post(live.STOP_PATH, content="{}", headers={"content-type": "text/plain"}).status_code == 415
    assert client.post(live.STOP_PATH, json={"ticket": "nobody's"}).status_code == 409
    assert client.post(live.STOP_PATH, json={"ticket": session.ticket}).status_code == 204  # nothing to stop


def test_a_page_whose_models_do_not_all_load_is_sent_back_to_streamlit(client, session, fields, tiny_model_dir):
    session.show(session.backend, {"a": str(tiny_model_dir)}, ready=False)
    r = post(client, session, a=fields)
    assert r.status_code == 409 and session.generation is None


def test_stop_ends_the_stream_with_the_text_so_far(client, session, fields):
    long = fields | {"max_new_tokens": "5000"}
    with client.stream(
        "POST", live.GENERATE_PATH, json={"ticket": session.ticket, "prompt": "", "sides": {"a": long}}
    ) as r:
        got = []
        for line in r.iter_lines():
            got.append(json.loads(line))
            if len(got) == 2:  # the prompt, then the first tokens
                assert client.post(live.STOP_PATH, json={"ticket": session.ticket}).status_code == 204
    end = got[-1]
    assert end["end"] == "stopped" and 0 < end["tokens"] < 5000 and end["status"].startswith("stopped ·")
    (res,) = session.take_finished().values()
    assert res.status == "stopped" and len(res.tokens) == end["tokens"]
    assert wait_until(lambda: not streams_alive())


def test_a_new_click_stops_the_generation_before_it(session):
    first = session.start("", {"a": SamplingParams(5000)})
    second = session.start("", {"a": SamplingParams(5000)})
    assert first.results["a"].status == "stopped" and second.results["a"].status == "running"
    assert wait_until(lambda: streams_alive() == [second.streams["a"]._thread]), "the first went on decoding"
    session.stop()
    assert wait_until(lambda: not streams_alive())


def test_a_page_that_goes_away_stops_its_generation(client, session, fields):
    long = fields | {"max_new_tokens": "5000"}
    with client.stream(
        "POST", live.GENERATE_PATH, json={"ticket": session.ticket, "prompt": "", "sides": {"a": long}}
    ) as r:
        next(r.iter_lines())
    assert wait_until(lambda: not streams_alive()), "the model went on decoding for nobody"
    assert session.generation.results["a"].status == "stopped"


def test_a_closed_sessions_ticket_is_forgotten(client, fields, tiny_model_dir):
    s = live.Live()
    s.show(LocalBackend([str(tiny_model_dir)]), {"a": str(tiny_model_dir)}, ready=True)
    ticket = s.ticket
    del s  # the session's state held the only reference
    r = client.post(live.GENERATE_PATH, json={"ticket": ticket, "prompt": "", "sides": {"a": fields}})
    assert r.status_code == 409


def test_the_pages_script_survives_streamlits_sanitizer():
    """st.html drops a script whose text has "<" before a letter or "/" (DOMPurify's markup check)."""
    script = Path(live.__file__).with_name("live.js").read_text(encoding="utf-8")
    assert not re.search(r"<[/\w!]", script)
    assert live.SCRIPT.startswith("<script>") and live.SCRIPT.endswith("</script>")
