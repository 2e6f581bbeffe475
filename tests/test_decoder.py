"""The id-level decoder: cache and no cache agree, batching changes no output, the context window."""

import pytest
import torch

from quillgpt.decoder import ContextWindow, Decoder, SequenceState, padded_groups
from quillgpt.generate import generate
from quillgpt.model import GPT
from quillgpt.sampling import SamplingParams
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


def test_long_prompt_keeps_the_last_block_size_tokens(char_tokenizer):
    model = noisy_model(char_tokenizer)
    long_prompt = "Speak, speak. " * 10
    params = SamplingParams(max_new_tokens=10, temperature=0)
    (c,) = generate(model, char_tokenizer, long_prompt, params)
    (tail,) = generate(model, char_tokenizer, long_prompt[-24:], params)
    assert c.prompt_truncated and c.tokens == tail.tokens


def test_a_sequence_moved_to_another_decoder_carries_on_where_it_was(char_tokenizer):
    """What the server's engine does after a failed step: a sequence leaves one decoder mid-flight,
    past a slid window and with a truncated prompt, and joins another. Its window and flags are kept
    (the decoder never rewrites them on joining), and its output equals the undisturbed run's."""
    model = noisy_model(char_tokenizer)
    long_prompt = char_tokenizer.encode("Speak, speak. " * 3)  # 42 tokens, past the 24-token window
    for params in (SamplingParams(max_new_tokens=40, temperature=0), SamplingParams(max_new_tokens=40, seed=3)):
        (expected,) = generate(model, char_tokenizer, "Speak, speak. " * 3, params)
        seq = SequenceState(long_prompt, params)
        first, second = Decoder(model, max_batch=2), Decoder(model, max_batch=1)
        first.add(seq)
        assert seq.prompt_truncated and seq.start == len(long_prompt) - 24
        for _ in range(15):  # the window slides during these steps
            first.step()
        first.remove(seq)
        start = seq.start
        assert start > len(long_prompt) - 24
        second.add(seq)
        assert seq.start == start and seq.prompt_truncated
        while second.active:
            second.step()
        assert seq.generated == expected.tokens


def test_the_context_window_keeps_the_prompts_tail_then_slides_to_keep_three_quarters():
    window = ContextWindow.for_block(8)
    assert window.keep == 6
    seq = SequenceState(list(range(10)), SamplingParams())
    window.fit(seq)
    assert (seq.start, seq.prompt_truncated) == (2, True)
    window.fit(seq)  # fitting again changes nothing
    assert seq.start == 2
    seq.cached = 7
    seq.record(10)  # 9 tokens in the window: it slides, and the cache must be re-encoded
    window.fit(seq)
    assert (seq.start, seq.cached) == (5, 0) and seq.tokens[seq.start :] == [5, 6, 7, 8, 9, 10]
    short = SequenceState([1, 2, 3], SamplingParams())
    window.fit(short)
    assert (short.start, short.prompt_truncated) == (0, False)
