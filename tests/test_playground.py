"""The playground page through Streamlit's AppTest (widgets, generation, errors), and its backends."""

from __future__ import annotations

import html
import json
import math
import os
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
import torch
from streamlit.testing.v1 import AppTest

import quillgpt.checkpoint as checkpoint
from quillgpt.checkpoint import LoadedModel, load_model, save_model
from quillgpt.data import default_prompt
from quillgpt.generate import generate
from quillgpt.model import GPT
from quillgpt.playground import launch, page
from quillgpt.playground.api import ApiBackend
from quillgpt.playground.backend import (
    TOP_ALTERNATIVES,
    BackendError,
    BackgroundStream,
    Chunk,
    TokenView,
    default_first,
    provenance_facts,
)
from quillgpt.playground.launch import PAGE
from quillgpt.playground.local import LocalBackend, decode_threads, token_chunks
from quillgpt.playground.output import Result
from quillgpt.playground.settings import PlaygroundSettings, parse_stop_strings, read_settings
from quillgpt.playground.view import LiveView, prob_class, render_tokens
from quillgpt.sampling import SamplingParams
from quillgpt.tokenizer import BPETokenizer
from tests.conftest import PAGE_SCRIPT, REPO, tiny_config


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """No bundled models, no runs, no settings from the environment or pytest's own arguments."""
    monkeypatch.setattr(checkpoint, "REPO_MODELS_DIR", tmp_path / "no-bundled-models")
    monkeypatch.delenv("QUILL_MODELS_DIR", raising=False)
    monkeypatch.delenv("QUILL_PLAYGROUND_MODELS", raising=False)
    monkeypatch.delenv("QUILL_API_URL", raising=False)
    monkeypatch.setenv("QUILL_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setattr("sys.argv", [str(PAGE)])


def app(monkeypatch, models: list[Path | str] = (), api_url: str | None = None) -> AppTest:
    if models:
        monkeypatch.setenv("QUILL_PLAYGROUND_MODELS", ":".join(str(m) for m in models))
    if api_url:
        monkeypatch.setenv("QUILL_API_URL", api_url)
    return AppTest.from_string(PAGE_SCRIPT, default_timeout=30).run()


def errors(at: AppTest) -> list[str]:
    return [e.value for e in at.error]


def generated(at: AppTest, side: str = "a") -> Result:
    return at.session_state[f"result_{side}"]


def noisy_model(tokenizer) -> GPT:
    """Random weights large enough that sampling does not collapse to one repeated token."""
    torch.manual_seed(1)
    model = GPT(tiny_config(vocab_size=tokenizer.vocab_size, block_size=24, tie_embeddings=False)).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return model


# --- the page ---------------------------------------------------------------------------------------


def test_widgets_present(monkeypatch, tiny_model_dir):
    at = app(monkeypatch, [tiny_model_dir])
    assert not at.exception and not errors(at)
    assert at.selectbox(key="model_a").value == str(tiny_model_dir)
    for key in ("temperature_a", "top_k_a", "top_p_a", "max_new_tokens_a", "repetition_penalty_a"):
        assert at.number_input(key=key) is not None
    assert at.text_input(key="seed_a").value == ""
    assert at.text_area(key="stop_a") is not None
    assert at.text_area(key="prompt").value == ""  # no default prompt for this model
    assert at.button(key="generate").label == "Generate"
    assert at.button(key="stop").label == "Stop"
    assert not at.toggle(key="compare").value
    # the card: parameters and facts in the sidebar
    assert any(m.label == "Parameters" for m in at.sidebar.metric)
    assert any("Tokenizer" in m.value for m in at.sidebar.markdown)


def test_generate_streams_coloured_tokens(monkeypatch, tiny_model_dir):
    at = app(monkeypatch, [tiny_model_dir])
    at.text_area(key="prompt").input("First")
    at.number_input(key="max_new_tokens_a").set_value(24)
    at.text_input(key="seed_a").input("7")
    at.button(key="generate").click().run()
    assert not at.exception and not errors(at)
    res = generated(at)
    assert res.status == "done" and res.finish_reason == "length"
    assert len(res.tokens) == 24 and res.text == "".join(t.text for t in res.tokens)
    assert all(0 < t.prob <= 1 and len(t.top) == TOP_ALTERNATIVES for t in res.tokens)
    html = "".join(h.value for h in at.html)
    assert html.count('class="quill-tok ') == 24 and "First" in html
    assert any("finished" in c.value for c in at.caption)
    # the same seed through quillgpt.generate gives the same text (the page's defaults and weights)
    loaded = checkpoint.load_model(tiny_model_dir, weights="auto")
    params = SamplingParams(max_new_tokens=24, seed=7)
    assert res.text == generate(loaded.model, loaded.tokenizer, "First", params)[0].text


def inspector_rows(at: AppTest) -> list[tuple[str, float]]:
    """The token inspector's table: (the alternative as shown, its probability in %)."""
    table = next(h.value for h in at.html if '<table class="quill-alternatives"' in h.value)
    rows = re.findall(r'<tr><td><code>(.*?)</code></td><td class="quill-p">([0-9.]+)%</td>', table)
    return [(html.unescape(a), float(p)) for a, p in rows]


def test_the_token_inspector_shows_the_models_own_alternatives_for_the_chosen_token(monkeypatch, tiny_model_dir):
    at = app(monkeypatch, [tiny_model_dir])
    at.text_area(key="prompt").input("First")
    at.number_input(key="max_new_tokens_a").set_value(8)
    at.text_input(key="seed_a").input("3")
    at.button(key="generate").click().run()
    res = generated(at)
    loaded = checkpoint.load_model(tiny_model_dir, weights="auto")
    ids = loaded.tokenizer.encode("First" + res.text)
    with torch.no_grad():
        logits, _ = loaded.model(torch.tensor([ids]))
    probs = torch.softmax(logits[0].float(), dim=-1)
    prompt_len = len(loaded.tokenizer.encode("First"))
    assert not any('<table class="quill-alternatives"' in h.value for h in at.html)  # drawn once asked for
    at.toggle(key="inspecting_a").set_value(True).run()
    for i in (0, 5):  # the first token, shown after generating, then another chosen in the inspector
        if i:
            at.selectbox(key="inspect_a").select(i).run()
        p, top = probs[prompt_len - 1 + i].topk(TOP_ALTERNATIVES)
        expected = [(repr(loaded.tokenizer.decode([t])), 100 * v) for t, v in zip(top.tolist(), p.tolist())]
        shown = inspector_rows(at)
        assert [a for a, _ in shown] == [a for a, _ in expected]
        assert [v for _, v in shown] == pytest.approx([v for _, v in expected], abs=0.051)
    assert not at.dataframe  # a plain table: no data grid for the browser to load with every result


def test_stop_string_ends_text(monkeypatch, tiny_model_dir):
    at = app(monkeypatch, [tiny_model_dir])
    at.text_area(key="prompt").input("First")
    at.number_input(key="temperature_a").set_value(0.0)
    at.button(key="generate").click().run()
    first = generated(at).text
    stop = first[5:7]
    at.text_area(key="stop_a").input(stop)
    at.button(key="generate").click().run()
    res = generated(at)
    assert res.finish_reason == "stop" and res.text == first[: first.index(stop)]
    html = "".join(h.value for h in at.html)
    assert html.count('class="quill-tok ') == len(res.text)  # the stop string's tokens are not shown
    # stopped before the first character: the finished view is the prompt alone, its cursor gone
    at.text_area(key="stop_a").input(first[:1])
    at.button(key="generate").click().run()
    assert generated(at).text == "" and not at.exception and not errors(at)
    values = [h.value for h in at.html]
    legend = next(i for i, v in enumerate(values) if "quill-legend" in v)
    assert 'class="quill-tok' not in "".join(values)
    assert 'class="quill-cursor"' in values[legend - 2]  # the prompt, as it streamed in
    assert 'class="quill-cursor"' not in values[legend - 1]  # the last piece: the CSS hides every cursor before it


def test_shakespeare_default_prompt_and_prompt_outside_vocabulary(monkeypatch, tmp_path, tiny_model, char_tokenizer):
    directory = save_model(tmp_path / "tiny", tiny_model, char_tokenizer, provenance={"data": "tinyshakespeare"})
    at = app(monkeypatch, [directory])
    assert at.text_area(key="prompt").value == "ROMEO:"
    at.button(key="generate").click().run()  # the tiny vocabulary has no R, O, M or E
    assert not at.exception
    assert any("does not fit this model's vocabulary" in e for e in errors(at))


@pytest.mark.parametrize(
    "widget, key, value, message",
    [
        ("number_input", "top_p_a", 0.0, "top_p must be in [1e-06, 1]"),
        ("number_input", "repetition_penalty_a", 0.0, "repetition_penalty must be in [0.01, 10]"),
        ("text_input", "seed_a", "abc", "seed must be a whole number"),
    ],
)
def test_bad_settings_show_a_message(monkeypatch, tiny_model_dir, widget, key, value, message):
    at = app(monkeypatch, [tiny_model_dir])
    w = getattr(at, widget)(key=key)
    (w.set_value(value) if widget == "number_input" else w.input(value)).run()
    assert not at.exception
    assert any(message in e for e in errors(at))
    at.button(key="generate").click().run()
    assert any("Fix the problems above" in e for e in errors(at))
    assert "result_a" not in at.session_state and "generation" not in at.session_state
    assert not streams_alive()  # nothing was started


def streams_alive() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "quill-stream" and t.is_alive()]


