"""The learning-rate schedule follows a --time-budget whatever the --steps cap, and a --resume that changes the
schedule says so (and is exact where the schedule so far is unchanged: warmup-stable-decay in its stable phase)."""

import json

import torch

from nextbit.train.pretrain import train

from test_train import small_train, weights


def lr_factors(run):
    return [json.loads(l)["lr_factor"] for l in (run / "metrics.jsonl").read_text().splitlines() if '"lr_factor"' in l]


def test_time_budget_fits_warmup_and_decay_to_the_budget_not_the_cap(dataset, tmp_path):
    run = tmp_path / "run"
    result = train(small_train(dataset, run, steps=10**6, warmup=-1, time_budget=1.5))
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
