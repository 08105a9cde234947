"""The fast decode path (static KV cache, fixed-shape step, on-device sampling, k-step stop checks) against
core.generate. Eager on CPU: the compiled / CUDA-graph variant runs the same step function (see docs/gpu.md)."""

import pytest
import torch

from nextbit.core.decode import DecodeEngine, fast_generate, sample_tokens
from nextbit.core.generate import SamplingParams, generate

from conftest import peaky_model


@pytest.fixture(scope="module")
def model():
    return peaky_model()


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return [tokenizer.encode("def foo(x):\n    return"), tokenizer.encode("import os"), tokenizer.encode("x"),
            tokenizer.encode("class A:\n    pass\n\n\nclass B(A):")]


def _same(a, b):
    assert [c.tokens for c in a.completions] == [c.tokens for c in b.completions]
    assert [(c.text, c.finish_reason) for c in a.completions] == [(c.text, c.finish_reason) for c in b.completions]
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.valid, b.valid) and a.prompt_len == b.prompt_len


@pytest.mark.parametrize("check_every", [1, 3, 16])
def test_greedy_matches_generate_on_a_left_padded_batch(model, tokenizer, prompts, check_every):
    eng = DecodeEngine(model, compile=False, check_every=check_every)
    p = SamplingParams(max_new_tokens=40, temperature=0, stop_token_ids=[])
    ref = generate(model, tokenizer, prompts, p)
    _same(ref, eng.generate(tokenizer, prompts, p))
    assert len(set(ref.completions[0].tokens)) > 1
    # stop tokens and stop strings end rows at different steps; the k-step checks must not change the result
    free = ref.completions[0]
    stop_tok = SamplingParams(max_new_tokens=40, temperature=0, stop_token_ids=[free.tokens[5], free.tokens[9]])
    a, b = generate(model, tokenizer, prompts, stop_tok), eng.generate(tokenizer, prompts, stop_tok)
    _same(a, b)
    assert "stop" in [c.finish_reason for c in b.completions]
    stop_str = SamplingParams(max_new_tokens=40, temperature=0, stop=[free.text[6:8], "\n\n"], stop_token_ids=[])
    a, b = generate(model, tokenizer, prompts, stop_str), eng.generate(tokenizer, prompts, stop_str)
    _same(a, b)
    assert "stop" in [c.finish_reason for c in b.completions]


def test_single_prompt_and_equal_lengths(model, tokenizer, prompts):
    p = SamplingParams(max_new_tokens=30, temperature=0, stop_token_ids=[])
    for batch in ([prompts[3]], [prompts[1]] * 3, [[tokenizer.eot_id]]):
        _same(generate(model, tokenizer, batch, p), fast_generate(model, tokenizer, batch, p, compile=False))


def test_seeded_sampling_is_repeatable_and_respects_top_k(model, tokenizer, prompts):
    eng = DecodeEngine(model, compile=False)
    p = SamplingParams(max_new_tokens=25, temperature=1.0, top_k=5, top_p=0.9, seed=7, stop_token_ids=[])
    a, b = eng.generate(tokenizer, prompts, p), eng.generate(tokenizer, prompts, p)
    assert torch.equal(a.tokens, b.tokens)
    c = eng.generate(tokenizer, [prompts[0]] * 4, p)
    assert len({tuple(x.tokens) for x in c.completions}) > 1  # rows of one batch differ
    one = eng.generate(tokenizer, prompts, SamplingParams(max_new_tokens=25, temperature=0.7, top_k=1, seed=1, stop_token_ids=[]))
    greedy = eng.generate(tokenizer, prompts, SamplingParams(max_new_tokens=25, temperature=0, stop_token_ids=[]))
    assert torch.equal(one.tokens, greedy.tokens)


def test_sampler_draws_from_the_filtered_distribution():
    torch.manual_seed(0)
    n = 40000
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]]).expand(n, 5)
    probs = logits[0].softmax(-1)
    draw = sample_tokens(logits, 1.0, 0, 1.0, torch.empty(n, 5).exponential_())
    freq = torch.bincount(draw, minlength=5).float() / n
    assert torch.allclose(freq, probs, atol=0.01)
    top2 = sample_tokens(logits, 1.0, 2, 1.0, torch.empty(n, 2).exponential_())
    assert set(top2.tolist()) == {0, 1}
    assert torch.bincount(top2).float()[0] / n == pytest.approx(float(probs[0] / probs[:2].sum()), abs=0.01)
    nucleus = sample_tokens(logits, 1.0, 0, 0.7, torch.empty(n, 5).exponential_())  # p0 = 0.55 < 0.7 <= p0 + p1
    assert set(nucleus.tolist()) == {0, 1}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (compile on CPU takes ~1 min)")
def test_compiled_cuda_graph_step_matches_eager(tokenizer, prompts):
    m = peaky_model(device="cuda")
    p = SamplingParams(max_new_tokens=40, temperature=0, stop_token_ids=[])
    eager = DecodeEngine(m, compile=False).generate(tokenizer, prompts, p)
    eng = DecodeEngine(m, compile=True)
    for _ in range(3):  # warm-up, record, replay
        fast = eng.generate(tokenizer, prompts, p)
    assert [c.tokens for c in fast.completions] == [c.tokens for c in eager.completions]


def test_compiled_step_writes_the_static_cache_like_eager(model, tokenizer, prompts):
    """torch.compile (inductor's CPU backend) of the decode step, whose cache writes are the in-place `index_put_`
    into per-layer static tensors: greedy tokens equal the eager engine's over a ragged batch, twice in a row (the
    second call reuses the compiled step and overwrites the cache)."""
    from torch._dynamo.utils import counters

    p = SamplingParams(max_new_tokens=24, temperature=0, stop_token_ids=[])
    eager = DecodeEngine(model, compile=False)
    eng = DecodeEngine(model, compile=True)
    for _ in range(2):
        _same(eager.generate(tokenizer, prompts, p), eng.generate(tokenizer, prompts, p))
    # other prompt lengths, same batch size and cache bucket (PPO's and compare's batches): no new compilation
    graphs = counters["stats"]["unique_graphs"]
    shorter = [q[:2] for q in prompts]
    _same(eager.generate(tokenizer, shorter, p), eng.generate(tokenizer, shorter, p))
    assert counters["stats"]["unique_graphs"] == graphs
