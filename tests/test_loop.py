"""`nextbit loop` end to end: people (bots that judge like the oracle labeler) label pairs in the labeling app over
HTTP, one command runs a round (export, reward model, PPO, held-out evaluation), and the running `nextbit serve`
answers with the new weights afterwards. Then what the round refuses: a database without labels, a missing policy,
a server that does not answer, a folder that already holds a round; each is one line and leaves nothing behind.

The policy is a tiny model fine-tuned for a moment to continue "the film was" with two sentiment words of either
kind (so its samples are words VADER has opinions about); every stage of the round runs a handful of steps.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import re
import socket
import uuid
from pathlib import Path

import httpx
import pytest
import torch

pytest.importorskip("vaderSentiment")
pytest.importorskip("sqlalchemy")

from nextbit.prefs.labelers import OracleLabeler, Query  # noqa: E402
from live import uvicorn_in_thread
from nextbit.align.sft import SFTConfig, sft  # noqa: E402
from nextbit.align.stats import wilson  # noqa: E402
from nextbit.align.winrate import labeler_wins, wins  # noqa: E402
from nextbit.cli import main  # noqa: E402
from nextbit.core.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from nextbit.core.config import ModelConfig  # noqa: E402
from nextbit.core.model import GPT  # noqa: E402
from nextbit.core.tokenizer import train_tokenizer  # noqa: E402
from nextbit.infer.decoding import SamplingParams  # noqa: E402
from nextbit.infer.engine import generate  # noqa: E402
from nextbit.label import store  # noqa: E402
from nextbit.label.db import open_db  # noqa: E402
from nextbit.label.server import LabelServeConfig, build_label_app  # noqa: E402
from nextbit.prefs.scorers import VaderScorer  # noqa: E402
from nextbit.recipes.loop import small_number_warnings, summary_lines  # noqa: E402
from nextbit.serve.server import ServeConfig, build_app  # noqa: E402
from nextbit.train.loop import LoopConfig  # noqa: E402

POS = ["great", "wonderful", "excellent", "superb", "lovely", "brilliant"]
NEG = ["awful", "terrible", "boring", "dreadful", "bad", "dull"]
SUBJ = ["the movie", "the film", "this show", "the acting", "the plot", "the ending"]
VERB = ["was", "is", "seemed", "felt"]
PROMPTS = [f"{s} {v}" for s, v in itertools.product(SUBJ, VERB)]
ADMIN = "admin-key-for-the-loop"
ROUND = ["--reward-epochs", "2", "--reward-batch", "16", "--ppo-steps", "3", "--ppo-batch", "8", "--ppo-minibatch", "8",
         "--ppo-epochs", "1", "--max-new-tokens", "8", "--heldout-frac", "0.25", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module", autouse=True)
def only_these_commands():
    """`main` builds its parser from the registry on every call (~0.5 s for every command on a busy machine): the
    commands these tests run are enough, and `main` treats them exactly as before."""
    from nextbit import commands

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(commands, "COMMANDS", {k: commands.COMMANDS[k] for k in ("loop", "label sample", "label add-user")})
        yield


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict:
    """A tiny policy that has learnt to continue the prompts with two sentiment words (of either kind), briefly."""
    d = tmp_path_factory.mktemp("loop")
    rows = [{"prompt": p, "completion": f" {a} and {b}."} for i, p in enumerate(PROMPTS)
            for a, b in zip(POS + NEG, (NEG + POS)[i % 12 :] + (NEG + POS)[: i % 12])]
    tok = train_tokenizer([r["prompt"] + r["completion"] for r in rows] * 2, 400)
    model = GPT(ModelConfig(depth=1, vocab_size=400, width=64, n_head=2, seq_len=64))
    model.reset_parameters(seed=0)
    save_checkpoint(d / "base", model, tok)
    data = d / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sft(SFTConfig(init_from=str(d / "base"), data=str(data), out=str(d / "policy"), batch_size=16, val_frac=0.0,
                  loop=LoopConfig(steps=40, lr=1e-2, weight_decay=0.0, device="cpu", quiet=True, seed=0)))
    prompts = d / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return {"dir": d, "policy": d / "policy" / "checkpoint", "prompts": prompts}


def in_thread(app):
    """An ASGI app on a free port of 127.0.0.1, uvicorn in a thread: .url, and .stop() to make it go away."""
    return uvicorn_in_thread(app)


@contextlib.contextmanager
def model_server(checkpoint):
    """`nextbit serve CHECKPOINT --admin-key ADMIN` in this process."""
    app, runner, _ = build_app(ServeConfig(checkpoint=str(checkpoint), device="cpu", admin_key=ADMIN))
    runner.start()
    try:
        with in_thread(app) as live:
            yield live
    finally:
        runner.stop()


def bot_labels(url: str, token: str, seed: int) -> int:
    """A labeler in the app, through its JSON API as the page uses it (cookie session, CSRF token, same origin):
    judges each pair it is shown the way the oracle labeler would (VADER through Bradley-Terry noise, 10% coin
    flips). Returns how many answers were acknowledged."""
    person = OracleLabeler(VaderScorer(), bt_scale=0.3, random_frac=0.1, seed=seed)
    done = 0
    with httpx.Client(base_url=url, timeout=30, headers={"Origin": url}) as c:
        r = c.post("/api/login", json={"token": token})
        assert r.status_code == 200, r.text
        csrf = c.get("/api/me").json()["csrf"]
        while True:
            shown = c.get("/api/next").json()
            if shown.get("pair_id") is None:
                return done
            j = person.label_batch([Query(shown["prompt"], shown["left"], shown["right"])])[0]
            side = {0: "left", 1: "right", None: "tie"}[j.preferred]
            r = c.post("/api/answer", headers={"X-CSRF-Token": csrf},
                       json={"pair_id": shown["pair_id"], "side": side, "idempotency_key": str(uuid.uuid4())})
            assert r.status_code == 200 and r.json()["created"], r.text
            done += 1


def run_loop(capsys, *args) -> tuple[int, str]:
    """`nextbit loop ARGS` in this process: (exit code, stderr)."""
    capsys.readouterr()
    try:
        main(["loop", *map(str, args)])
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    return code, capsys.readouterr().err


def greedy(url: str, prompt: str, n: int = 12) -> str:
    r = httpx.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": n, "temperature": 0}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def offline_greedy(checkpoint, prompt: str, n: int = 12) -> str:
    ck = load_checkpoint(checkpoint)
    ids = [ck.tokenizer.eot_id] + ck.tokenizer.encode(prompt)
    return generate(ck.model.eval(), ck.tokenizer, [ids], SamplingParams(max_new_tokens=n, temperature=0)).completions[0].text


def echo_logprobs(url: str, text: str) -> list[float]:
    r = httpx.post(url + "/v1/completions", json={"prompt": text, "max_tokens": 0, "echo": True, "logprobs": 0}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["logprobs"]["token_logprobs"][1:]


def offline_logprobs(checkpoint, text: str) -> list[float]:
    ck = load_checkpoint(checkpoint)
    ids = torch.tensor([[ck.tokenizer.eot_id] + ck.tokenizer.encode(text)])
    with torch.no_grad():
        lp = torch.log_softmax(ck.model.eval()(ids)[0, :-1, : ck.tokenizer.vocab_size].float(), -1)  # not the padding columns
    return lp.gather(-1, ids[0, 1:, None]).squeeze(-1).tolist()


# ---- the loop, end to end ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def labelled(work) -> dict:
    """The labeling stage as people run it: `label sample` puts pairs of the policy's responses in the database,
    `label add-user` makes two labelers, and two bots label every pair in the app over HTTP (--overlap 2)."""
    url = f"sqlite:///{work['dir'] / 'labels.db'}"
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet):
        main(["label", "sample", "--policy", str(work["policy"]), "--prompts", str(work["prompts"]), "--db", url,
              "--max-new-tokens", "8", "--seed", "3", "--device", "cpu", "--quiet"])
    tokens = []
    for name in ("ann", "bob"):
        with contextlib.redirect_stdout(io.StringIO()) as said:
            main(["label", "add-user", name, "--db", url])
        tokens.append(said.getvalue().strip())
    with open_db(url) as db:
        pairs = len(store.pairs(db))
    app, state = build_label_app(LabelServeConfig(db=url, overlap=2))
    try:
        with in_thread(app) as labeling:
            answered = [bot_labels(labeling.url, t, seed) for seed, t in enumerate(tokens)]
    finally:
        state.db.close()
    return {"url": url, "pairs": pairs, "answered": answered}


def test_people_label_one_round_runs_and_the_served_model_is_the_new_one(work, labelled, capsys):
    added, db_url = labelled["pairs"], labelled["url"]
    assert added > len(PROMPTS) // 2 and labelled["answered"] == [added, added]  # each bot labelled every pair

    out = work["dir"] / "round1"
    text = "the film was great and lovely."
    with model_server(work["policy"]) as live:
        url = live.url
        before = greedy(url, "the movie was")
        assert before == offline_greedy(work["policy"], "the movie was")
        code, err = run_loop(capsys, "--db", db_url, "--policy", work["dir"] / "policy", "--prompts", work["prompts"],
                             "--out", out, "--labeler", "oracle:vader", "--serve", url, "--serve-key", ADMIN, "--seed", "1", *ROUND)
        assert code == 0, err
        r = json.loads((out / "round.json").read_text())
        new = Path(r["checkpoint"])
        assert new == (out / "ppo" / "checkpoint").resolve() and (new / "model.safetensors").is_file()
        # the server now answers with the new weights: /v1/models names it, greedy text and logprobs are the new model's
        models = httpx.get(url + "/v1/models", timeout=10).json()["data"]
        assert [m["root"] for m in models] == [str(new)]
        assert r["served"] == {"url": url, "checkpoint": str(new), "reloaded": True,
                               "weights_sha256": load_checkpoint(new).info["weights_sha256"]}
        assert greedy(url, "the movie was") == offline_greedy(new, "the movie was")
        served = echo_logprobs(url, text)
        assert served == pytest.approx(offline_logprobs(new, text), abs=1e-4)
        assert served != pytest.approx(offline_logprobs(work["policy"], text), abs=1e-4)  # PPO moved the weights

    # the round's outputs and figures
    for name in ("config.json", "prefs.jsonl", "prompts.jsonl", "samples.jsonl", "reward/checkpoint", "ppo/checkpoint"):
        assert (out / name).exists(), name
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["command"] == "loop" and cfg["ppo_steps"] == 3 and cfg["serve_key"] == "***" and ADMIN not in json.dumps(cfg)
    prefs = [json.loads(l) for l in (out / "prefs.jsonl").read_text().splitlines()]
    assert r["labels"]["preferences"] == len(prefs) == 2 * added  # one line per labeler and pair (no 'can't tell')
    assert r["labels"]["labelers"] == ["ann", "bob"] and {p["labeler"] for p in prefs} == {"ann", "bob"}
    ev = r["eval"]
    held = len(PROMPTS) // 4
    assert ev["prompts"] == held and json.loads((out / "ppo" / "config.json").read_text())["eval_size"] == held
    # the win rates are what the held-out samples say: by the reward model's scores, and by VADER's (noiseless)
    samples = [json.loads(l) for l in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == held and not {s["prompt"] for s in samples} & set(trained_prompts(out))
    assert ev["reward_model"]["win_rate"] == pytest.approx(wins([s["reward_new"] for s in samples],
                                                                [s["reward_old"] for s in samples])["win_rate"])
    v = VaderScorer()
    by_vader = [(a > b) + 0.5 * (a == b) for a, b in zip(v.score([s["new"] for s in samples]), v.score([s["old"] for s in samples]))]
    assert ev["labeler"]["labeler"] == "oracle:vader" and ev["labeler"]["n"] == held
    assert ev["labeler"]["win_rate"] == pytest.approx(sum(by_vader) / held)
    assert 0 <= ev["reward_model"]["win_rate"] <= 1 and r["ppo"]["steps"] == 3 and r["ppo"]["final"]["kl"] >= 0
    assert 0 <= r["reward_model"]["val_accuracy"] <= 1
    # every rate comes with its count and 95% interval; a handful of items is said to be too few (stderr, even --quiet)
    rm = r["reward_model"]
    assert rm["val_accuracy_interval95"] == pytest.approx(wilson(rm["val_accuracy"] * rm["val_pairs"], rm["val_pairs"]))
    for w in (ev["reward_model"], ev["labeler"]):
        assert w["interval95"] == pytest.approx(wilson(w["win_rate"] * held, held))
    warned = [l for l in err.splitlines() if l.startswith("loop: warning:")]
    assert warned == [f"loop: warning: {w}" for w in r["warnings"]]
    assert sum(f"comes from {held} held-out prompts (95% interval" in w for w in warned) == 2, warned
    said = "\n".join(summary_lines(r))
    lo, hi = ev["reward_model"]["interval95"]
    assert f"{ev['reward_model']['win_rate']:.3f} on {held} held-out prompts (95% interval {lo:.2f}-{hi:.2f}) by the reward model" in said
    assert f"held-out pairwise accuracy {rm['val_accuracy']:.3f} on {rm['val_pairs']} pairs (95% interval" in said

    # a second round into the same folder is refused (one line, the round untouched); --force replaces it
    stamp = (out / "round.json").stat().st_mtime_ns
    code, err = run_loop(capsys, "--db", db_url, "--policy", work["dir"] / "policy", "--prompts", work["prompts"], "--out", out, *ROUND)
    assert code == 1 and err.count("\n") == 1 and "already holds a round" in err and "--force" in err
    assert (out / "round.json").stat().st_mtime_ns == stamp
    code, err = run_loop(capsys, "--db", db_url, "--policy", out / "ppo", "--prompts", work["prompts"], "--out", out, "--force", *ROUND)
    assert code == 1 and err.count("\n") == 1 and "is inside --out" in err
    assert (out / "round.json").stat().st_mtime_ns == stamp and (new / "model.safetensors").is_file()


def trained_prompts(out: Path) -> list[str]:
    """The prompts PPO trained on: its prompt file less the held-out tail."""
    lines = [json.loads(l)["prompt"] for l in (out / "prompts.jsonl").read_text().splitlines()]
    return lines[: len(lines) - json.loads((out / "ppo" / "config.json").read_text())["eval_size"]]


# ---- what is refused -----------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bad_input_is_one_line_and_writes_nothing(work, labelled, tmp_path, capsys):
    empty = f"sqlite:///{tmp_path / 'empty.db'}"
    db = open_db(empty)
    store.import_pairs(db, [{"prompt": "the film was", "a": " great", "b": " awful"}], source="test")
    store.add_user(db, "ann")
    db.close()
    labelled = labelled["url"]
    once = tmp_path / "once.txt"
    once.write_text("the film was\nthe film was\n")
    ck = load_checkpoint(work["policy"])
    ck.model.add_scalar_head("reward")
    reward = save_checkpoint(tmp_path / "reward", ck.model, ck.tokenizer, meta={"kind": "reward_model"})
    base = ["--policy", work["policy"], "--prompts", work["prompts"], *ROUND]
    cases = [
        (["--db", empty, *base], "no labels to learn from"),
        (["--db", f"sqlite:///{tmp_path / 'nothing.db'}", *base], "--db: no labels database at"),
        (["--db", labelled, *base, "--policy", tmp_path / "no-policy"], "--policy: checkpoint not found"),
        (["--db", labelled, *base, "--policy", reward], "is a reward model (it has a 'reward' head)"),
        (["--db", labelled, *base, "--serve", f"http://127.0.0.1:{free_port()}"], "no server answering"),
        (["--db", labelled, *base, "--prompts", tmp_path / "none.jsonl"], "--prompts: file not found"),
        (["--db", labelled, *base, "--labeler", "psychic"], "unknown labeler 'psychic'"),
        (["--db", labelled, *base, "--labeler", f"oracle:classifier:{tmp_path}"], "--labeler: no classifier at"),
        (["--db", labelled, *base, "--prompts", once], "1 distinct prompt; a round needs at least 2"),
        (["--db", labelled, *base, "--ppo-minibatch", "9"], "--ppo-minibatch must be in [1, --ppo-batch 8], got 9"),
    ]
    code, err = run_loop(capsys, "--db", labelled, *base, "--aggregate", "mean", "--out", tmp_path / "agg")
    assert code == 2 and err.count("\n") == 1 and "argument --aggregate: invalid choice: 'mean'" in err, err  # argparse's
    for i, (args, says) in enumerate(cases):
        out = tmp_path / f"out{i}"
        code, err = run_loop(capsys, *args, "--out", out)
        assert code == 1 and err.count("\n") == 1 and says in err, (args, err)
        assert set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", err)) <= loop_flags(), err  # it suggests loop's flags only
        assert not out.exists(), args


def loop_flags() -> set[str]:
    """Every flag `nextbit loop` has, from the parser the CLI builds."""
    import argparse

    from nextbit import commands
    from nextbit.cli import build_parser

    parser = build_parser({"loop": commands.COMMANDS["loop"]})
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["loop"]
    return {o for a in sub._actions for o in a.option_strings}


@pytest.mark.parametrize("stage, flags, says", [
    ("reward", ["--reward-steps", "3"], "lower --reward-lr"),  # its loss made NaN below, as too high an LR makes it
    ("ppo", ["--ppo-lr", "1e30", "--ppo-epochs", "2", "--reward-steps", "1"], "lower --ppo-lr"),
])
def test_a_stage_that_fails_names_the_rounds_flags(work, labelled, tmp_path, capsys, monkeypatch, stage, flags, says):
    """A stage's error suggests the flag of `nextbit loop` that sets it (--reward-lr, not `nextbit reward`'s --lr),
    and every flag it names is one of loop's."""
    import nextbit.align.reward as R

    if stage == "reward":
        real = R.bradley_terry_loss
        monkeypatch.setattr(R, "bradley_terry_loss", lambda *a, **kw: real(*a, **kw) * float("nan"))
    out = tmp_path / "out"
    code, err = run_loop(capsys, "--db", labelled["url"], "--policy", work["policy"], "--prompts", work["prompts"],
                         "--out", out, *ROUND, "--ppo-steps", "1", *flags)
    assert code == 1 and err.count("\n") == 1 and f"the {stage} stage:" in err and says in err, err
    assert set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", err)) <= loop_flags(), err
    assert not out.exists()