def test_the_click_starts_the_model_before_the_page_is_drawn(monkeypatch, tiny_model_dir):
    """Generate's callback starts the generation when the click reaches the server; the page, drawn
    after it, receives it under way and shows the same result to its end."""
    at = app(monkeypatch, [tiny_model_dir])
    at.number_input(key="max_new_tokens_a").set_value(12)
    at.text_input(key="seed_a").input("5")
    seen = []
    drawn = page.page
    monkeypatch.setattr(
        page, "page", lambda settings, generation=None: (seen.append(generation), drawn(settings, generation))
    )
    at.button(key="generate").click().run()
    assert not at.exception and not errors(at)
    (generation,) = seen  # the click's run, its page handed what the callback started
    assert generation is not None and set(generation.streams) == {"a"}
    assert generation.results["a"] is generated(at) and generated(at).status == "done"
    assert len(generated(at).tokens) == 12 and generated(at).settings == "temperature 1 · seed 5"
    at.run()  # a run without a click starts nothing
    assert seen[-1] is None and generated(at).status == "done"


def test_a_run_that_fails_before_drawing_the_generation_stops_it(monkeypatch, tiny_model_dir):
    """What the click's callback started is stopped when the page's run ends without drawing it (an
    error, or another click interrupting it): no thread is left decoding for nobody."""
    at = app(monkeypatch, [tiny_model_dir])
    at.number_input(key="max_new_tokens_a").set_value(5000)  # seconds of decoding for the tiny model

    def fail(*args, **kwargs):
        raise RuntimeError("the page broke")

    monkeypatch.setattr(page, "prompt_box", fail)
    at.button(key="generate").click().run()
    assert any("the page broke" in e for e in errors(at))
    assert not streams_alive()


