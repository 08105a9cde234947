"""The one generation engine (infer/engine.py) against the plain reference (infer/reference.py): full recomputation,
one prompt at a time, no cache. Eager on CPU; the compiled step is checked against eager below, and the CUDA-graph
variant runs the same step function on a GPU."""

import pytest
import torch

from nextbit.core.errors import NextbitError
from nextbit.infer.decoding import SamplingParams, counter_uniform, cut_at_stop, draw, row_seed, sample_tokens
from nextbit.infer.engine import Engine, Finish, Request, completion, finish_reason, generate
from nextbit.infer.reference import reference_generate

from conftest import peaky_model


@pytest.fixture(scope="module")
def model():
    return peaky_model()


@pytest.fixture(scope="module")
def prompts(tokenizer):
    # ragged: 1 to ~20 tokens
    return [tokenizer.encode("def foo(x):\n    return"), tokenizer.encode("import os"), tokenizer.encode("x"),
            tokenizer.encode("class A:\n    pass\n\n\nclass B(A):")]


def run_against_the_reference(eng, slots, prompts, plist, max_len=96) -> list[Request]:
    """One request per (prompt, params) into `slots` slots (later ones join as rows end), stepped to the end; each
    row's tokens must be the plain reference's."""
    eng.start(slots=slots, max_len=max_len)
    reqs = [Request(list(q), p, row_seed(p.seed, 0)) for q, p in zip(prompts, plist)]
    for r in reqs:
        eng.submit(r)
    while eng.busy:
        eng.step()
    for r, q, p in zip(reqs, prompts, plist):
        assert r.tokens == reference_generate(eng.model, eng.tokenizer, [q], p)[0].tokens
    return reqs


def _same(got, ref):
    assert [(c.tokens, c.text, c.finish_reason) for c in got] == [(c.tokens, c.text, c.finish_reason) for c in ref]


def test_greedy_equals_the_reference_for_ragged_batches_stop_strings_and_stop_tokens(model, tokenizer, prompts):
    eng = Engine(model, tokenizer, compile=False)
    free = SamplingParams(max_new_tokens=40, temperature=0, stop_token_ids=[], seed=0)
    ref = reference_generate(model, tokenizer, prompts, free)
    _same(eng.generate(prompts, free).completions, ref)
    assert len(set(ref[0].tokens)) > 1 and all(c.finish_reason == "length" for c in ref)
    by_token = SamplingParams(max_new_tokens=40, temperature=0, stop_token_ids=[ref[0].tokens[5], ref[3].tokens[9]], seed=0)
    got = eng.generate(prompts, by_token).completions
    _same(got, reference_generate(model, tokenizer, prompts, by_token))
    assert got[0].finish_reason == "stop" and len(got[0].tokens) == 6 and got[0].tokens[-1] == ref[0].tokens[5]
    by_string = SamplingParams(max_new_tokens=40, temperature=0, stop=[ref[0].text[6:8], "\n\n"], stop_token_ids=[], seed=0)
    got = eng.generate(prompts, by_string).completions
    _same(got, reference_generate(model, tokenizer, prompts, by_string))
    assert got[0].finish_reason == "stop" and ref[0].text[6:8] not in got[0].text and ref[0].text.startswith(got[0].text)


def test_a_finish_keeps_its_word_from_the_engine_to_the_api(model, tokenizer):
    """The engine's Request.finish is what completion() takes, unchanged: "length" stays "length" (it used to turn
    into None on the way and back into "length"), a stop token or string is "stop", and only a stop token is cut."""
    from typing import get_args

    assert set(get_args(Finish)) == {"token", "string", "length", "cancelled"}
    toks = tokenizer.encode("x = 1") + [tokenizer.end_id]
    want = {"token": ("stop", toks[:-1]), "string": ("stop", toks), "length": ("length", toks)}
    for finish, (reason, body) in want.items():
        c = completion(tokenizer, toks, finish, [])
        assert (c.finish_reason, c.text, c.tokens) == (reason, tokenizer.decode(body), toks) and finish_reason(finish) == reason
    eng = Engine(model, tokenizer, compile=False)
    eng.start(slots=1, max_len=64)
    req = Request(tokenizer.encode("x"), SamplingParams(max_new_tokens=3, stop_token_ids=[]), 0)
    eng.submit(req)
    while eng.busy:
        eng.step()
    assert req.finish == "length" and completion(tokenizer, req.tokens, req.finish, []).finish_reason == "length"


