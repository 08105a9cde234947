"""SFT, reward model, DPO and PPO on a tiny model and a toy sentiment task: direction, not luck (fixed seeds).

The toy task: prompts like "the film was", positive completions (" great and lovely.") and negative ones
(" awful and dull."). SFT teaches a random tiny model to produce both; the reward model learns that
positive beats negative; DPO and PPO move the policy towards positive completions.
"""

import itertools
import json
import time
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nextbit.align.dpo import DPOConfig, dpo
from nextbit.align.ppo import PPOConfig, ppo
from nextbit.align.reward import RewardConfig, score_texts, train_reward
from nextbit.align.sft import SFTConfig, sft
from nextbit.core.checkpoint import load_checkpoint, save_checkpoint
from nextbit.core.config import ModelConfig
from nextbit.core.errors import NextbitError
from nextbit.core.model import GPT
from nextbit.core.tokenizer import train_tokenizer
from nextbit.infer.decoding import SamplingParams
from nextbit.prefs.formats import load_preferences
from nextbit.prefs.pairs import sample_responses
from nextbit.train.loop import LoopConfig

from conftest import interrupt_cli, run_cli

ROOT = Path(__file__).resolve().parents[1]
POS = ["great", "wonderful", "excellent", "superb", "lovely", "brilliant"]
NEG = ["awful", "terrible", "boring", "dreadful", "bad", "dull"]
SUBJ = ["the movie", "the film", "this show", "the acting", "the plot", "the ending"]
VERB = ["was", "is", "seemed", "felt"]
PROMPTS = [f"{s} {v}" for s, v in itertools.product(SUBJ, VERB)]


def completion(words, i):
    return f" {words[i % 6]} and {words[(i * 5 + 1) % 6]}."