def test_both_ways_of_starting_the_page_turn_off_streamlits_collection_after_each_run():
    """`quill playground`'s flag and the repository's .streamlit/config.toml (read by `streamlit run
    app.py`) agree: no full garbage collection holding the server after every run of the page."""
    assert "--runner.postScriptGC=false" in launch.streamlit_command([])
    code = "from streamlit import config; print(config.get_option('runner.postScriptGC'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO / "docs", capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"  # Streamlit's own default, elsewhere: the file above is what changes it


def test_missing_model_shows_a_message(monkeypatch, tmp_path):
    at = app(monkeypatch, [tmp_path / "no-such-model"])
    assert not at.exception
    (message,) = errors(at)
    assert "Cannot load model" in message and "no-such-model" in message


def test_no_model_explains_how_to_add_one(monkeypatch, tiny_model_dir):
    at = app(monkeypatch)
    assert not at.exception and not errors(at)
    assert "No model to run yet" in at.info[0].value
    at.text_input(key="new_model_dir").input(str(tiny_model_dir))
    at.sidebar.button[0].click().run()
    assert at.selectbox(key="model_a").value == str(tiny_model_dir)


def test_compare_mode_runs_two_settings_side_by_side(monkeypatch, tiny_model_dir):
    at = app(monkeypatch, [tiny_model_dir])
    at.toggle(key="compare").set_value(True).run()
    assert at.selectbox(key="model_b").value == str(tiny_model_dir)
    at.text_area(key="prompt").input("First")
    at.number_input(key="temperature_a").set_value(0.0)
    at.number_input(key="max_new_tokens_a").set_value(10)
    at.number_input(key="max_new_tokens_b").set_value(15)
    at.text_input(key="seed_b").input("3")
    at.button(key="generate").click().run()
    assert not at.exception and not errors(at)
    a, b = generated(at, "a"), generated(at, "b")
    assert (len(a.tokens), len(b.tokens)) == (10, 15)
    assert a.settings == "greedy" and b.settings == "temperature 1 · seed 3"  # the one default (LIMITS)


