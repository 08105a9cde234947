import pytest
import torch

from nextbit.core.errors import NextbitError
from nextbit.core.generate import SamplingParams, filter_logits, generate

from conftest import peaky_model


@pytest.fixture(scope="module")
def model():
    return peaky_model()


def test_greedy_with_cache_equals_full_recomputation(model, tokenizer):
    prompts = [tokenizer.encode("def foo(x):\n    return"), tokenizer.encode("import os")]
    p = SamplingParams(max_new_tokens=40, temperature=0, stop_token_ids=[])
    fast = generate(model, tokenizer, prompts, p)
    slow = generate(model, tokenizer, prompts, p, use_cache=False)
    assert [c.tokens for c in fast.completions] == [c.tokens for c in slow.completions]
    assert torch.equal(fast.tokens, slow.tokens)
    assert len(set(fast.completions[0].tokens)) > 1


def test_batched_prompts_of_different_lengths_match_one_at_a_time(model, tokenizer):
    prompts = [tokenizer.encode("class A:\n    pass\n\n\nclass B(A):"), tokenizer.encode("x")]
    p = SamplingParams(max_new_tokens=25, temperature=0, stop_token_ids=[])
    together = generate(model, tokenizer, prompts, p).completions
    alone = [generate(model, tokenizer, [q], p).completions[0] for q in prompts]
    assert [c.tokens for c in together] == [c.tokens for c in alone]


def test_seed_makes_sampling_repeatable(model, tokenizer):
    prompts = [tokenizer.encode("def")] * 4
    p = SamplingParams(max_new_tokens=20, temperature=1.0, top_k=50, seed=123, stop_token_ids=[])
    a = generate(model, tokenizer, prompts, p).completions
    b = generate(model, tokenizer, prompts, p).completions
    assert [c.tokens for c in a] == [c.tokens for c in b]
    assert len({tuple(c.tokens) for c in a}) > 1  # rows of one batch differ


def test_stop_strings_and_tokens(model, tokenizer):
    p = SamplingParams(max_new_tokens=30, temperature=0, stop_token_ids=[])
    free = generate(model, tokenizer, [tokenizer.encode("def")], p).completions[0]
    assert free.finish_reason == "length" and len(free.tokens) == 30
    stop = free.text[5:8]
    p2 = SamplingParams(max_new_tokens=30, temperature=0, stop=[stop], stop_token_ids=[])
    c = generate(model, tokenizer, [tokenizer.encode("def")], p2).completions[0]
    assert c.finish_reason == "stop" and stop not in c.text and free.text.startswith(c.text)
    first = free.tokens[3]
    c2 = generate(model, tokenizer, [tokenizer.encode("def")], SamplingParams(30, 0, stop_token_ids=[first])).completions[0]
    assert c2.finish_reason == "stop" and c2.tokens[-1] == first and first not in c2.tokens[:-1]


def test_filters():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    k = filter_logits(logits, 1.0, 2, 1.0)
    assert torch.isinf(k[0, 2:]).all() and torch.isfinite(k[0, :2]).all()
    probs = logits.softmax(-1)[0]  # 0.636, 0.234, 0.086, ...
    p = filter_logits(logits, 1.0, 0, 0.8)
    assert torch.isfinite(p[0, :2]).all() and torch.isinf(p[0, 2:]).all()
    assert probs[0] < 0.8 < probs[0] + probs[1]
    t = filter_logits(logits, 0.5, 0, 1.0)
    assert torch.allclose(t, logits / 0.5)


def test_bad_inputs(model, tokenizer):
    with pytest.raises(NextbitError):
        generate(model, tokenizer, [[1] * 200], SamplingParams(5))
    with pytest.raises(NextbitError):
        generate(model, tokenizer, [[]], SamplingParams(5))
    with pytest.raises(NextbitError):
        generate(model, tokenizer, [[1]], SamplingParams(5, top_p=0))