def loop(**kw):
    return LoopConfig(**{"steps": 0, "device": "cpu", "quiet": True, "seed": 0, "weight_decay": 0.0, **kw})


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and do not fight a busy machine); restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("align")
    corpus = [p + completion(w, i) for i, (p, w) in enumerate(itertools.product(PROMPTS, [POS, NEG] * 3))]
    tok = train_tokenizer(corpus * 5, 320)
    model = GPT(ModelConfig(depth=2, vocab_size=320, width=64, n_head=2, seq_len=64))
    model.reset_parameters(seed=0)
    save_checkpoint(d / "base", model, tok)
    sft_rows = [{"prompt": p, "completion": completion(POS if i % 2 else NEG, i // 2)} for i, p in enumerate(PROMPTS * 12)]
    prefs = [{"prompt": p, "chosen": completion(POS, i), "rejected": completion(NEG, i + 3)} for i, p in enumerate(PROMPTS * 12)]
    return {"dir": d, "tok": tok, "sft": jsonl(d / "sft.jsonl", sft_rows), "prefs": jsonl(d / "prefs.jsonl", prefs),
            "prompts": jsonl(d / "prompts.jsonl", [{"prompt": p} for p in PROMPTS * 3])}


@pytest.fixture(scope="module")
def sft_run(work):
    out = work["dir"] / "sft"
    res = sft(SFTConfig(init_from=str(work["dir"] / "base"), data=work["sft"], out=str(out), batch_size=16, epochs=8,
                        loop=loop(lr=3e-3, eval_every=20)))
    return out, res


@pytest.fixture(scope="module")
def rm_run(work, sft_run):
    out = work["dir"] / "rm"
    res = train_reward(RewardConfig(init_from=str(sft_run[0]), data=work["prefs"], out=str(out), batch_size=16, epochs=2,
                                    val_frac=0.15, loop=loop(lr=2e-3)))
    return out, res


def test_sft_learns_the_completions(work, sft_run):
    out, res = sft_run
    evals = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if "val_loss" in l]
    assert evals[-1]["val_loss"] < 0.5 * evals[0]["val_loss"]
    assert json.loads((out / "config.json").read_text())["command"] == "sft"
    assert (out / "loss.png").is_file()
    ck = load_checkpoint(out)
    comps = sample_responses(ck.model, ck.tokenizer, PROMPTS, SamplingParams(10, 1.0, seed=0), n=4)
    texts = [c.text for cs in comps for c in cs]
    pos = sum(any(w in t for w in POS) for t in texts)
    neg = sum(any(w in t for w in NEG) for t in texts)
    assert pos > 10 and neg > 10  # it says both, so there is something to prefer


def test_reward_model_separates_clear_pairs(work, rm_run):
    out, res = rm_run
    assert res["val_accuracy"] >= 0.9
    ck = load_checkpoint(out)
    assert "reward" in ck.model.heads and ck.info["meta"]["normalized"]
    r = score_texts(ck.model, ck.tokenizer, ["the film was"] * 2, [completion(POS, 1), completion(NEG, 2)])
    assert r[0] > r[1]
    # normalised over the training responses: mean ~0, std ~1
    prefs = load_preferences(work["prefs"])
    s = score_texts(ck.model, ck.tokenizer, [p.prompt for p in prefs] * 2, [p.chosen for p in prefs] + [p.rejected for p in prefs])
    assert abs(float(s.mean())) < 0.2 and 0.7 < float(s.std()) < 1.3


def test_dpo_raises_the_chosen_margin(work, sft_run):
    out = work["dir"] / "dpo"
    res = dpo(DPOConfig(init_from=str(sft_run[0]), data=work["prefs"], out=str(out), batch_size=16, epochs=1, beta=0.1,
                        val_frac=0.1, loop=loop(lr=1e-3, eval_every=5)))
    evals = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if "val_margin" in l]
    assert abs(evals[0]["val_margin"]) < evals[-1]["val_margin"]
    assert evals[-1]["val_margin"] > 0.5 and evals[-1]["val_accuracy"] > 0.9


def test_ppo_raises_reward_within_kl_bound(work, sft_run, rm_run):
    out = work["dir"] / "ppo"
    summary = ppo(PPOConfig(policy=str(sft_run[0]), reward_model=str(rm_run[0]), prompts=work["prompts"], out=str(out),
                            oracles=["vader"], steps=12, batch_size=32, minibatch=16, ppo_epochs=2, lr=5e-4,
                            max_new_tokens=8, init_kl_coef=0.1, target_kl=3.0, horizon=1000, eval_every=6,
                            eval_size=24, device="cpu", seed=0, quiet=True))
    start, final = summary["start"], summary["final"]
    assert final["reward"] > start["reward"] + 0.5
    assert final["oracle_vader"] > start["oracle_vader"]  # the independent oracle agrees here (no hacking on a toy)
    steps = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 12 and all(s["kl"] >= 0 for s in steps)
    for k in ("reward", "kl", "entropy", "response_length", "value_loss", "clipfrac", "kl_coef", "oracle_vader"):
        assert k in steps[-1]
    assert max(s["kl"] for s in steps) < 3 * 3.0  # the leash holds: KL stays near its target
    assert (out / "overoptimization.png").is_file() and (out / "ppo.png").is_file()
    assert "value" in load_checkpoint(out).model.heads


def test_ppo_resume_continues_exactly(work, sft_run, rm_run, tmp_path):
    """Stopped after 2 of 4 steps and resumed, PPO logs the same steps and ends with the same weights and beta as an
    uninterrupted run: policy, value head, optimizer, beta and every step's randomness survive the checkpoint."""
    def cfg(out, **kw):
        return PPOConfig(policy=str(sft_run[0]), reward_model=str(rm_run[0]), prompts=work["prompts"], out=str(out), steps=4,
                         batch_size=8, minibatch=4, ppo_epochs=2, lr=5e-4, max_new_tokens=6, target_kl=3.0, horizon=16,
                         eval_every=2, eval_size=8, device="cpu", seed=3, quiet=True, **kw)

    whole = ppo(cfg(tmp_path / "whole"))
    first = ppo(cfg(tmp_path / "split", stop_after=2))
    assert first == {"stopped_early": True, "interrupted": False, "step": 2}
    assert not (tmp_path / "split" / "summary.json").exists()
    with pytest.raises(NextbitError, match="already has a checkpoint"):
        ppo(cfg(tmp_path / "split"))
    rest = ppo(cfg(tmp_path / "split", resume=True))
    assert rest["resumed_from"] == 2 and rest["kl_coef"] == whole["kl_coef"] and rest["final"] == whole["final"]
    assert rest["start"] == whole["start"]

    def records(out, name):
        timing = ("elapsed", "gen_share", "samples_s")
        return [{k: v for k, v in json.loads(l).items() if k not in timing} for l in (out / name).read_text().splitlines()]

    for name in ("metrics.jsonl", "eval.jsonl"):
        assert records(tmp_path / "split", name) == records(tmp_path / "whole", name), name
    a, b = load_checkpoint(tmp_path / "whole").model.state_dict(), load_checkpoint(tmp_path / "split").model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(NextbitError, match="already finished"):
        ppo(cfg(tmp_path / "split", resume=True))
    with pytest.raises(NextbitError, match="other weights"):
        ppo(PPOConfig(**{**cfg(tmp_path / "whole").__dict__, "policy": str(work["dir"] / "base"), "steps": 6, "resume": True}))


def test_ppo_ctrl_c_saves_a_checkpoint_to_resume(work, sft_run, rm_run, tmp_path):
    """A real SIGINT to `nextbit ppo`: it finishes the step, writes a checkpoint, exits 130 with one line; --resume goes on."""
    out = tmp_path / "ppo"
    metrics = out / "metrics.jsonl"
    args = ["ppo", "--policy", sft_run[0], "--reward-model", rm_run[0], "--prompts", work["prompts"], "--out", out,
            "--batch-size", "4", "--minibatch", "4", "--ppo-epochs", "1", "--max-new-tokens", "4", "--eval-size", "0",
            "--device", "cpu", "--quiet"]
    rc, err = interrupt_cli(*args, "--steps", "1000", metrics=metrics, lines=2)
    assert rc == 130, err
    assert "Traceback" not in err and "--resume" in err
    step = load_checkpoint(out, with_train_state=True).train_state["train"]["step"]
    logged = [json.loads(l)["step"] for l in metrics.read_text().splitlines()]
    assert step >= 2 and logged == list(range(1, step + 1))  # the checkpoint is at the last finished step
    r = run_cli(*args, "--steps", step + 1, "--resume")
    assert r.returncode == 0, r.stderr
    assert [json.loads(l)["step"] for l in metrics.read_text().splitlines()] == list(range(1, step + 2))


@pytest.mark.parametrize("command", ["sft", "reward", "dpo"])
def test_two_processes_train_like_one(work, sft_run, tmp_path, command):
    """torchrun with 2 gloo processes (DDP, each global batch split across them, micro-batches of 2) ends with the same
    weights and logs the same losses as one process: every stage's loss is its exact share of the global batch's mean."""
    init = work["dir"] / "base" if command == "sft" else sft_run[0]
    data = work["sft"] if command == "sft" else work["prefs"]
    args = [command, "--init-from", init, "--data", data, "--batch-size", "8", "--micro-batch", "2", "--steps", "3", "--lr", "3e-3",
            "--warmup", "0", "--eval-every", "0", "--val-frac", "0.1", "--device", "cpu", "--seed", "0", "--quiet"]
    one = run_cli(*args, "--out", tmp_path / "one")
    assert one.returncode == 0, one.stderr
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "nextbit",
                          *map(str, args), "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "config.json").read_text())["world_size"] == 2
    a, b = load_checkpoint(tmp_path / "one").model.state_dict(), load_checkpoint(tmp_path / "two").model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k
    losses = [[json.loads(l)["loss"] for l in (tmp_path / run / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
              for run in ("one", "two")]
    assert len(losses[0]) == 3 and losses[0] == pytest.approx(losses[1], rel=1e-4)
    if command == "reward":  # the main process alone normalised the head and wrote eval.json
        assert json.loads((tmp_path / "two" / "eval.json").read_text())["val_accuracy"] == json.loads((tmp_path / "one" / "eval.json").read_text())["val_accuracy"]


def test_batch_share_weights_give_the_global_mean():
    """Unequal micro-batches (tokens, pairs) weighted by `share` sum to the global batch's mean, for any split."""
    from nextbit.train.batches import accum_for, shard_rows, share

    values = torch.arange(1.0, 11.0)  # one loss per unit, 10 units in the global batch
    want = values.mean()
    for world in (1, 2):
        micro, accum = accum_for(10, 3, world)
        total = 0.0
        for rank in range(world):
            for m in range(accum):
                rows = shard_rows(list(range(10)), m, accum, rank, world)
                total += values[rows].mean() * share(len(rows), 10, accum, world) / accum / world
        assert torch.isclose(total, want), world
    with pytest.raises(NextbitError, match="multiple of the number of processes"):
        accum_for(9, 0, 2)


def test_cli_errors_are_one_line(work, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "chosen": "a", "rejected": "b"}\n{"prompt": "x", "chosen": "a"}\n')
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "nextbit", "reward", "--init-from", str(work["dir"] / "base"), "--data", str(bad),
                        "--out", str(tmp_path / "rm")], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 1
    assert r.stderr.strip() == f"nextbit: error: {bad}:2: missing field 'rejected'"
    assert not (tmp_path / "rm" / "checkpoint").exists()


# ---- the shared stage setup (issue 9) ------------------------------------------------------------------------------
def stage_run(command, work, out, rows=None, **kw):
    """Run sft / reward / dpo from the base model on `rows` (default: the module's data); returns (config, result)."""
    data = {"sft": work["sft"], "reward": work["prefs"], "dpo": work["prefs"]}[command]
    if rows is not None:
        data = jsonl(out.parent / f"{out.name}.jsonl", rows)
    make, run = {"sft": (SFTConfig, sft), "reward": (RewardConfig, train_reward), "dpo": (DPOConfig, dpo)}[command]
    loop_kw = {k: kw.pop(k) for k in list(kw) if k in LoopConfig.__dataclass_fields__}
    cfg = make(init_from=str(work["dir"] / "base"), data=data, out=str(out), batch_size=4, loop=loop(**loop_kw), **kw)
    return cfg, run(cfg)


def few_rows(command, n=8):
    if command == "sft":
        return [{"prompt": p, "completion": completion(POS, i)} for i, p in enumerate(PROMPTS[:n])]
    return [{"prompt": p, "chosen": completion(POS, i), "rejected": completion(NEG, i)} for i, p in enumerate(PROMPTS[:n])]


@pytest.mark.parametrize("command", ["sft", "reward", "dpo"])
def test_stage_resolves_steps_and_lr_into_a_copy(work, tmp_path, command):
    """--steps 0 and --lr not given are resolved into a copy that config.json records; the caller's config is left
    as it was."""
    import copy

    from nextbit.core.config import default_lr
    from nextbit.train.stage import LR_SCALE

    cfg, res = stage_run(command, work, tmp_path / "run", few_rows(command), epochs=1.5, val_frac=0.0)
    before = copy.deepcopy(cfg)
    rec = json.loads((tmp_path / "run" / "config.json").read_text())
    assert rec["loop"]["steps"] == res["step"] == 3  # ceil(1.5 passes x 8 rows / 4 a step)
    assert rec["loop"]["lr"] == pytest.approx(LR_SCALE[command] * default_lr(64))
    assert cfg == before and cfg.loop.steps == 0 and cfg.loop.lr is None


@pytest.mark.parametrize("command", ["sft", "reward", "dpo"])
def test_time_budget_means_the_same_in_every_stage(work, tmp_path, command):
    """With --time-budget the budget decides how long a stage trains (two default epochs of 8 rows would take a
    fraction of a second); --epochs, given, caps it."""
    from nextbit.train.stage import UNCAPPED

    t0 = time.time()
    cfg, res = stage_run(command, work, tmp_path / "budget", few_rows(command), time_budget=3, val_frac=0.0)
    assert 0.8 * 3 < time.time() - t0 < 1.35 * 3  # the budget counts from the stage's start (its checkpoint read too)
    assert res["step"] > 4 and not res["stopped_early"]
    assert json.loads((tmp_path / "budget" / "config.json").read_text())["loop"]["steps"] == UNCAPPED
    assert cfg.loop.steps == 0 and cfg.epochs is None
    _, capped = stage_run(command, work, tmp_path / "capped", few_rows(command), time_budget=30, epochs=1, val_frac=0.0)
    assert capped["step"] == 2  # one pass over 8 rows, 4 a step, long before the budget


def test_a_failed_resume_leaves_config_json_as_it_was(work, tmp_path):
    """config.json is written only once the --resume checkpoint is checked: a refused resume changes nothing."""
    stage_run("sft", work, tmp_path / "run", few_rows("sft"), steps=2, val_frac=0.0)
    before = (tmp_path / "run" / "config.json").read_text()
    with pytest.raises(NextbitError, match="already finished"):
        stage_run("sft", work, tmp_path / "run", few_rows("sft"), steps=2, lr=1e-3, resume=True, val_frac=0.0)
    assert (tmp_path / "run" / "config.json").read_text() == before


@pytest.mark.parametrize("command", ["reward", "dpo"])
def test_pairs_with_chosen_equal_to_rejected(work, tmp_path, capsys, command):
    """Such pairs hold no preference: dropped with a count; a file with nothing else is refused in one line."""
    same = [{"prompt": p, "chosen": completion(POS, i), "rejected": completion(POS, i)} for i, p in enumerate(PROMPTS[:6])]
    cfg, res = stage_run(command, work, tmp_path / "some", same + few_rows(command), steps=1, val_frac=0.0)
    assert "dropped 6 of 14 pairs whose chosen and rejected responses are the same" in capsys.readouterr().err
    assert json.loads((tmp_path / "some" / "config.json").read_text())["pairs"] == 8
    with pytest.raises(NextbitError, match="every pair .*the same chosen and rejected response"):
        stage_run(command, work, tmp_path / "all", same * 7, steps=1)
    assert not (tmp_path / "all").exists()


def test_reward_margins_say_their_units(rm_run):
    """The margin logged during training is in the raw head's units, the final one after normalisation is
    `val_margin_normalised`, and eval.json holds both: the raw one is what was printed and logged last."""
    out, res = rm_run
    ev = json.loads((out / "eval.json").read_text())
    logged = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if "val_margin" in l]
    assert ev["val_margin"] == logged[-1]["val_margin"] == res["val_margin"]
    assert ev["val_margin_normalised"] == pytest.approx(ev["val_margin"] / ev["raw_reward_std"], rel=1e-3)
    assert load_checkpoint(out).info["meta"]["pool"] == "last"


def test_ppo_refuses_checkpoints_of_the_wrong_kind(work, sft_run, rm_run, tmp_path):
    """--policy refuses a reward model, --reward-model refuses a policy, each in one line naming the flag."""
    kw = dict(prompts=work["prompts"], out=str(tmp_path / "ppo"), steps=1, batch_size=4, minibatch=4, device="cpu", quiet=True)
    with pytest.raises(NextbitError, match=r"^--policy .* is a reward model"):
        ppo(PPOConfig(policy=str(rm_run[0]), reward_model=str(rm_run[0]), **kw))
    with pytest.raises(NextbitError, match=r"^--reward-model .* has no 'reward' head"):
        ppo(PPOConfig(policy=str(sft_run[0]), reward_model=str(sft_run[0]), **kw))
    assert not (tmp_path / "ppo").exists()


def test_every_reader_of_a_reward_model_checks_it_by_one_rule(sft_run, rm_run):
    """ppo's --reward-model and label serve's --reward read a reward model through one check (align/reward.py): the
    same one-line refusal of a checkpoint without a reward head, naming the caller's flag; the model comes back frozen."""
    from nextbit.align.reward import is_reward_model, load_reward_model
    from nextbit.label.reward_probs import RewardProbs

    lm, rm = str(sft_run[0]), str(rm_run[0])
    refusal = "{} " + lm + " has no 'reward' head; train one with `nextbit reward`"
    with pytest.raises(NextbitError) as e:
        load_reward_model(lm, "cpu", load_checkpoint(lm).tokenizer)
    assert str(e.value) == refusal.format("--reward-model")
    with pytest.raises(NextbitError) as e:
        RewardProbs(lm)
    assert str(e.value) == refusal.format("--reward")
    model = RewardProbs(rm).model.model
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert is_reward_model(load_checkpoint(rm)) and not is_reward_model(load_checkpoint(lm))


def test_ppo_reward_model_with_another_tokenizer_names_both_the_right_way_round(work, sft_run, tmp_path):
    from nextbit.align.reward import HEAD

    other = train_tokenizer(["a different corpus of words " * 20, "and another line of text"], 300)
    m = GPT(ModelConfig(depth=1, vocab_size=320, width=64, n_head=2, seq_len=64))
    m.add_scalar_head(HEAD)
    save_checkpoint(tmp_path / "rm", m, other)
    policy_hash = load_checkpoint(sft_run[0]).tokenizer.hash
    with pytest.raises(NextbitError) as e:
        ppo(PPOConfig(policy=str(sft_run[0]), reward_model=str(tmp_path / "rm"), prompts=work["prompts"], out=str(tmp_path / "ppo"),
                      device="cpu", quiet=True))
    assert str(e.value) == (f"tokenizer mismatch: --reward-model {tmp_path / 'rm'} was made with tokenizer {other.hash}, "
                            f"but the policy's tokenizer is {policy_hash}")


def test_ppo_default_eval_size_scales_with_the_prompt_file(work, sft_run, rm_run, tmp_path):
    """A 50-prompt file with the default --eval-size holds out 5 prompts (a tenth, 1..128); an explicit --eval-size
    that takes every prompt is still refused."""
    prompts = jsonl(tmp_path / "p50.jsonl", [{"prompt": PROMPTS[i % len(PROMPTS)]} for i in range(50)])
    kw = dict(policy=str(sft_run[0]), reward_model=str(rm_run[0]), prompts=prompts, steps=1, batch_size=4, minibatch=4,
              ppo_epochs=1, max_new_tokens=4, device="cpu", quiet=True)
    ppo(PPOConfig(out=str(tmp_path / "auto"), **kw))
    rec = json.loads((tmp_path / "auto" / "config.json").read_text())
    assert (rec["eval_size"], rec["eval_prompts"], rec["train_prompts"]) == (5, 5, 45)
    assert len((tmp_path / "auto" / "eval.jsonl").read_text().splitlines()) == 2  # start and end
    with pytest.raises(NextbitError, match="--eval-size 50 leaves no training prompts"):
        ppo(PPOConfig(out=str(tmp_path / "all"), eval_size=50, **kw))


@pytest.mark.parametrize("command, flags, says", [
    ("sft", ["--val-frac", "1.5"], "--val-frac must be in [0, 1), got 1.5"),
    ("sft", ["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    ("sft", ["--micro-batch", "-1"], "--micro-batch must be >= 0"),
    ("sft", ["--max-len", "1"], "--max-len must be in [2, 64]"),
    ("sft", ["--epochs", "0"], "--epochs must be > 0"),
    ("reward", ["--pool", "max"], "argument --pool: invalid choice: 'max' (choose from 'last', 'mean')"),
    ("dpo", ["--beta", "0"], "--beta must be > 0, got 0.0"),
    ("ppo", ["--minibatch", "0"], "--minibatch must be in [1, --batch-size 64], got 0"),
    ("ppo", ["--eval-size", "-2"], "--eval-size must be >= -1, got -2"),
    ("ppo", ["--lr", "0"], "--lr must be > 0, got 0"),  # not given is derived; 0 is no learning rate
    ("sft", ["--lr", "0"], "--lr must be > 0, got 0"),
    ("compare", ["--labeler", "web"], "--labeler web: unknown labeler 'web'"),
    ("compare", ["--random-frac", "2"], "--random-frac must be in [0, 1], got 2.0"),
])
def test_option_errors_name_the_flag(work, tmp_path, capsys, command, flags, says):
    """Bad options fail in one line that names the option as it is typed."""
    from nextbit.cli import main

    src = ["--init-from", work["dir"] / "base", "--data", work["sft"] if command == "sft" else work["prefs"]]
    if command in ("ppo", "compare"):
        src = ["--policy", work["dir"] / "base", "--prompts", work["prompts"]]
    argv = [command, *map(str, src), "--out", str(tmp_path / "run"), "--device", "cpu", *flags]
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    usage = says.startswith("argument ")  # argparse refuses a value not among a flag's choices: a usage error, exit 2
    assert e.value.code == (2 if usage else 1) and err.startswith(f"nextbit: error: {says}") and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


def test_progress_bars_do_not_repeat_the_command(work, sft_run, rm_run, tmp_path, capsys):
    """A run folder named like its command (`--out runs/reward`, `runs/ppo`, what `nextbit loop` writes) titles its
    progress bar once: "reward: ...", not "reward reward: ..."; another folder's name is shown beside the command."""
    import re

    def bars():
        err = capsys.readouterr().err
        return set(re.findall(r"(?:^|\r)([a-z][\w ]*?):\s+\d+%", err, re.M)), err

    capsys.readouterr()
    stage_run("reward", work, tmp_path / "reward", few_rows("reward"), steps=1, val_frac=0.0, quiet=False)
    assert bars()[0] == {"reward"}
    stage_run("reward", work, tmp_path / "rm1", few_rows("reward"), steps=1, val_frac=0.0, quiet=False)
    assert bars()[0] == {"reward rm1"}
    ppo(PPOConfig(policy=str(sft_run[0]), reward_model=str(rm_run[0]), prompts=work["prompts"], out=str(tmp_path / "ppo"),
                  steps=1, batch_size=4, minibatch=4, ppo_epochs=1, max_new_tokens=4, eval_size=4, device="cpu"))
    titles, err = bars()
    assert "ppo" in titles and "ppo ppo" not in err, titles