def test_interrupted_generation_is_kept_as_stopped(monkeypatch, tiny_model_dir):
    at = app(monkeypatch, [tiny_model_dir])
    at.session_state["result_a"] = Result(str(tiny_model_dir), "Fi", "greedy", "rst", [TokenView("rst", 0.5)])
    at.button(key="stop").click().run()
    assert generated(at).status == "stopped"
    assert any("Stopped" in i.value for i in at.info)


def test_unreachable_api_shows_a_message(monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    at = app(monkeypatch, api_url=f"http://127.0.0.1:{port}")
    assert not at.exception
    (message,) = errors(at)
    assert "Cannot reach the QuillGPT API" in message and str(port) in message


# --- the API backend against a fake OpenAI-compatible server ---------------------------------------


def fake_server(requests: list[dict], url: str = "http://localhost:8080") -> httpx.Client:
    """An httpx client whose requests a fake OpenAI-compatible QuillGPT server answers."""

    def chunk(text, lp, top, finish=None):
        logprobs = {"tokens": [text], "token_logprobs": [lp], "top_logprobs": [top], "text_offset": [0]}
        choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}
        return f"data: {json.dumps({'object': 'text_completion', 'choices': [choice]})}\n\n"

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            card = {
                "id": "shakespeare-char",
                "object": "model",
                "parameters": 10_000_000,
                "context_length": 256,
                "vocab_size": 65,
                "tokenizer": "char",
                "provenance": {"dataset": "tinyshakespeare", "val_loss": 1.47},
            }
            return httpx.Response(200, json={"object": "list", "data": [card]})
        body = json.loads(request.content)
        requests.append(body)
        if body["model"] != "shakespeare-char":
            return httpx.Response(404, json={"error": {"message": f"model {body['model']!r} not found"}})
        sse = chunk("Hi", -0.1, {"Hi": -0.1, "Ho": -2.5}) + chunk(" <b>", -1.2, {" <b>": -1.2}, "length")
        return httpx.Response(200, text=sse + "data: [DONE]\n\n", headers={"content-type": "text/event-stream"})

    return httpx.Client(base_url=url, transport=httpx.MockTransport(handle))


def test_api_backend_streams_text_and_logprobs():
    sent: list[dict] = []
    backend = ApiBackend("localhost:8080/v1/", client=fake_server(sent))
    assert backend.url == "http://localhost:8080"
    assert backend.models() == ["shakespeare-char"]
    card = backend.card("shakespeare-char")
    assert card.parameters == 10_000_000 and card.default_prompt == "ROMEO:"
    assert card.facts == {
        "Training data": "tinyshakespeare",
        "Val loss": "1.4700 nats/token",
        "Tokenizer": "char, 65 tokens",
        "Context": "256 tokens",
    }
    params = SamplingParams(max_new_tokens=2, top_k=5, repetition_penalty=1.2, stop=("\n\n",), seed=1)
    chunks = list(backend.stream("shakespeare-char", "ROMEO:", params))
    assert "".join(c.text for c in chunks) == "Hi <b>" and chunks[-1].finish_reason == "length"
    first = chunks[0].tokens[0]
    assert first.text == "Hi" and first.prob == pytest.approx(0.905, abs=1e-3) and first.top[1][0] == "Ho"
    assert sent[0] == {
        "model": "shakespeare-char", "prompt": "ROMEO:", "max_tokens": 2, "temperature": 1.0, "top_p": 1.0,
        "stream": True, "logprobs": 5, "stop": ["\n\n"], "seed": 1, "top_k": 5, "repetition_penalty": 1.2,
    }  # fmt: skip
    with pytest.raises(BackendError, match="404: model 'nope' not found"):
        list(backend.stream("nope", "x", params))


