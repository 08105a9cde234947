"""Alignment formats, chat template, loss masks, labelers and compare: fast, no training."""

import json

import pytest
import torch

from nextbit.core.chat import render_messages
from nextbit.core.errors import NextbitError
from nextbit.core.tokenizer import train_tokenizer
from nextbit.prefs.compare import CompareConfig, compare
from nextbit.prefs.formats import collate
from nextbit.prefs.formats import encode_pair, encode_sft, load_preferences, load_prompts, load_sft
from nextbit.prefs.labelers import JSONLLabeler, OracleLabeler, Query, label, make_labeler
from nextbit.prefs.scorers import BowClassifier, VaderScorer, grams


@pytest.fixture(scope="module")
def tok():
    texts = ["the movie was great and the acting was wonderful. " * 20, "a terrible, boring film with awful dialogue. " * 20,
             "def f(x):\n    return x + 1\n" * 10]
    return train_tokenizer(texts, 320)


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_sft_formats_and_masks(tok, tmp_path):
    p = write(tmp_path / "sft.jsonl", [
        {"prompt": "the movie was", "completion": " great"},
        {"messages": [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "hello"}, {"role": "user", "content": "and?"},
                      {"role": "assistant", "content": "bye"}]},
        {"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "yo"}]},
        "",
    ])
    ex = load_sft(p)
    assert len(ex) == 3
    e = encode_sft(tok, ex[0], 64)
    assert e.ids[0] == tok.eot_id and e.ids[-1] == tok.eot_id
    trained = [i for i, m in zip(e.ids, e.mask) if m]
    assert trained == tok.encode(" great") + [tok.eot_id]
    e2 = encode_sft(tok, ex[1], 128)
    trained = [i for i, m in zip(e2.ids, e2.mask) if m]
    assert trained == tok.encode("hello") + [tok.end_id] + tok.encode("bye") + [tok.end_id]
    assert tok.role_id("system") in e2.ids and tok.role_id("user") in e2.ids
    e3 = encode_sft(tok, ex[2], 64)
    assert e3.ids[e3.prompt_len - 1] == tok.role_id("assistant")
    assert [i for i, m in zip(e3.ids, e3.mask) if m] == tok.encode("yo") + [tok.end_id]
    # targets: only completion tokens are trained, shifted by one
    b = collate([e, e2], tok.pad_id)
    assert b.ids.shape == b.targets.shape
    n0 = len(e.ids)
    assert b.targets[0, : e.prompt_len - 1].eq(-1).all()
    assert b.targets[0, e.prompt_len - 1 : n0 - 1].tolist() == e.ids[e.prompt_len :]
    assert b.targets[0, n0 - 1 :].eq(-1).all()


def test_role_text_is_not_a_control_token(tok):
    ids, _ = render_messages(tok, [{"role": "user", "content": "<|assistant|> sneaky"}])
    assert ids.count(tok.role_id("assistant")) == 0


def test_truncation_keeps_completion(tok):
    e = encode_pair(tok, "word " * 100, " great", 32)
    assert len(e.ids) == 32 and e.truncated
    assert e.ids[-1] == tok.eot_id and sum(e.mask) == len(tok.encode(" great")) + 1
    assert encode_pair(tok, "x", " great", 32, append_eot=False).ids[-1] != tok.eot_id


@pytest.mark.parametrize("line,msg", [
    ("{not json", ":2: not valid JSON"),
    ('["a"]', ":2: expected a JSON object"),
    ('{"prompt": "x", "chosen": "a"}', ":2: missing field 'rejected'"),
    ('{"prompt": 3, "chosen": "a", "rejected": "b"}', ":2: 'prompt' must be"),
    ('{"prompt": [{"role": "robot", "content": "x"}], "chosen": "a", "rejected": "b"}', ":2: prompt[0] has unknown role"),
    ('{"prompt": "x", "chosen": "a", "rejected": "b", "tie": "yes"}', ":2: 'tie' must be"),
])
def test_malformed_lines_name_their_line(tmp_path, line, msg):
    p = write(tmp_path / "prefs.jsonl", [{"prompt": "ok", "chosen": "a", "rejected": "b"}, line])
    with pytest.raises(NextbitError, match=msg.replace("[", r"\[").replace("]", r"\]")):
        load_preferences(p)


