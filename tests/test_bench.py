import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def test_preference_ceiling_learns_a_word_level_labeller(tmp_path):
    """The reference learner recovers a labeller that scores words (+1 per good word, -1 per bad word) from noisy
    comparisons, and reports held-out agreement with the noiseless judgement on the reward stage's split."""
    rng = np.random.default_rng(0)
    good, bad, filler = ["great", "superb", "moving"], ["awful", "dull", "mess"], [f"w{i}" for i in range(30)]
    rows = []
    for i in range(1000):
        texts, scores = [], []
        for _ in range(2):
            words = list(rng.choice(filler, 6)) + list(rng.choice(good + bad, rng.integers(1, 4)))
            texts.append(" ".join(rng.permutation(words)))
            scores.append(sum(w in good for w in words) - sum(w in bad for w in words) + rng.normal(0, 0.1))
        a_wins = rng.random() < 1 / (1 + np.exp(scores[1] - scores[0]))  # Bradley–Terry answers
        c, r = (0, 1) if a_wins else (1, 0)
        rows.append({"prompt": f"p{i}", "chosen": texts[c], "rejected": texts[r], "score_chosen": scores[c], "score_rejected": scores[r]})
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "preference_ceiling.py"), str(path), "--simulate-bt", "0.01"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res["train_pairs"] == 900 and res["heldout_pairs"] == 100
    assert res["best"] >= 0.8 and 0.6 < res["train_labels_agreeing_with_noiseless"] < 0.95
    clean = res["simulated_bt"]["0.01"]  # relabelled almost without Bradley–Terry noise (10% coin flips remain)
    assert clean["labels_agreeing_with_noiseless"] > res["train_labels_agreeing_with_noiseless"] and clean["best"] >= 0.85


def test_time_to_quality_reads_the_evaluations_of_two_training_runs(tmp_path):
    """The baseline's best validation loss sets the bar; the candidate's time is its first evaluation at or below
    it, training records (no val_loss) are ignored, and a candidate that never gets there has no ratio."""

    def metrics(name, evals):
        lines = [{"step": s, "loss": 9.0, "elapsed": t - 0.5} for t, _, s in evals]
        lines += [{"step": s, "val_loss": v, "val_bpb": v / 2, "elapsed": t} for t, v, s in evals]
        p = tmp_path / f"{name}.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in lines))
        return str(p)

    base = metrics("base", [(50, 5.0, 25), (100, 4.0, 50), (150, 3.5, 75), (200, 3.6, 100)])  # overfits after 150 s
    fast = metrics("fast", [(30, 4.5, 25), (60, 3.4, 50), (100, 3.3, 75)])
    slow = metrics("slow", [(30, 4.5, 25), (60, 3.9, 50)])
    run = lambda b, c: json.loads(subprocess.run([sys.executable, str(ROOT / "bench" / "time_to_quality.py"), b, c],
                                                 capture_output=True, text=True, timeout=60, check=True).stdout)
    r = run(base, fast)
    assert (r["baseline_best_val_loss"], r["baseline_seconds"], r["baseline_step"]) == (3.5, 150, 75)
    assert (r["candidate_seconds"], r["candidate_step"], r["ratio"]) == (60, 50, 0.4)
    assert r["candidate_best_val_loss"] == 3.3
    r = run(base, slow)
    assert r["candidate_seconds"] is None and r["ratio"] is None and r["candidate_best_val_loss"] == 3.9