def test_page_in_api_mode(monkeypatch):
    client = fake_server([], "http://quill.test")
    monkeypatch.setattr(page, "_api_backend", lambda url: ApiBackend(url, client=client))
    at = app(monkeypatch, api_url="http://quill.test")
    assert not at.exception and not errors(at)
    assert at.text_area(key="prompt").value == "ROMEO:"
    at.button(key="generate").click().run()
    assert generated(at).text == "Hi <b>"
    html = "".join(h.value for h in at.html)
    assert " &lt;b&gt;" in html and "<b>" not in html


def test_api_backend_against_quill_serve(tiny_model, char_tokenizer):
    """The real server, in-process: the API backend streams what the local one would."""
    serve_app = pytest.importorskip("quillgpt.serve.app")
    from fastapi.testclient import TestClient

    loaded = LoadedModel(
        tiny_model, char_tokenizer, Path("tiny"), provenance={"steps": 3, "dataset": "tinyshakespeare"}
    )
    params = SamplingParams(max_new_tokens=20, temperature=0.9, top_k=8, repetition_penalty=1.3, seed=5)
    local = list(LocalBackend(["tiny"], loader=lambda name: loaded).stream("tiny", "First", params))
    with TestClient(serve_app.create_app(models={"tiny": loaded})) as client:
        backend = ApiBackend("http://testserver", client=client)
        assert backend.models() == ["tiny"]
        card = backend.card("tiny")
        assert card.parameters == tiny_model.num_params() and card.default_prompt == "ROMEO:"
        remote = list(backend.stream("tiny", "First", params))
        with pytest.raises(BackendError, match="vocabulary"):
            list(backend.stream("tiny", "First ü", params))
    text = "".join(c.text for c in local)
    assert "".join(c.text for c in remote) == text and len(text) == 20
    local_tokens = [t for c in local for t in c.tokens]
    remote_tokens = [t for c in remote for t in c.tokens]
    assert [t.text for t in remote_tokens] == [t.text for t in local_tokens]
    assert [t.prob for t in remote_tokens] == pytest.approx([t.prob for t in local_tokens], rel=1e-4)
    (r_alts, r_probs), (l_alts, l_probs) = zip(*remote_tokens[3].top), zip(*local_tokens[3].top)
    assert r_alts == l_alts and r_probs == pytest.approx(l_probs, rel=1e-4)


# --- pieces -----------------------------------------------------------------------------------------


def test_a_tokens_shade_runs_from_p0_to_p20():
    assert [prob_class(p) for p in (0.0, 0.024, 0.5, 0.99, 1.0)] == ["p0", "p0", "p10", "p20", "p20"]
    assert prob_class(-0.1) == "p0" and prob_class(1.5) == "p20" and prob_class(float("nan")) == "p0"


def test_render_tokens_escapes_and_trims_to_the_text():
    tokens = [TokenView("<a", 0.9, [("<a", 0.9), ('"', 0.05)]), TokenView("\n", 0.2), TokenView("STOP", 0.5)]
    out = render_tokens("<p>", "<a\n", tokens)
    assert out.count('class="quill-tok ') == 2 and "STOP" not in out
    assert "&lt;p&gt;" in out and "&lt;a" in out and "<a" not in out and "<p>" not in out
    assert "&quot;" in out  # an alternative's quote inside the tooltip attribute
    # the first token: its shade (0.9 of the way to certain), its own line and its alternatives' lines
    assert out.count('<span class="quill-tok p18" tabindex="0" data-tip="\'&lt;a\'  90.0%" '
                     'data-top="\'&lt;a\'  90.0%\n  \'&quot;\'  5.0%">&lt;a</span>') == 1  # fmt: skip
    assert "↵" in out


def test_parse_stop_strings():
    assert parse_stop_strings("\\n\\n\nTHE END\n\n a\\\\b ") == ("\n\n", "THE END", " a\\b ")


def test_read_settings_from_arguments_then_environment():
    env = {"QUILL_PLAYGROUND_MODELS": "a:b", "QUILL_API_URL": "http://x"}
    assert read_settings([], env) == PlaygroundSettings(["a", "b"], "http://x")
    args = ["--model", "m1", "--model", "m2", "--api-url", "http://y", "--other"]
    assert read_settings(args, env) == PlaygroundSettings(["m1", "m2"], "http://y")