@pytest.mark.parametrize("temperature,sync_every", [(0.0, 1), (1.0, 1), (1.0, 3)])
def test_penalties_and_logit_bias_equal_the_reference_row_by_row(model, tokenizer, prompts, temperature, sync_every):
    """OpenAI's frequency and presence penalties and logit_bias, each row its own, in one batch of three slots that a
    fourth request joins when the first row ends (its slot's counts and bias must start afresh): every row's tokens
    are the plain reference's."""
    plain = reference_generate(model, tokenizer, prompts, SamplingParams(24, 0, stop_token_ids=[], seed=0))
    banned = {plain[3].tokens[0]: -100.0, plain[3].tokens[1]: -100.0}
    pushed = {plain[3].tokens[2]: 8.0}  # the first row's bias, which the fourth row must not inherit
    plist = [SamplingParams(10, temperature, seed=1, frequency_penalty=1.5, logit_bias=pushed, stop_token_ids=[]),
             SamplingParams(24, temperature, seed=2, presence_penalty=2.0, logit_bias={plain[1].tokens[2]: 3.0}, stop_token_ids=[]),
             SamplingParams(24, temperature, seed=3, stop_token_ids=[]),
             SamplingParams(24, temperature, seed=4, frequency_penalty=-0.5, stop_token_ids=[])]
    reqs = run_against_the_reference(Engine(model, tokenizer, compile=False, sync_every=sync_every), 3, prompts, plist)
    assert reqs[3].slot == 0  # joined in the first row's slot
    assert reqs[3].tokens != reference_generate(model, tokenizer, [prompts[3]], SamplingParams(
        24, temperature, seed=4, frequency_penalty=-0.5, logit_bias=pushed, stop_token_ids=[]))[0].tokens  # it would show
    banned_run = generate(model, tokenizer, prompts[3:], SamplingParams(24, temperature, seed=4, logit_bias=banned,
                                                                        stop_token_ids=[]), compile=False)
    assert not set(banned) & set(banned_run.completions[0].tokens)
    if temperature == 0:  # the penalties change what the greedy rows pick
        assert reqs[0].tokens != plain[0].tokens[:10] and reqs[1].tokens != plain[1].tokens
        assert max(reqs[0].tokens.count(t) for t in reqs[0].tokens) < max(plain[0].tokens.count(t) for t in plain[0].tokens)


def test_a_row_draws_the_same_token_whatever_the_rows_beside_it_filter():
    """A row's draw depends on its own logits, parameters and stream only: an unfiltered row alone (the plain softmax)
    and beside a top-p or a top-k row (the sorted path over the whole vocabulary) draws the same token, and so does a
    top-k row alone and beside a row that needs the whole vocabulary. A tiny temperature samples, without NaN."""
    g = torch.Generator().manual_seed(0)
    V = 300
    logits = torch.randn(2, V, generator=g) * 3
    one, t = torch.ones(2), torch.ones(2)
    for seed in range(200):
        seeds, ctr = torch.tensor([seed, 7]), torch.tensor([3, 3])
        alone = sample_tokens(logits[:1], t[:1], torch.zeros(1, dtype=torch.long), one[:1], seeds[:1], ctr[:1], 0)
        for k, p in ((0, 0.9), (20, 1.0)):
            mixed = sample_tokens(logits, t, torch.tensor([0, k]), torch.tensor([1.0, p]), seeds, ctr, V)
            assert mixed[0] == alone[0], (seed, k, p)
        k_alone = sample_tokens(logits[1:], t[:1], torch.tensor([20]), one[:1], seeds[1:], ctr[1:], 20)
        k_mixed = sample_tokens(logits, t, torch.tensor([0, 20]), one, seeds, ctr, V)
        assert k_mixed[1] == k_alone[0]
    tiny = torch.tensor([1e-39, 1e-39])
    for width, top_p in ((0, 1.0), (V, 0.9)):
        got = sample_tokens(logits, tiny, torch.zeros(2, dtype=torch.long), torch.full((2,), top_p), torch.tensor([1, 2]),
                            torch.zeros(2, dtype=torch.long), width)
        assert torch.equal(got, logits.argmax(-1))


