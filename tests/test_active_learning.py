"""Active learning for the labeling app: the reward-head ensemble, disagreement, `--select disagreement`'s priorities,
and the measurement script (bench/active_learning.py) at a miniature size."""

import importlib.util
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, tiny_config
from nextbit.core.model import GPT
from nextbit.prefs.ensemble import Featurizer, disagreement, fit_ensemble, fit_heads
from nextbit.prefs.formats import PreferenceExample


def toy_pairs(n, d=12, seed=0):
    """Feature pairs whose preference is decided by a hidden linear score (noiseless)."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=d)
    a, b = rng.normal(size=(n, d)), rng.normal(size=(n, d))
    return a, b, a @ w > b @ w


@pytest.mark.parametrize("hidden", [0, 8])
def test_heads_learn_a_separable_toy_preference_set(hidden):
    a, b, a_wins = toy_pairs(400)
    tr = slice(0, 200)
    chosen = np.where(a_wins[tr, None], a[tr], b[tr])
    rejected = np.where(a_wins[tr, None], b[tr], a[tr])
    heads = fit_heads(chosen, rejected, [False] * 200, members=4, hidden=hidden, seed=1)
    probs = heads.pair_probs(a[200:], b[200:])
    assert probs.shape == (4, 200)
    assert ((probs.mean(0) > 0.5) == a_wins[200:]).mean() >= 0.85
    swapped = heads.pair_probs(b[200:], a[200:])  # P(b over a) = 1 - P(a over b)
    assert np.allclose(swapped, 1 - probs, atol=1e-5)


def test_ties_are_half_targets():
    """Pairs labelled only as ties teach the heads nothing but 'equal': every member stays near P = 0.5, while the
    same pairs labelled strictly do not."""
    a, b, a_wins = toy_pairs(100)
    tie = fit_heads(a, b, [True] * 100, members=3, l2=0.01, seed=0).pair_probs(a, b)
    assert np.abs(tie - 0.5).max() < 0.05
    chosen, rejected = np.where(a_wins[:, None], a, b), np.where(a_wins[:, None], b, a)
    strict = fit_heads(chosen, rejected, [False] * 100, members=3, l2=0.01, seed=0).pair_probs(a, b)
    assert np.abs(strict - 0.5).mean() > 0.3


def test_disagreement_ranks_a_disputed_pair_above_an_agreed_one():
    probs = np.array([[0.9, 0.1, 0.5], [0.92, 0.9, 0.5], [0.88, 0.5, 0.5]])  # members x pairs
    d = disagreement(probs)
    assert d[1] > d[0] > d[2] == 0
    # fitted members: feature 0 decides every label, feature 1 is noise the bootstrap resamples weigh differently;
    # a pair far apart on feature 0 is agreed on, a pair apart only on feature 1 is disputed
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(40, 2)), rng.normal(size=(40, 2))
    a_wins = a[:, 0] > b[:, 0]
    heads = fit_heads(np.where(a_wins[:, None], a, b), np.where(a_wins[:, None], b, a), [False] * 40, members=6, l2=0.1, seed=0)
    agreed, disputed = np.array([[3.0, 0.0], [0.0, 3.0]]), np.zeros((2, 2))
    d = disagreement(heads.pair_probs(agreed, disputed))
    assert d[1] > 2 * d[0]
    with pytest.raises(Exception, match="members, n"):
        disagreement(np.ones(3))


@pytest.fixture(scope="module")
def featurizer(tokenizer):
    torch.manual_seed(0)
    model = GPT(tiny_config(vocab_size=tokenizer.vocab_size, seq_len=64))
    for p in model.parameters():  # projections start at zero; random ones make the blocks do something
        if p.dim() > 1:
            p.data.normal_(0, 0.1)
    return Featurizer(model, tokenizer, append_eot=False)


def test_features_are_the_mean_hidden_state_over_the_response_and_are_cached(featurizer):
    from nextbit.prefs.formats import encode_pair

    prompts, responses = ["a film", "a film", "the plot"], ["was great fun", "was dull", "was great fun"]
    f = featurizer.features(prompts, responses)
    assert f.shape == (3, featurizer.width) and len(featurizer.cache) == 3
    enc = encode_pair(featurizer.tok, "a film", "was dull", 64, False)
    with torch.no_grad():
        h = featurizer.model.hidden(torch.tensor([enc.ids]))[0]
    assert np.allclose(f[1], h[torch.tensor(enc.mask)].mean(0).numpy(), atol=1e-5)
    assert not np.allclose(f[0], f[2])  # the prompt is part of what is read
    again = featurizer.features(prompts[::-1], responses[::-1])
    assert len(featurizer.cache) == 3 and np.array_equal(again, f[::-1])


WORDS = {"good": ["great", "wonderful", "superb", "excellent", "loved"], "bad": ["awful", "boring", "terrible", "dull", "hated"]}
FILLER = ["the", "film", "story", "actor", "scene", "plot", "was", "and", "a", "with"]


def toy_text(rng, n_words=6):
    kind = rng.choice(["good", "bad"])
    words = list(rng.choice(FILLER, n_words - 2)) + list(rng.choice(WORDS[kind], 2))
    return " ".join(rng.permutation(words))


def test_refresh_priorities_ranks_the_queue_that_next_pair_follows(tmp_path, featurizer):
    from nextbit.label import store
    from nextbit.label.db import open_db
    from nextbit.label.select import Ranker, disagreement_priorities, refresh_priorities

    rng = np.random.default_rng(0)
    db = open_db(f"sqlite:///{tmp_path / 'labels.db'}")
    store.import_pairs(db, [{"prompt": "Review:", "a": toy_text(rng), "b": toy_text(rng)} for _ in range(16)], source="toy")
    uid = store.user_for_token(db, store.add_user(db, "ann")).id
    # too few labels: nothing is ranked, priorities stay 0
    assert refresh_priorities(db, featurizer, members=4, min_labels=5) == 0
    for i in range(8):  # ann labels 8 pairs: the side with more good words (or a tie)
        shown = store.next_pair(db, uid, overlap=2, timeout_s=600)
        good = [sum(w in WORDS["good"] for w in t.split()) for t in (shown.left, shown.right)]
        side = "tie" if good[0] == good[1] else ("left" if good[0] > good[1] else "right")
        store.answer(db, uid, shown.pair_id, side, idempotency_key=f"k{i}")
    assert all(p.priority == 0 for p in store.pairs(db))
    n = refresh_priorities(db, featurizer, members=4, min_labels=5, seed=7)
    pairs = store.pairs(db)
    assert n == len(pairs) == 16
    want = disagreement_priorities(featurizer, pairs, store.all_labels(db), members=4, min_labels=5, seed=7)
    got = {p.id: p.priority for p in pairs}
    assert got == pytest.approx(want) and len(set(got.values())) > 1
    bob = store.user_for_token(db, store.add_user(db, "bob")).id
    order = sorted(pairs, key=lambda p: (-p.priority, p.id))
    shown = store.next_pair(db, bob, overlap=2, timeout_s=600, select="disagreement")
    assert shown.pair_id == order[0].id
    store.answer(db, bob, shown.pair_id, "left", idempotency_key="b0")
    assert store.next_pair(db, bob, overlap=2, timeout_s=600, select="disagreement").pair_id == order[1].id
    # the server's job: the same through a Ranker, which loads its backbone once
    from nextbit.core.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "backbone", featurizer.model, featurizer.tok)
    ranker = Ranker(str(tmp_path / "backbone"), members=3, min_labels=5)
    assert ranker(db) == 16 and ranker(db) == 16 and ranker.runs == 2
    with pytest.raises(Exception, match="--members"):
        Ranker(str(tmp_path / "backbone"), members=1)


def test_fit_ensemble_reads_preference_examples(featurizer):
    rng = np.random.default_rng(1)
    prefs = []
    for _ in range(30):
        x, y = toy_text(rng), toy_text(rng)
        gx, gy = (sum(w in WORDS["good"] for w in t.split()) for t in (x, y))
        prefs.append(PreferenceExample("Review:", x if gx >= gy else y, y if gx >= gy else x, tie=gx == gy))
    ens = fit_ensemble(featurizer, prefs, members=3, seed=0)
    probs = ens.pair_probs(["Review:"] * 2, [prefs[0].chosen, prefs[1].rejected], [prefs[0].rejected, prefs[1].chosen])
    assert probs.shape == (3, 2) and ens.members == 3


def load_bench():
    spec = importlib.util.spec_from_file_location("active_learning", ROOT / "bench" / "active_learning.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["active_learning"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_the_active_learning_bench_runs_both_methods_at_a_miniature_size(tmp_path, featurizer):
    al = load_bench()
    rng = np.random.default_rng(0)
    reviews = [(" ".join(toy_text(rng, 8) for _ in range(4)), 0) for _ in range(120)]
    cfg = al.ActiveConfig(pool=60, heldout=30, prompt_words=3, snippet_words=6, seed_labels=10, batch=10, budget=30,
                          members=3, seeds=[0, 1])
    res = al.run_experiment(cfg, reviews, featurizer.features)
    for method in ("random", "disagreement"):
        c = res["curves"][method]
        assert c["labels"] == [10, 20, 30]
        assert all(0 <= x <= 1 for x in c["mean"]) and all(lo <= m <= hi for lo, m, hi in zip(c["min"], c["mean"], c["max"]))
    runs = {(r["seed"], r["method"]): r for r in res["runs"]}
    assert len(runs) == 4
    for s in (0, 1):  # paired design: both methods start from the same seed labels
        assert runs[s, "random"]["agreement"][0] == runs[s, "disagreement"]["agreement"][0]
    assert res["disagreement_minus_random"]["mean"][0] == 0
    assert 0.5 < res["labels_agreeing_with_noiseless"] <= 1
    al.plot(res, str(tmp_path / "al.png"))
    assert (tmp_path / "al.png").stat().st_size > 10_000
    bow = al.bow_features(64)  # the control featurizer: hashed words and bigrams present, the same in every process
    f = bow(["x", "y"], ["great film", "great film great"])
    assert f.shape == (2, 64) and f[0].sum() == 3 and f[1].sum() == 4 and np.array_equal(f, bow(["z", "z"], ["great film", "great film great"]))
    with pytest.raises(Exception, match="--seed-labels"):
        al.run_experiment(al.ActiveConfig(pool=10, budget=20), reviews, featurizer.features)