def test_default_prompt_comes_from_the_model_or_its_dataset(tiny_model_dir):
    assert default_prompt({"data": "tinyshakespeare"}) == "ROMEO:"
    assert default_prompt({"data": "../shared/data/tinyshakespeare/input.txt"}) == "ROMEO:"
    assert default_prompt({"data": "gutenberg", "default_prompt": "It was"}) == "It was"
    assert default_prompt({"data": "my.txt"}) == default_prompt({}) == ""
    assert LocalBackend([str(tiny_model_dir)]).card(str(tiny_model_dir)).default_prompt == ""
    config = json.loads((tiny_model_dir / "config.json").read_text())
    config["default_prompt"] = "Call me Ishmael."  # a shipped model declares its own, beside its weights
    (tiny_model_dir / "config.json").write_text(json.dumps(config))
    assert LocalBackend([str(tiny_model_dir)]).card(str(tiny_model_dir)).default_prompt == "Call me Ishmael."
    assert default_prompt(load_model(REPO / "models" / "shakespeare-char").info) == "ROMEO:"


def test_local_backend_card(tiny_model_dir, tiny_model):
    (tiny_model_dir / "README.md").write_text("# tiny\n")
    card = LocalBackend([str(tiny_model_dir)]).card(str(tiny_model_dir))
    assert card.parameters == tiny_model.num_params() and card.description == "# tiny\n"
    assert card.facts["Training steps"] == "0" and card.loss_curve is None


def test_launch_runs_streamlit_headless(monkeypatch, capsys, tiny_model_dir):
    seen = {}

    class FakePopen:
        def __init__(self, cmd):
            seen["cmd"] = cmd

        def wait(self):
            return 0

    monkeypatch.setattr(subprocess, "Popen", FakePopen)
    assert launch.launch([str(tiny_model_dir), "shakespeare-char"], "http://api", "0.0.0.0", 8123) == 0
    cmd = seen["cmd"]
    assert cmd[1:4] == ["-m", "streamlit", "run"] and cmd[4].endswith("playground/server.py")
    assert {"--server.headless=true", "--server.address=0.0.0.0", "--server.port=8123"} <= set(cmd)
    assert cmd[cmd.index("--") :] == [
        "--", "--model", str(tiny_model_dir), "--model", "shakespeare-char", "--api-url", "http://api"
    ]  # fmt: skip
    assert "http://localhost:8123" in capsys.readouterr().out


