"""The learning-rate schedule follows a --time-budget whatever the --steps cap, and a --resume that changes the
schedule says so (and is exact where the schedule so far is unchanged: warmup-stable-decay in its stable phase)."""

import json
import time

import torch

from nextbit.core.shards import Dataset
from nextbit.train.pretrain import train

from conftest import small_train, weights


def records(run):
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]


def lr_factors(run):
    return [json.loads(l)["lr_factor"] for l in (run / "metrics.jsonl").read_text().splitlines() if '"lr_factor"' in l]


def test_time_budget_fits_warmup_and_decay_to_the_budget_not_the_cap(dataset, tmp_path):
    run = tmp_path / "run"
    result = train(small_train(dataset, run, steps=10**6, time_budget=8))
    f = lr_factors(run)
    assert result["step"] == len(f) and 10 < len(f) < 10**6
    assert max(f) > 0.95  # out of warmup (2% of the cap would be 20000 steps)
    peak = f.index(max(f))
    assert peak < len(f) // 4 and f[-1] < 0.35  # then decays towards the end of the budget
    assert f[len(f) // 2] < max(f) and f[-1] < f[len(f) // 2]


def test_extending_a_wsd_run_in_its_stable_phase_is_exact(dataset, tmp_path, capsys):
    """wsd, --steps 10 stopped at step 5 (before its decay, which starts at 8), resumed with --steps 20 == a straight
    20-step run, bit for bit."""
    straight = tmp_path / "straight"
    train(small_train(dataset, straight, steps=20, schedule="wsd"))
    split = tmp_path / "split"
    train(small_train(dataset, split, steps=10, schedule="wsd", stop_after=5))
    capsys.readouterr()
    train(small_train(dataset, split, steps=20, schedule="wsd", resume=True))
    err = capsys.readouterr().err
    assert "--steps 10 -> 20" in err and "continues exactly as a straight 20-step run would" in err
    a, b = weights(straight), weights(split)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_extending_a_finished_cosine_run_says_what_changes(dataset, tmp_path, capsys):
    run = tmp_path / "run"
    train(small_train(dataset, run, steps=6))
    capsys.readouterr()
    result = train(small_train(dataset, run, steps=12, resume=True))
    err = capsys.readouterr().err
    assert result["step"] == 12
    assert "--steps 6 -> 12" in err and "from step 6 on the run follows the new schedule" in err
    assert "not what a straight 12-step run would give" in err
    assert "factor 0.100 -> " in err  # the finished run had decayed to --min-lr-ratio
    capsys.readouterr()
    train(small_train(dataset, tmp_path / "plain", steps=6, stop_after=3))
    train(small_train(dataset, tmp_path / "plain", steps=6, resume=True))
    assert "note:" not in capsys.readouterr().err  # the same schedule: nothing to say


def test_time_budget_warns_when_it_will_not_reach_the_end_of_warmup(dataset, tmp_path, capsys):
    train(small_train(dataset, tmp_path / "run", steps=10**6, warmup=10**5, time_budget=0.5))
    out = capsys.readouterr().out
    assert out.count("fewer than --warmup 100000: the run will end before the learning rate peaks") == 1


def slow_evaluations(monkeypatch, seconds_per_split: float) -> list:
    """The held-out evaluation, slowed to `seconds_per_split` for the whole split (as a big validation split on a slow
    machine is), in proportion to the tokens it reads. Returns the list of tokens each call read."""
    from nextbit.train import pretrain

    real, reads = pretrain.evaluate_split, []  # tokens each call read (the budget's probe of the cost too)

    def slow(model, split, seq_len, max_tokens=None):
        out = real(model, split, seq_len, max_tokens)
        reads.append(out["val_tokens"])
        time.sleep(seconds_per_split * out["val_tokens"] / split.tokens)
        return out

    monkeypatch.setattr(pretrain, "evaluate_split", slow)
    return reads


def test_time_budget_counts_evaluations_and_ends_decayed(dataset, tmp_path, monkeypatch, capsys):
    """`--time-budget` is the wall time of the whole run, its evaluations and the final one included: with an
    evaluation that would take a third of the budget, evaluated every 10 steps, the run still ends within 10% of the
    budget, its learning rate decayed to --min-lr-ratio, and each evaluation reads the same cut of the split."""
    budget = 6.0
    reads = slow_evaluations(monkeypatch, budget / 3)
    run = tmp_path / "run"
    t0 = time.time()
    result = train(small_train(dataset, run, steps=10**6, time_budget=budget, eval_every=10, quiet=False))
    wall = time.time() - t0
    assert abs(wall - budget) <= 0.1 * budget, wall
    f = lr_factors(run)
    assert result["step"] == len(f) > 20
    assert f[-1] < 0.1 + 0.02  # the cosine decay finished (--min-lr-ratio 0.1)
    evals = [r["val_tokens"] for r in records(run) if "val_loss" in r]
    assert len(evals) == result["step"] // 10 + (result["step"] % 10 != 0) and len(set(evals)) == 1
    assert evals[0] < Dataset(dataset).split("val").tokens  # cut to fit: each reads less than the split
    assert "each of the run's about" in capsys.readouterr().out  # the cut is said


def test_time_budget_keeps_a_given_eval_size(dataset, tmp_path, monkeypatch):
    """--eval-tokens is the user's choice: a budget keeps it and makes room for it (the final evaluation too)."""
    budget = 4.0
    reads = slow_evaluations(monkeypatch, budget / 4)
    cfg = small_train(dataset, tmp_path / "run", steps=10**6, time_budget=budget)
    cfg.eval_tokens = 10**9  # more than the split: all of it, every time
    t0 = time.time()
    train(cfg)
    assert abs(time.time() - t0 - budget) <= 0.1 * budget
    evals = [r["val_tokens"] for r in records(tmp_path / "run") if "val_loss" in r]
    assert evals == [max(reads)] and evals[0] > 1000  # only the final evaluation, over the whole split
    assert lr_factors(tmp_path / "run")[-1] < 0.12


def test_time_budget_plans_evaluations_up_to_the_steps_cap(dataset, tmp_path, monkeypatch):
    """A --steps cap that ends the run long before the budget: its two evaluations fit easily, so neither is cut."""
    slow_evaluations(monkeypatch, 1.0)
    run = tmp_path / "run"
    result = train(small_train(dataset, run, steps=20, time_budget=120, eval_every=10))
    evals = [r["val_tokens"] for r in records(run) if "val_loss" in r]
    assert result["step"] == 20 and len(evals) == 2
    assert evals[0] == evals[1] > 0.95 * Dataset(dataset).split("val").tokens  # the whole split (whole windows)


def test_an_evaluation_at_the_first_step_is_planned_too(dataset, tmp_path, monkeypatch):
    """--eval-every 1: the first evaluation comes before a second step is timed; it is already cut to fit."""
    slow_evaluations(monkeypatch, 2.0)
    run = tmp_path / "run"
    t0 = time.time()
    train(small_train(dataset, run, steps=10**6, time_budget=5, eval_every=1))
    assert time.time() - t0 < 5 * 1.1
    evals = [r["val_tokens"] for r in records(run) if "val_loss" in r]
    assert len(set(evals)) == 1 and evals[0] < Dataset(dataset).split("val").tokens