def test_a_logit_bias_of_100_forces_its_token_and_bad_biases_are_refused(model, tokenizer, prompts):
    forced = tokenizer.encode(" zebra")[0]
    got = generate(model, tokenizer, prompts[:2], SamplingParams(6, 1.0, seed=0, logit_bias={forced: 100.0}, stop_token_ids=[]),
                   compile=False)
    assert [c.tokens for c in got.completions] == [[forced] * 6] * 2
    eng = Engine(model, tokenizer, compile=False)
    for p, msg in [(SamplingParams(5, logit_bias={tokenizer.vocab_size: 1.0}), "logit_bias token ids"),
                   (SamplingParams(5, logit_bias={3: 101.0}), "logit_bias values"),
                   (SamplingParams(5, frequency_penalty=2.5), "--frequency-penalty"), (SamplingParams(5, presence_penalty=-3), "--presence-penalty")]:
        with pytest.raises(NextbitError, match=msg):
            eng.generate([[1]], p)
    import torch._dynamo.config as dynamo
    Engine(model, tokenizer, compile=True)  # compiles only when it steps; its variants must not hit dynamo's limit of 8
    assert dynamo.recompile_limit >= 64


@pytest.mark.parametrize("sync_every", [1, 3, 16])
def test_seeded_sampling_equals_the_reference_whatever_the_sync_interval(model, tokenizer, prompts, sync_every):
    p = SamplingParams(max_new_tokens=30, temperature=0.9, top_k=20, top_p=0.9, stop=["\n\n"], seed=11)
    got = Engine(model, tokenizer, compile=False, sync_every=sync_every).generate(prompts, p).completions
    _same(got, reference_generate(model, tokenizer, prompts, p))
    assert len({tuple(c.tokens) for c in Engine(model, tokenizer, compile=False).generate([prompts[0]] * 4, p).completions}) > 1


def test_generation_tensors_are_left_padded_prompts_then_the_completions(model, tokenizer, prompts):
    p = SamplingParams(max_new_tokens=12, temperature=0, stop_token_ids=[tokenizer.encode(" ")[0]], seed=0)
    g = generate(model, tokenizer, prompts, p, compile=False)
    P = max(len(q) for q in prompts)
    assert g.prompt_len == P and g.tokens.shape == g.valid.shape
    for i, (q, c) in enumerate(zip(prompts, g.completions)):
        assert g.tokens[i, P - len(q) : P].tolist() == q and not g.valid[i, : P - len(q)].any()
        assert g.tokens[i, P:][g.valid[i, P:]].tolist() == c.tokens


def test_a_request_gives_the_same_tokens_alone_and_inside_a_busy_batch(model, tokenizer, prompts):
    """Continuous batching: requests join a running batch as slots free up, each with its own parameters and
    random stream. A request's output equals what it gets alone (and what the reference gives)."""
    params = [SamplingParams(max_new_tokens=n, temperature=t, top_k=k, top_p=tp, seed=s, stop_token_ids=[])
              for n, t, k, tp, s in [(20, 0.0, 0, 1.0, 1), (7, 1.0, 0, 1.0, 2), (15, 0.7, 5, 1.0, 3), (11, 1.2, 0, 0.8, 4),
                                     (25, 1.0, 40, 0.95, 5), (3, 0.0, 0, 1.0, 6)]]
    qs = [prompts[i % len(prompts)] for i in range(len(params))]
    alone = [reference_generate(model, tokenizer, [q], p)[0].tokens for q, p in zip(qs, params)]
    eng = Engine(model, tokenizer, compile=False)
    eng.start(slots=2, max_len=96)  # fewer slots than requests: rows finish and are refilled
    reqs = [Request(list(q), p, row_seed(p.seed, 0)) for q, p in zip(qs, params)]
    joined_while_busy = 0
    for r in reqs[:2]:
        eng.submit(r)
    eng.step()
    for r in reqs[2:]:
        joined_while_busy += bool(eng.running)
        eng.submit(r)
        eng.step()
    while eng.busy:
        eng.step()
    assert joined_while_busy == len(reqs) - 2
    assert [r.tokens for r in reqs] == alone
    assert [len(r.tokens) for r in reqs] == [p.max_new_tokens for p in params]
    assert not eng.running and not eng.active.any()


