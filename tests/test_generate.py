import pytest
import torch

from quillgpt.generate import StopStrings, generate, stream
from quillgpt.model import GPT
from quillgpt.sampling import SamplingError, SamplingParams, sample_next_token, sample_next_tokens
from quillgpt.tokenizer import BPETokenizer
from tests.conftest import tiny_config
from tests.test_decoder import noisy_model


def test_same_seed_same_output_different_seed_different_output(char_tokenizer):
    model = noisy_model(char_tokenizer)
    run = lambda seed: generate(model, char_tokenizer, "All:", SamplingParams(max_new_tokens=40, seed=seed))[0].text
    assert run(3) == run(3)
    assert run(3) != run(4)


def test_sampler_filters():
    logits = torch.tensor([0.0, 5.0, 4.0, 3.0, -2.0])
    g = torch.Generator().manual_seed(0)
    picks = lambda **kw: {sample_next_token(logits, SamplingParams(**kw), g) for _ in range(300)}
    assert picks(temperature=0) == {1}
    assert picks(top_k=2) == {1, 2}
    assert picks(top_p=0.5) == {1}  # token 1 alone holds ~66% of the mass
    assert picks(top_k=1, temperature=5.0) == {1}
    assert picks(temperature=100.0) == {0, 1, 2, 3, 4}


def test_penalties_change_the_choice():
    logits = torch.tensor([2.0, 1.9, 0.0])
    seen = torch.tensor([True, False, False])
    counts = torch.tensor([3.0, 0.0, 0.0])
    greedy = dict(temperature=0)
    assert sample_next_token(logits, SamplingParams(**greedy), None, seen, counts) == 0
    assert sample_next_token(logits, SamplingParams(repetition_penalty=1.3, **greedy), None, seen, counts) == 1
    assert sample_next_token(logits, SamplingParams(presence_penalty=0.5, **greedy), None, seen, counts) == 1
    assert sample_next_token(logits, SamplingParams(frequency_penalty=0.1, **greedy), None, seen, counts) == 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=-1), "temperature"),
        (dict(top_p=0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=0), "top_k"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(repetition_penalty=0), "repetition_penalty"),
        (dict(presence_penalty=3), "presence_penalty"),
        (dict(stop=[""]), "stop"),
        (dict(temperature=float("nan")), "temperature"),
    ],
)
def test_invalid_sampling_values(kwargs, message):
    with pytest.raises(SamplingError, match=message):
        SamplingParams(**kwargs)


def test_stop_strings_end_generation_and_are_not_emitted(char_tokenizer):
    model = noisy_model(char_tokenizer)
    free = generate(model, char_tokenizer, "All:", SamplingParams(max_new_tokens=60, temperature=0))[0].text
    stop = free[20:23]
    cut = free.index(stop)
    (done,) = generate(model, char_tokenizer, "All:", SamplingParams(max_new_tokens=60, temperature=0, stop=[stop]))
    assert done.text == free[:cut] and done.finish_reason == "stop"
    streamed = "".join(
        stream(model, char_tokenizer, "All:", SamplingParams(max_new_tokens=60, temperature=0, stop=[stop]))
    )
    assert streamed == free[:cut]


def test_stop_string_matcher_holds_back_partial_matches():
    s = StopStrings(["END", "xyz"])
    assert s.feed("abc E") == ("abc ", False)
    assert s.feed("N") == ("", False)
    assert s.feed("d.") == ("ENd.", False)
    assert s.feed(" then EN") == (" then ", False)
    assert s.feed("D more") == ("", True)


def test_empty_prompt_starts_from_newline(char_tokenizer, tiny_model):
    (c,) = generate(tiny_model, char_tokenizer, "", SamplingParams(max_new_tokens=5, temperature=0))
    assert c.prompt_tokens == 1 and len(c.tokens) == 5


def test_unknown_characters_in_prompt(char_tokenizer, tiny_model):
    with pytest.raises(ValueError, match="not in the model's vocabulary: 'Z'"):
        generate(tiny_model, char_tokenizer, "Zebra", SamplingParams(max_new_tokens=2))


def test_logprobs_are_the_models_own(char_tokenizer):
    model = noisy_model(char_tokenizer)
    (c,) = generate(model, char_tokenizer, "All:", SamplingParams(max_new_tokens=5, temperature=0, logprobs=3))
    ids = char_tokenizer.encode("All:") + c.tokens
    logits, _ = model(torch.tensor([ids]))
    logp = torch.log_softmax(logits[0], -1)
    for i, lp in enumerate(c.logprobs):
        pos = len(ids) - len(c.tokens) - 1 + i
        assert lp.token == c.tokens[i]
        assert abs(lp.logprob - logp[pos, lp.token].item()) < 1e-4
        assert lp.top[0][0] == lp.token  # greedy picks the most likely
        assert len(lp.top) == 3


def test_bpe_stream_yields_whole_characters():
    tok = BPETokenizer.train(["ascii only words here"], vocab_size=260)
    torch.manual_seed(0)
    model = GPT(tiny_config(vocab_size=tok.vocab_size, block_size=64)).eval()
    pieces = list(stream(model, tok, "é", SamplingParams(max_new_tokens=40, seed=1)))
    text = "".join(pieces)  # random bytes need not be valid UTF-8; pieces must still add up exactly
    assert len(pieces) > 1 and text == generate(model, tok, "é", SamplingParams(max_new_tokens=40, seed=1))[0].text


def test_batched_sampler_rows_equal_each_row_alone():
    torch.manual_seed(0)
    logits = torch.randn(6, 40) * 3
    settings = [
        SamplingParams(seed=1),
        SamplingParams(temperature=0.5, top_k=5, seed=2),
        SamplingParams(top_p=0.6, seed=3),
        SamplingParams(temperature=0),
        SamplingParams(repetition_penalty=1.5, presence_penalty=0.7, frequency_penalty=0.3, seed=4),
        SamplingParams(temperature=1.7, top_k=3, top_p=0.9, seed=5),
    ]
    seen = torch.rand(6, 40) < 0.3
    counts = torch.randint(0, 3, (6, 40)).float()
    for _ in range(20):
        batch_generators = [None if p.seed is None else torch.Generator().manual_seed(p.seed) for p in settings]
        alone_generators = [None if p.seed is None else torch.Generator().manual_seed(p.seed) for p in settings]
        batched = sample_next_tokens(logits, settings, batch_generators, seen, counts).tolist()
        alone = [
            sample_next_token(logits[i], p, alone_generators[i], seen[i], counts[i]) for i, p in enumerate(settings)
        ]
        assert batched == alone
        logits = torch.randn(6, 40) * 3


def test_sampler_never_returns_a_token_the_filters_removed():
    logits = torch.tensor([[0.0, 5.0, 4.0, 3.0, -2.0]] * 4)
    params = [SamplingParams(top_k=2), SamplingParams(top_p=0.5), SamplingParams(top_k=3, temperature=3.0)] * 1
    params.append(SamplingParams(temperature=1e-30))  # float32 underflows to 0: greedy in the limit
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        tokens = sample_next_tokens(logits, params, [g] * 4).tolist()
        assert tokens[0] in (1, 2) and tokens[1] == 1 and tokens[2] in (1, 2, 3) and tokens[3] == 1