def test_a_server_that_refuses_the_key_is_refused_before_the_round(work, labelled, tmp_path, capsys):
    labelled = labelled["url"]
    with model_server(work["policy"]) as live:
        url = live.url
        code, err = run_loop(capsys, "--db", labelled, "--policy", work["policy"], "--prompts", work["prompts"],
                             "--out", tmp_path / "out", "--serve", url + "/v1", "--serve-key", "wrong", *ROUND)
        assert code == 1 and err.count("\n") == 1 and "--serve-key: the server at" in err and "refused the admin key" in err
        assert not (tmp_path / "out").exists()
        assert [m["root"] for m in httpx.get(url + "/v1/models", timeout=10).json()["data"]] == [str(work["policy"])]


def test_a_server_gone_by_the_end_of_the_round_is_one_line_and_the_round_is_kept(work, labelled, tmp_path, capsys, monkeypatch):
    """The server answered before the round and is gone when the round is done: the checkpoint and round.json stay,
    round.json says the reload did not happen, and the error is one line that names the new policy."""
    import nextbit.recipes.loop as L

    labelled = labelled["url"]
    out = tmp_path / "out"
    with model_server(work["policy"]) as live:
        real = L.run_round

        def then_the_server_goes(*a, **kw):
            result = real(*a, **kw)
            live.stop()
            return result

        monkeypatch.setattr(L, "run_round", then_the_server_goes)
        code, err = run_loop(capsys, "--db", labelled, "--policy", work["policy"], "--prompts", work["prompts"], "--out", out,
                             "--serve", live.url, "--serve-key", ADMIN, *ROUND, "--ppo-steps", "1", "--reward-steps", "1")
    errors = [l for l in err.splitlines() if not l.startswith("loop: warning:")]  # the round's figures' caveats
    assert code == 1 and len(errors) == 1 and "no server answering" in err, err
    r = json.loads((out / "round.json").read_text())
    assert f"the new policy is written: {r['checkpoint']}" in err
    assert r["served"]["reloaded"] is False and (Path(r["checkpoint"]) / "model.safetensors").is_file()
    assert load_checkpoint(r["checkpoint"]).info["meta"]["finished"] is True


