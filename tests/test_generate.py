import pytest
import torch

from quillgpt.generate import (
    Decoder,
    SequenceState,
    StopStrings,
    generate,
    padded_groups,
    stream,
)
from quillgpt.model import GPT
from quillgpt.sampling import SamplingError, SamplingParams, sample_next_token, sample_next_tokens
from quillgpt.tokenizer import BPETokenizer
from tests.conftest import tiny_config

PROMPTS = ["First Citizen:", "You are all resolved", "S", "Speak, speak.\n\nAll:\nBefore we proceed"]


def noisy_model(tokenizer, **overrides) -> GPT:
    """Random weights large enough that greedy decoding does not collapse to one repeated token."""
    torch.manual_seed(1)
    overrides.setdefault("tie_embeddings", False)  # tied random weights just copy the last token
    model = GPT(tiny_config(vocab_size=tokenizer.vocab_size, block_size=24, **overrides)).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return model


@pytest.mark.parametrize("variant", [{}, {"pos_emb": "rope", "norm": "rmsnorm", "qk_norm": True}])
def test_cache_and_no_cache_agree_past_the_context_window(char_tokenizer, variant):
    model = noisy_model(char_tokenizer, **variant)
    # 80 new tokens overflow the 24-token window several times. Random weights make greedy decoding
    # settle on one token, so seeded sampling checks the same thing on varied text.
    for params in (SamplingParams(max_new_tokens=80, temperature=0), SamplingParams(max_new_tokens=80, seed=5)):
        cached = generate(model, char_tokenizer, PROMPTS, params)
        uncached = generate(model, char_tokenizer, PROMPTS, params, use_cache=False)
        for a, b in zip(cached, uncached):
            assert a.tokens == b.tokens and len(a.tokens) == 80
    assert len(set(cached[0].tokens)) > 10


def test_batched_equals_one_at_a_time(char_tokenizer):
    model = noisy_model(char_tokenizer)
    for params in (SamplingParams(max_new_tokens=40, temperature=0), SamplingParams(max_new_tokens=40, seed=7)):
        batched = generate(model, char_tokenizer, PROMPTS, params)
        alone = [generate(model, char_tokenizer, p, params)[0] for p in PROMPTS]
        assert [c.tokens for c in batched] == [c.tokens for c in alone]


def test_prompts_that_join_together_share_one_prefill(char_tokenizer):
    """Neighbouring rows that start a window are encoded together, shorter ones padded at the end,
    unless padding would add more than half the real tokens; a row already decoding (or a one-token
    prompt) splits them. Outputs equal each prompt alone."""
    model = noisy_model(char_tokenizer)
    calls = []
    model.register_forward_hook(lambda module, args, output: calls.append(tuple(args[0].shape)))
    prompts = ["First Citizen:", "You are all resolved", "S", "Speak, speak.", "All:"]
    widths = [len(p) - 1 for p in prompts]  # all but each prompt's last token: 13, 19, 0, 12, 3
    assert padded_groups(widths[:2]) == [(0, 2)] and padded_groups(widths[3:]) == [(0, 1), (1, 2)]
    for params in (SamplingParams(max_new_tokens=12, temperature=0), SamplingParams(max_new_tokens=12, seed=2)):
        alone = [generate(model, char_tokenizer, p, params)[0].tokens for p in prompts]
        decoder = Decoder(model, max_batch=5)
        seqs = [SequenceState(char_tokenizer.encode(p), params) for p in prompts]
        for seq in seqs:
            decoder.add(seq)
        calls.clear()
        decoder.step()
        assert calls == [(2, 19), (1, 12), (1, 3), (5, 1)]  # rows 0-1 padded to 19; 3 and 4 apart; the decode step
        while decoder.active:
            decoder.step()
        assert [s.generated for s in seqs] == alone


def test_padded_groups_bound_the_padding():
    assert padded_groups([]) == []
    assert padded_groups([16] * 16) == [(0, 16)]  # a burst of equal prompts: one call
    assert padded_groups([200, 5, 5, 5]) == [(0, 1), (1, 4)]  # the long one alone
    assert padded_groups([10, 8, 12, 30, 25]) == [(0, 3), (3, 5)]
    for lengths in ([3, 1, 7, 2, 9, 9, 1], [1] * 5, [50, 1, 50]):
        groups = padded_groups(lengths)
        assert [i for i, _ in groups] == [0, *[j for _, j in groups[:-1]]] and groups[-1][1] == len(lengths)
        for i, j in groups:  # each run is one row, or pads at most half its real tokens
            assert j - i == 1 or max(lengths[i:j]) * (j - i) <= 1.5 * sum(lengths[i:j])


def test_continuous_batching_sequences_join_and_leave(char_tokenizer):
    model = noisy_model(char_tokenizer)
    greedy = SamplingParams(max_new_tokens=30, temperature=0)
    expected = [generate(model, char_tokenizer, p, greedy)[0].tokens for p in PROMPTS]
    decoder = Decoder(model, max_batch=3)
    seqs = [
        SequenceState(char_tokenizer.encode(p), SamplingParams(max_new_tokens=n, temperature=0))
        for p, n in zip(PROMPTS, (10, 30, 20, 30))
    ]
    decoder.add(seqs[0])
    decoder.add(seqs[1])
    for _ in range(5):
        decoder.step()
    decoder.add(seqs[2])  # joins mid-flight
    while len(decoder.active) == 3:
        decoder.step()
    decoder.add(seqs[3])  # takes the row the first one left
    while decoder.active:
        decoder.step()
    assert [s.generated for s in seqs] == [e[: len(s.generated)] for s, e in zip(seqs, expected)]
    assert [len(s.generated) for s in seqs] == [10, 30, 20, 30]


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


def test_long_prompt_keeps_the_last_block_size_tokens(char_tokenizer):
    model = noisy_model(char_tokenizer)
    long_prompt = "Speak, speak. " * 10
    params = SamplingParams(max_new_tokens=10, temperature=0)
    (c,) = generate(model, char_tokenizer, long_prompt, params)
    (tail,) = generate(model, char_tokenizer, long_prompt[-24:], params)
    assert c.prompt_truncated and c.tokens == tail.tokens


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