@pytest.mark.parametrize("sync_every", [1, 5])
def test_eager_decode_runs_only_the_busy_slots_over_the_live_window(model, tokenizer, prompts, sync_every):
    """Eager decode steps run slots 0..(highest busy) over the cache up to what the longest busy row needs, and
    attention in runs of rows with windows of their own: rows that grow past each other, a hole left by a finished
    low slot, a row far ahead of the rest and a lone row all give the reference's tokens, and the step really runs
    on the smaller views."""
    eng = Engine(model, tokenizer, compile=False, sync_every=sync_every)
    shapes, splits = [], []  # (rows, cache positions) of every decode step; its attention runs
    make = eng._make_step

    def spying(*args):
        step = make(*args)

        def spy(rows, k, v, runs):  # the step's arguments: the slots' rows, the cache's keys and values, the runs
            shapes.append((rows.last.size(0), k[0].size(2)))
            splits.append(runs)
            return step(rows, k, v, runs)
        return spy

    eng._make_step = spying
    eng.run_cost = 16  # this small cache saves at most 96 positions a row by a split: make splits pay here
    params = [SamplingParams(max_new_tokens=n, temperature=1.0, top_k=30, seed=s, stop_token_ids=[])
              for n, s in [(5, 1), (75, 2), (30, 3), (60, 4)]]
    qs = [prompts[0], prompts[1], prompts[2], prompts[3]]
    assert all(len(q) + p.max_new_tokens <= 96 for q, p in zip(qs, params))
    reqs = run_against_the_reference(eng, 4, qs, params)
    longest, total = max(len(q) for q in qs) + 1, max(len(q) + p.max_new_tokens for q, p in zip(qs, params))
    assert shapes[0] == (4, longest)  # all four rows, over what the longest needs (not the whole cache), growing to
    assert total <= max(w for _, w in shapes) <= min(96, total + sync_every - 1)  # what the longest row needs at its end
    assert min(b for b, _ in shapes) == 2  # slot 3 done: slots 0-1 only (slot 0 idle, a hole)
    assert any(len(r) > 1 for r in splits)  # slot 1 far ahead of idle slot 0: two runs
    for (rows, W), runs in zip(shapes, splits):
        assert runs[0][0] == 0 and runs[-1][1] == rows and all(a[1] == b[0] for a, b in zip(runs, runs[1:]))
        assert max(w for _, _, w in runs) == W
    shapes.clear()
    alone = Request(list(prompts[2]), params[2], row_seed(3, 0))
    eng.submit(alone)  # a lone row takes slot 0: one row
    while eng.busy:
        eng.step()
    assert {b for b, _ in shapes} == {1} and alone.tokens == reqs[2].tokens


def test_attention_runs_split_where_it_pays():
    from nextbit.infer.engine import RUN_COST, attention_runs

    assert attention_runs([96] * 32) == [(0, 32, 96)]
    assert attention_runs([96] * 17 + [153] + [96] * 14) == [(0, 17, 96), (17, 18, 153), (18, 32, 96)]  # a straggler
    assert attention_runs([96, 97, 98, 96, 99]) == [(0, 5, 99)]  # not worth another call
    assert attention_runs([1, 1, 1, 200]) == [(0, 3, 1), (3, 4, 200)]
    g = torch.Generator().manual_seed(0)
    for n in (1, 7, 33, 100, 256):  # past MAX_RUNS blocks too: runs tile the rows, every row inside its window
        needs = torch.randint(1, 256, (n,), generator=g).tolist()
        runs = attention_runs(needs)
        assert runs[0][0] == 0 and runs[-1][1] == n and all(a[1] == b[0] for a, b in zip(runs, runs[1:]))
        assert all(max(needs[a:b]) <= w for a, b, w in runs)
        assert sum((b - a) * w + RUN_COST for a, b, w in runs) <= n * max(needs) + RUN_COST