def test_launcher_does_not_import_streamlit():
    """`quill playground` only starts a subprocess: the CLI must not pay for importing Streamlit."""
    code = (
        "import sys; from quillgpt import cli; from quillgpt.playground.launch import launch; "
        "cli.build_parser(); print(sorted(m for m in sys.modules if m.split('.')[0] == 'streamlit'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_card_prefers_the_whole_split_val_loss():
    facts = provenance_facts({"val_loss": 1.4918, "val_loss_full_split": 1.4667})
    assert facts["Val loss"] == "1.4667 nats/token (whole split)"
    assert provenance_facts({"val_loss": 1.4918})["Val loss"] == "1.4918 nats/token"
    assert "Val bits per byte" not in facts


def test_bpe_card_shows_bits_per_byte_beside_nats_per_token():
    """Bits per byte compares models across tokenizers; the bundled BPE model, Harpoon, records it."""
    harpoon = REPO / "models" / "harpoon"
    if not harpoon.is_dir():
        pytest.skip("the bundled BPE model (models/harpoon) is not in this checkout")
    config = checkpoint.read_model_config(harpoon)
    assert config["tokenizer"]["type"] == "bpe"
    prov = config["provenance"]
    facts = provenance_facts(prov)
    assert facts["Val loss"] == f"{prov['val_loss_full_split']:.4f} nats/token (whole split)"
    assert facts["Val bits per byte"] == f"{prov['val_bits_per_byte']:.4f}"


def test_bundled_models_open_on_shakespeare_char(monkeypatch, tmp_path):
    """Bundled models sort by name (harpoon first); the page's list starts with the default one."""
    for name in ("harpoon", "shakespeare-char", "shakespeare-speedrun"):
        (tmp_path / "models" / name).mkdir(parents=True)
        (tmp_path / "models" / name / "config.json").write_text("{}")
    monkeypatch.setattr(checkpoint, "REPO_MODELS_DIR", tmp_path / "models")
    assert list(checkpoint.bundled_models())[0] == "harpoon"
    assert LocalBackend().models() == ["shakespeare-char", "shakespeare-speedrun", "harpoon"]
    assert LocalBackend(["my-model"]).models()[:2] == ["my-model", "shakespeare-char"]  # named models first
    assert default_first(["harpoon", "x", "shakespeare-char"]) == ["shakespeare-char", "harpoon", "x"]


# --- the local backend's token stream ---------------------------------------------------------


def test_token_chunks_are_generate_with_each_tokens_probability(char_tokenizer):
    model = noisy_model(char_tokenizer)
    unstopped = generate(model, char_tokenizer, "All:", SamplingParams(max_new_tokens=40, temperature=0.9, seed=3))
    stop = unstopped[0].text[20]  # a character this seed generates, so the stop string is met
    params = SamplingParams(max_new_tokens=40, temperature=0.9, seed=3, stop=(stop,))
    (c,) = generate(model, char_tokenizer, "All:", SamplingParams(**{**vars(params), "logprobs": 3}))
    chunks = list(token_chunks(model, char_tokenizer, "All:", params, alternatives=3))
    assert "".join(p.text for p in chunks) == c.text and c.finish_reason == "stop"
    assert [p.finish_reason for p in chunks] == [None] * (len(chunks) - 1) + ["stop"]
    tokens = [t for p in chunks for t in p.tokens]  # every generated token, the stop string's included
    assert [t.text for t in tokens] == [char_tokenizer.decode([i]) for i in c.tokens]
    assert [t.prob for t in tokens] == pytest.approx([math.exp(lp.logprob) for lp in c.logprobs])
    for t, lp in zip(tokens, c.logprobs):
        assert [a for a, _ in t.top] == [char_tokenizer.decode([i]) for i, _ in lp.top]
        assert [p for _, p in t.top] == pytest.approx([math.exp(v) for _, v in lp.top])
    with pytest.raises(ValueError, match="not in the model's vocabulary"):
        token_chunks(model, char_tokenizer, "Zebra", params)  # at once, not at the first piece


def test_token_chunks_join_the_tokens_of_one_character():
    tok = BPETokenizer.train(["ascii only words here"], vocab_size=260)
    torch.manual_seed(0)
    model = GPT(tiny_config(vocab_size=tok.vocab_size, block_size=64)).eval()
    params = SamplingParams(max_new_tokens=40, seed=1)
    (c,) = generate(model, tok, "é", SamplingParams(max_new_tokens=40, seed=1, logprobs=0))
    tokens = [t for p in token_chunks(model, tok, "é", params, alternatives=0) for t in p.tokens]
    assert "".join(t.text for t in tokens) == c.text
    assert len(tokens) < len(c.tokens)  # some tokens were parts of one UTF-8 character
    assert math.prod(t.prob for t in tokens) == pytest.approx(math.exp(sum(lp.logprob for lp in c.logprobs)))


def test_local_stream_decodes_with_a_core_left_and_restores_the_threads(tiny_model_dir):
    """Beside a browser the model decodes with fewer threads than cores; the caller's count comes back."""
    before = torch.get_num_threads()
    out = list(LocalBackend().stream(str(tiny_model_dir), "First", SamplingParams(max_new_tokens=5, seed=1)))
    assert sum(len(c.tokens) for c in out) == 5 and out[-1].finish_reason == "length"
    assert torch.get_num_threads() == before
    assert 1 <= decode_threads() <= before
    assert decode_threads() < len(os.sched_getaffinity(0)) or len(os.sched_getaffinity(0)) == 1
    stream = LocalBackend.run(iter([Chunk("a")]))
    assert next(stream).text == "a" and torch.get_num_threads() == decode_threads()
    stream.close()
    assert torch.get_num_threads() == before


def test_background_stream_hands_over_chunks_then_the_error():
    def chunks():
        yield Chunk("a", [TokenView("a", 0.5)])
        yield Chunk("b")
        raise BackendError("the API went away")

    stream = BackgroundStream(chunks())
    got = []
    with pytest.raises(BackendError, match="went away"):
        while not stream.done:
            stream.wake.wait(1)
            stream.wake.clear()
            got += stream.take()
    assert [c.text for c in got] == ["a", "b"]


def test_background_stream_is_done_with_its_last_chunks():
    # The page must not wait another redraw interval to learn that the stream it emptied has ended.
    stream = BackgroundStream(iter([Chunk("a"), Chunk("b", finish_reason="length")]))
    stream._thread.join(5)
    assert [c.text for c in stream.take()] == ["a", "b"] and stream.done


def test_background_stream_closes_a_long_stream_in_its_own_thread():
    closed_in = []

    def chunks():
        try:
            while True:
                yield Chunk("x")
        finally:
            closed_in.append(threading.current_thread().name)

    stream = BackgroundStream(chunks())
    stream.wake.wait(1)
    stream.close()
    assert closed_in == ["quill-stream"] and stream.take() and not stream._thread.is_alive()


def test_live_view_sends_each_token_once_and_holds_back_unshown_text():
    tokens = [TokenView("Hi", 0.9), TokenView(" <", 0.2), TokenView("b>", 0.5)]
    view = LiveView()
    first = view.update("Hi", tokens[:2])  # " <" is generated but held back (a stop string may start)
    assert first.count('class="quill-tok ') == 1 and "Hi" in first
    assert view.update("Hi", tokens[:2]) == ""
    rest = view.update("Hi <b>", tokens)
    assert rest.count('class="quill-tok ') == 2 and "&lt;" in rest and "b&gt;</span>" in rest
    assert view.finish("Hi <b>", tokens) == ""
    assert render_tokens("", "Hi <b>", tokens) == (
        '<div class="quill-output"><span class="quill-prompt"></span>' + first + rest + "</div>"
    )


@pytest.mark.parametrize(
    "text, cut",
    [
        ("Hi there", None),  # every token shown
        ("Hi the", 2),  # a stop string began inside the third token: it is cut where the text ends
        ("Hi there!!", None),  # text no token covers (a flushed tail) comes after the tokens
    ],
)
def test_live_view_pieces_and_finish_draw_what_render_tokens_draws(text, cut):
    tokens = [TokenView("Hi", 0.9, [("Ho", 0.05)]), TokenView(" th", 0.4), TokenView("ere", 0.7)]
    view = LiveView()
    pieces = [view.update(text[:1], tokens[:1]), view.update(text[:4], tokens[:2]), view.finish(text, tokens)]
    assert "".join(pieces) == render_tokens("", text, tokens).removeprefix(
        '<div class="quill-output"><span class="quill-prompt"></span>'
    ).removesuffix("</div>")
    if cut is not None:
        assert pieces[-1].endswith('<span class="quill-tok p14" tabindex="0" data-tip="\'ere\'  70.0%">e</span>')


def test_a_generation_over_the_route_is_taken_into_the_session(monkeypatch, tiny_model_dir):
    """What the page's script does in a browser (live.js): post the page's fields with the ticket the
    page drew to the route, read the lines, then click the hidden sync button. That run takes the
    result into the session and draws it whole, in the container the script knows it by."""
    from starlette.applications import Starlette
    from starlette.testclient import TestClient

    from quillgpt.playground import live
    from quillgpt.playground.output import model_label

    at = app(monkeypatch, [tiny_model_dir])
    session = at.session_state["live"]
    anchors = [e.proto.body for e in at.get("html") if 'class="quill-live"' in e.proto.body]
    assert anchors == [session.anchor("a")] and session.ticket in anchors[0] and 'data-ready="1"' in anchors[0]
    fields = {name: str(at.session_state[f"{name}_a"]) for name in ("temperature", "top_k", "top_p", "seed", "stop")}
    fields |= {"max_new_tokens": "9", "repetition_penalty": "1.0", "model": model_label(str(tiny_model_dir))}
    with TestClient(Starlette(routes=live.ROUTES)) as client:
        r = client.post(live.GENERATE_PATH, json={"ticket": session.ticket, "prompt": "First", "sides": {"a": fields}})
    first, *_, end = (json.loads(line) for line in r.text.splitlines())
    assert end["end"] == "done" and end["tokens"] == 9
    assert "result_a" not in at.session_state  # not until the page runs again
    at.button(key="quill_sync").click().run()
    assert not at.exception and not errors(at)
    assert generated(at).key == first["key"] and generated(at).prompt == "First" and len(generated(at).tokens) == 9
    assert any(c.value == end["status"] for c in at.caption)  # the status line the script showed, drawn whole
    assert at.get("html") and any(f"quill_result_a_{first['key']}" in str(b.proto) for b in at.get("flex_container"))
    at.run()
    assert generated(at).key == first["key"]  # taken once: later runs keep it