def test_win_rates_count_ties_half():
    assert wins([1.0, 2.0, 3.0, 0.0], [0.0, 2.0, 5.0, -1.0]) == {
        "win_rate": 0.625, "wins": 0.5, "ties": 0.25, "losses": 0.25, "n": 4, "interval95": list(wilson(2.5, 4)),
        "mean_new": 1.5, "mean_old": 1.5}
    judge = OracleLabeler(VaderScorer(), bt_scale=0.0, random_frac=0.0)
    same, _ = labeler_wins(judge, ["p"] * 2, ["good fun", "awful"], ["good fun", "awful"])
    assert same["win_rate"] == 0.5 and same["ties"] == 1.0
    better, js = labeler_wins(judge, ["p"] * 2, ["a wonderful film", "great"], ["a dreadful film", "the"])
    assert better["win_rate"] == 1.0 and [j.preferred for j in js] == [0, 0]


def test_only_rates_from_too_few_items_are_warned_about():
    """A 95% interval wider than 0.3 is warned about, whatever the rate; enough items are not."""
    def result(pairs, prompts):
        acc, win = 0.75, 0.6
        return {"reward_model": {"val_accuracy": acc, "val_pairs": pairs, "val_accuracy_interval95": list(wilson(acc * pairs, pairs))},
                "eval": {"reward_model": {"win_rate": win, "n": prompts, "interval95": list(wilson(win * prompts, prompts))}}}

    assert small_number_warnings(result(400, 400)) == []
    few = small_number_warnings(result(3, 6))
    assert len(few) == 2 and "from 3 pairs" in few[0] and "--reward-val-frac" in few[0]
    assert "from 6 held-out prompts" in few[1] and "--heldout-frac" in few[1]
    assert len(small_number_warnings(result(400, 20))) == 1  # 0.6 on 20: 0.39-0.78