def test_an_idle_slot_below_a_busy_one_stays_inside_a_shorter_window(tokenizer):
    """Slot 0 ends a long row (130 positions) while slot 1 holds a shorter one (under 128): the next eager steps
    run both slots over a 128-position window, so the idle slot must not keep its old length."""
    model = peaky_model(seq_len=256)
    eng = Engine(model, tokenizer, compile=False)
    eng.start(slots=2, max_len=256)
    p = lambda n, seed: SamplingParams(max_new_tokens=n, temperature=1.0, seed=seed, stop_token_ids=[])  # noqa: E731
    q = tokenizer.encode("x = 1")
    long, short = Request(list(q), p(125, 1), row_seed(1, 0)), Request(list(q), p(10, 2), row_seed(2, 0))
    eng.submit(long)
    eng.submit(short)
    while not short.done:
        eng.step()
    late = Request(list(q), p(118, 3), row_seed(3, 0))
    eng.submit(late)  # slot 1, about 10 tokens behind slot 0
    while eng.busy:
        eng.step()
    for r in (long, short, late):
        assert r.tokens == reference_generate(model, tokenizer, [q], r.params)[0].tokens
    assert late.slot == 1 and len(q) + len(long.tokens) > 128 > len(q) + len(late.tokens) - 5


def test_a_cancelled_request_frees_its_slot_for_the_queue(model, tokenizer, prompts):
    p = SamplingParams(max_new_tokens=30, temperature=0, stop_token_ids=[])
    eng = Engine(model, tokenizer, compile=False)
    eng.start(slots=1, max_len=96)
    first, second, third = (Request(list(prompts[i]), p, 0) for i in range(3))
    for r in (first, second, third):
        eng.submit(r)
    eng.step()
    eng.cancel(first)  # mid-generation: the slot is free at the next step
    eng.cancel(third)  # still queued
    assert first.finish == third.finish == "cancelled" and 1 <= len(first.tokens) < 30
    eng.step()
    assert eng.running == {0: second} and not eng.waiting
    while eng.busy:
        eng.step()
    assert second.tokens == reference_generate(model, tokenizer, [prompts[1]], SamplingParams(30, 0, stop_token_ids=[], seed=0))[0].tokens


def test_token_logprobs_equal_scoring_the_finished_sequence(model, tokenizer, prompts):
    """The log-probabilities reported while generating (decode steps, batched) equal a plain forward pass over the
    prompt and its completion (Engine.score, which the API's echo uses)."""
    eng = Engine(model, tokenizer, compile=False)
    eng.start(slots=3, max_len=96)
    p = SamplingParams(max_new_tokens=12, temperature=1.0, seed=4, stop_token_ids=[])
    reqs = [Request(list(q), p, i, logprobs=3) for i, q in enumerate(prompts[:3])]
    for r in reqs:
        eng.submit(r)
    while eng.busy:
        eng.step()
    for r in reqs:
        scored = eng.score(r.prompt + r.tokens, top=3)[len(r.prompt):]
        assert len(r.token_logprobs) == len(r.tokens) == len(scored) == 12
        for got, ref in zip(r.token_logprobs, scored):
            assert got.logprob == pytest.approx(ref.logprob, abs=1e-4)
            assert [i for i, _ in got.top] == [i for i, _ in ref.top] and len(got.top) == 3
    assert eng.score([5])[0] is None and len(eng.score([5, 6, 7], top=2)[2].top) == 2


def test_more_prompts_than_slots_refill_the_slots(model, tokenizer, prompts):
    p = SamplingParams(max_new_tokens=9, temperature=1.0, seed=3, stop_token_ids=[])
    many = prompts * 3
    eng = Engine(model, tokenizer, compile=False)
    assert [c.tokens for c in eng.generate(many, p, max_slots=5).completions] == \
           [c.tokens for c in eng.generate(many, p).completions]