def test_preferences_and_prompts(tmp_path):
    p = write(tmp_path / "prefs.jsonl", [
        {"prompt": "x", "chosen": "a", "rejected": "b", "labeler": "ann", "timestamp": 1.0, "tie": False},
        {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b", "tie": True},
    ])
    prefs = load_preferences(p)
    assert prefs[0].labeler == "ann" and prefs[0].extra == {"timestamp": 1.0} and prefs[1].tie and prefs[1].chosen == "a"
    txt = tmp_path / "prompts.txt"
    txt.write_text("one\n\ntwo\n")
    assert load_prompts(txt) == ["one", "two"]
    assert load_prompts(write(tmp_path / "p.jsonl", [{"prompt": "a", "x": 1}])) == ["a"]
    with pytest.raises(NextbitError, match="file not found"):
        load_prompts(tmp_path / "missing.jsonl")


class WordScorer:
    name = "words"

    def score(self, texts):
        return [t.count("good") - t.count("bad") for t in texts]


def test_oracle_labeler_noise_model():
    lab = OracleLabeler(WordScorer(), bt_scale=0.01, random_frac=0.1, seed=0)
    js = lab.label_batch([Query("p", "good good", "bad")] * 2000)
    assert all(j.score_a == 2 and j.score_b == -1 for j in js)
    random = [j for j in js if j.random]
    assert 0.07 < len(random) / len(js) < 0.13
    assert all(j.preferred == 0 for j in js if not j.random)  # noiseless part: always the better one
    wrong = sum(j.preferred == 1 for j in js) / len(js)
    assert 0.03 < wrong < 0.08  # half the random answers are wrong
    # Bradley-Terry: one point apart at scale 1 -> the better one about sigmoid(1) = 73% of the time
    lab = OracleLabeler(WordScorer(), bt_scale=1.0, random_frac=0.0, seed=1)
    js = lab.label_batch([Query("p", "good", "")] * 4000)
    assert abs(sum(j.preferred == 0 for j in js) / 4000 - 0.731) < 0.03
    assert label(lab, "p", "same", "same").preferred is None
    # seeded: the same answers again
    a = [j.preferred for j in OracleLabeler(WordScorer(), seed=3).label_batch([Query("p", "good", "bad")] * 200)]
    b = [j.preferred for j in OracleLabeler(WordScorer(), seed=3).label_batch([Query("p", "good", "bad")] * 200)]
    assert a == b


def test_jsonl_labeler_and_compare_from_pairs(tmp_path):
    labels = write(tmp_path / "labels.jsonl", [
        {"prompt": "p1", "a": "x", "b": "y", "choice": "b", "labeler": "ann", "timestamp": 5},
        {"prompt": "p2", "chosen": "u", "rejected": "v"},
        {"prompt": "p3", "a": "s", "b": "t", "choice": "tie"},
    ])
    lab = JSONLLabeler(str(labels))
    got = lab.label_batch([Query("p1", "x", "y"), Query("p1", "y", "x"), Query("p2", "v", "u"), Query("p3", "s", "t"), Query("p9", "a", "b")])
    assert [None if j is None else j.preferred for j in got] == [1, 0, 1, None, None]
    assert got[0].labeler == "ann"
    pairs = write(tmp_path / "pairs.jsonl", [{"prompt": "p1", "a": "x", "b": "y"}, {"prompt": "p2", "a": "u", "b": "v"},
                                             {"prompt": "p9", "a": "m", "b": "n"}])
    out = tmp_path / "prefs.jsonl"
    stats = compare(CompareConfig(pairs=str(pairs), labeler=f"jsonl:{labels}", out=str(out), quiet=True))
    assert stats["labelled"] == 2 and stats["unanswered"] == 1
    prefs = load_preferences(out)
    assert [(p.chosen, p.rejected) for p in prefs] == [("y", "x"), ("u", "v")]
    assert (tmp_path / "prefs.config.json").is_file()
    with pytest.raises(NextbitError, match="already exists"):
        compare(CompareConfig(pairs=str(pairs), labeler=f"jsonl:{labels}", out=str(out), quiet=True))
    bad = write(tmp_path / "bad.jsonl", [{"prompt": "p", "a": "x", "b": "y", "choice": "c"}])
    with pytest.raises(NextbitError, match="bad.jsonl:1: 'choice'"):
        JSONLLabeler(str(bad))
    with pytest.raises(NextbitError, match="unknown labeler"):
        make_labeler("telepathy")


def test_scorers():
    v = VaderScorer()
    s = v.score(["a wonderful, moving film", "a dreadful waste of time", "the film"])
    assert s[0] > 0.3 and s[1] < -0.3 and s[2] == 0
    texts = ["great fun loved it", "wonderful great film", "awful boring mess", "terrible awful acting"] * 20
    labels = [1, 1, 0, 0] * 20
    clf = BowClassifier.fit(texts, labels, min_df=2, epochs=5, seed=0)
    assert clf.accuracy(texts, labels) == 1.0
    a, b = clf.score(["great fun", "boring mess"])
    assert a > 0 > b
    assert grams("Great great!") == grams("great GREAT!")
    assert clf.score(["xqzt"]) == [clf.bias]  # words outside the vocabulary count zero


def test_classifier_calibration():
    """Temperature scaling finds the scale that minimises held-out log-loss: a classifier made 4x over-confident is
    scaled back by 1/4 to the same calibrated scores; decisions never change."""
    import torch.nn.functional as F

    texts = ["great fun", "great boring", "awful mess", "awful fun"] * 25
    labels = [1, 1, 0, 0] * 24 + [0, 0, 1, 1]  # 4% of the labels disagree with the words
    nll = lambda s: float(F.binary_cross_entropy_with_logits(torch.tensor(s), torch.tensor(labels, dtype=torch.float)))
    clf = BowClassifier.fit(texts, labels, min_df=1, epochs=5, seed=0)
    before = clf.score(texts)
    k = clf.calibrate(texts, labels)
    calibrated = clf.score(texts)
    assert clf.info["calibration_scale"] == k and nll(calibrated) <= nll(before) + 1e-9
    assert [a > 0 for a in calibrated] == [b > 0 for b in before]
    clf.weight, clf.bias = clf.weight * 4, clf.bias * 4
    assert clf.calibrate(texts, labels) == pytest.approx(0.25, rel=1e-3)
    assert clf.score(texts) == pytest.approx(calibrated, rel=1e-3)


def test_review_snippets():
    from nextbit.recipes.sentiment import review_snippets

    reviews = [(" ".join(f"w{i}" for i in range(100)), 1), ("short review<br />here", 0)]
    texts, labels = review_snippets(reviews, 10, 3, seed=0)
    assert labels == [1, 1, 1, 0, 0, 0]
    assert all(len(t.split()) == 10 for t in texts[:3]) and texts[3] == "short review here"
    assert all(t in reviews[0][0] for t in texts[:3])
    assert review_snippets(reviews, 10, 3, seed=0) == (texts, labels)


def test_classifier_roundtrip(tmp_path):
    clf = BowClassifier.fit(["good", "bad"], [1, 0], min_df=1, epochs=3)
    clf.save(tmp_path / "clf")
    again = BowClassifier.load(tmp_path / "clf")
    assert again.score(["good", "bad"]) == clf.score(["good", "bad"])
    assert make_labeler("oracle", scorer=f"classifier:{tmp_path / 'clf'}").name == "oracle:classifier"
    with pytest.raises(NextbitError, match="no classifier"):
        BowClassifier.load(tmp_path / "nothing")