def test_cache_views_match_the_full_forward(model, tokenizer):
    """Prefill into two slots of the static cache, then decode step by step: the logits are the full forward's."""
    from nextbit.infer.engine import _Decode, _Prefill

    torch.manual_seed(0)
    idx = torch.randint(0, 384, (2, 24))
    eng = Engine(model, tokenizer, compile=False)
    eng.start(slots=3, max_len=32)
    with torch.no_grad():
        full = model(idx)
        slots = torch.tensor([2, 0])
        first = model(idx[:, :10], cache=_Prefill(eng.k, eng.v, slots, 10))
        lengths = torch.tensor([10, 0, 10])
        steps = []
        for t in range(10, 24):
            tok = torch.stack([idx[1, t], torch.tensor(0), idx[0, t]])
            out = model(tok[:, None], cache=_Decode(eng.k, eng.v, lengths))
            steps.append(out[[2, 0]])
            lengths = lengths + torch.tensor([1, 0, 1])
    assert torch.allclose(torch.cat([first, *steps], 1), full, atol=1e-5)


def test_sampler_draws_from_the_filtered_distribution():
    n = 40000
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]]).expand(n, 5)
    probs = logits[0].softmax(-1)
    seeds, counters = torch.arange(n), torch.zeros(n, dtype=torch.long)
    t, k0, p1 = torch.ones(n), torch.zeros(n, dtype=torch.long), torch.ones(n)

    def draw(k, p, width):
        return sample_tokens(logits, t, torch.full((n,), k), torch.full((n,), p), seeds, counters, width)

    freq = torch.bincount(draw(0, 1.0, 0), minlength=5).float() / n
    assert torch.allclose(freq, probs, atol=0.01)
    top2 = draw(2, 1.0, 2)
    assert set(top2.tolist()) == {0, 1}
    assert torch.bincount(top2).float()[0] / n == pytest.approx(float(probs[0] / probs[:2].sum()), abs=0.01)
    assert set(draw(0, 0.7, 5).tolist()) == {0, 1}  # p0 = 0.55 < 0.7 <= p0 + p1
    # one step later the same rows draw fresh noise, independent of the first
    later = sample_tokens(logits, t, k0, p1, seeds, counters + 1, 0)
    assert (later != draw(0, 1.0, 0)).float().mean() == pytest.approx(1 - float((probs**2).sum()), abs=0.01)


def test_counter_uniform_is_uniform_and_independent_of_the_batch():
    n = 1 << 16
    u = counter_uniform(torch.arange(n), torch.zeros(n, dtype=torch.long))
    assert float(u.min()) >= 0 and float(u.max()) < 1
    assert float(u.mean()) == pytest.approx(0.5, abs=0.005) and float(u.var()) == pytest.approx(1 / 12, abs=0.002)
    assert torch.equal(counter_uniform(torch.tensor([37]), torch.tensor([5]))[0],
                       counter_uniform(torch.tensor([1, 37, 2]), torch.tensor([0, 5, 9]))[1])
    # no structure between neighbours: adjacent seeds, adjacent steps of one seed, seeds apart in their high bits only
    corr = lambda a, b: float(torch.corrcoef(torch.stack([a, b]))[0, 1])  # noqa: E731
    steps = counter_uniform(torch.zeros(n, dtype=torch.long), torch.arange(n))
    high = counter_uniform(torch.arange(n) << 32, torch.zeros(n, dtype=torch.long))
    for a, b in ((u[:-1], u[1:]), (steps[:-1], steps[1:]), (u, high), (u, steps)):
        assert abs(corr(a, b)) < 0.02


def test_stop_strings_are_found_in_the_tail_exactly_when_in_the_whole_text(tokenizer):
    """The engine checks stop strings on the last few tokens only: random token ids (many of them pieces of UTF-8
    characters) and stop strings cut from their text, some multi-byte, end a row at the same token as decoding the
    whole text each time would."""
    from nextbit.infer.engine import stop_in_tail

    g = torch.Generator().manual_seed(0)
    found = 0
    for trial in range(60):
        ids = torch.randint(0, tokenizer.vocab_size, (40,), generator=g).tolist()
        if trial % 3 == 0:  # multi-byte characters, also split across tokens
            ids[10:10] = tokenizer.encode("naïve → 日本 ✓ ok")
        text = tokenizer.decode(ids)
        a = int(torch.randint(0, max(1, len(text) - 4), (1,), generator=g))
        stops = [s for s in (text[a : a + 1 + trial % 4], "→ 日", "zz\u00e9q") if s and "\ufffd" not in s]
        whole = next((k for k in range(1, len(ids) + 1) if cut_at_stop(tokenizer.decode(ids[:k]), stops)[1]), None)
        tail = next((k for k in range(1, len(ids) + 1) if stop_in_tail(tokenizer, ids[:k], stops)), None)
        assert tail == whole, (ids, stops)
        found += whole is not None
    assert found > 30  # most trials do stop somewhere


def test_draw_never_picks_a_zero_probability_entry():
    """Inverse-transform sampling at the uniform's extremes (0 and its largest value, 1 - 2^-24), over rows whose
    totals are not 1 and with zeros first, inside and last."""
    probs = torch.tensor([[0.0, 0.3, 0.0, 0.7, 0.0], [0.0, 0.0, 0.0, 1e-8, 0.0], [2.0, 1.0, 0.0, 3.0, 0.0]])
    for u in (0.0, 0.5, 1 - 2**-24):
        got = draw(probs, torch.full((3,), u))
        assert all(probs[i, j] > 0 for i, j in enumerate(got.tolist())), (u, got)
    assert draw(probs, torch.zeros(3)).tolist() == [1, 3, 0] and draw(probs, torch.full((3,), 1 - 2**-24)).tolist() == [3, 3, 3]


def test_unseeded_sampling_follows_torch_manual_seed(model, tokenizer, prompts):
    p = SamplingParams(max_new_tokens=10, temperature=1.0, stop_token_ids=[])
    torch.manual_seed(5)
    a = generate(model, tokenizer, prompts, p, compile=False)
    torch.manual_seed(5)
    b = generate(model, tokenizer, prompts, p, compile=False)
    assert torch.equal(a.tokens, b.tokens)


def test_bad_inputs(model, tokenizer):
    eng = Engine(model, tokenizer, compile=False)
    for prompts, p, msg in [([[1] * 200], SamplingParams(5), "does not fit"), ([[]], SamplingParams(5), "empty prompt"),
                            ([[1]], SamplingParams(5, top_p=0), "--top-p"), ([[1]], SamplingParams(5, temperature=-1), "--temperature"),
                            ([[1]], SamplingParams(0), "--max-new-tokens"), ([[9999]], SamplingParams(5), "token ids"), ([], SamplingParams(5), "no prompts")]:
        with pytest.raises(NextbitError, match=msg):
            eng.generate(prompts, p)


def test_compiled_step_equals_eager_and_is_reused_across_prompt_lengths(model, tokenizer, prompts):
    """torch.compile (inductor's CPU backend) of the decode step, whose cache writes are in-place indexed writes into
    the static per-layer buffers: tokens equal the eager engine's over a ragged batch, twice in a row, and other
    prompt lengths with the same slots and cache length compile nothing new."""
    from torch._dynamo.utils import counters

    p = SamplingParams(max_new_tokens=24, temperature=0.8, top_k=30, seed=2, stop_token_ids=[])
    eager = Engine(model, tokenizer, compile=False)
    eng = Engine(model, tokenizer, compile=True)
    for _ in range(2):
        assert torch.equal(eager.generate(prompts, p).tokens, eng.generate(prompts, p).tokens)
    graphs = counters["stats"]["unique_graphs"]
    shorter = [q[:2] for q in prompts]
    assert torch.equal(eager.generate(shorter, p).tokens, eng.generate(shorter, p).tokens)
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_step_matches_eager(tokenizer, prompts):
    m = peaky_model(device="cuda")
    p = SamplingParams(max_new_tokens=40, temperature=0, stop_token_ids=[])
    eager = Engine(m, tokenizer, compile=False, precision="fp32").generate(prompts, p)
    eng = Engine(m, tokenizer, compile=True, precision="fp32")
    for _ in range(3):  # warm-up, record, replay
        fast = eng.generate(prompts, p)
    assert [c.tokens for c in fast.completions] == [c.tokens for c in eager.completions]
