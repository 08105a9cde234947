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


def _bench_lines(script, *args, timeout=300):
    """Run a bench script on the CPU and return its JSON lines (the GPU benches' plumbing, checked before a lease)."""
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], capture_output=True, text=True, timeout=timeout, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    return [json.loads(l) for l in out.stdout.splitlines() if l.startswith("{")]


def test_gpu_benches_run_on_cpu_at_a_tiny_shape():
    """Every script bench/gpu_stages.sh runs works end to end at a tiny shape (nextbit's sides only: transformers is not a
    dependency), printing the figures the GPU session reads."""
    train = _bench_lines("train_vs_hf.py", "--preset", "2", "--batch", "2", "--seq-len", "32", "--vocab-size", "256", "--steps", "1",
                         "--warmup", "1", "--sides", "nextbit", "--loss-chunk", "0,16")
    assert [r["loss_chunk"] for r in train if r.get("side") == "nextbit"] == [0, 16]
    assert train[-1]["bench"] == "train_ratio" and train[-1]["nextbit_tokens_per_s"] > 0
    gen = _bench_lines("generate_vs_hf.py", "--preset", "2", "--vocab-size", "256", "--ctx", "64", "--batches", "1,3", "--prompt-len", "8",
                       "--new-tokens", "8", "--sides", "nextbit,base", "--baseline", "HEAD", "--warmup", "1", "--repeats", "1", "--ragged")
    assert {(r["side"], r["batch"]) for r in gen if r["bench"] == "generate_vs_hf"} == {(s, b) for s in ("nextbit", "base") for b in (1, 3)}
    assert all(r["tokens_per_s"] > 0 for r in gen if r["bench"] == "generate_vs_hf")
    prof = _bench_lines("profile_decode.py", "--preset", "2", "--vocab-size", "256", "--batches", "2", "--new-tokens", "4", "--top", "3")
    assert prof[0]["bench"] == "profile_decode" and prof[0]["ms_per_step_wall"] > 0 and len(prof) == 4
    mem = _bench_lines("train_memory.py", "--preset", "2", "--seq-len", "32", "--micro-batch", "2", "--vocab-size", "256", "--steps", "1",
                       "--warmup", "1", "--variants", "base,ac+chunk", "--loss-chunk", "16")
    assert [r["variant"] for r in mem] == ["base", "ac+chunk"] and all(r["tokens_per_s"] > 0 for r in mem)
    ppo = _bench_lines("ppo_throughput.py", "--preset", "2", "--batch", "4", "--minibatch", "2", "--new-tokens", "4", "--steps", "1",
                       "--ppo-epochs", "1")
    assert ppo[0]["samples_per_s"] > 0 and 0 < ppo[0]["generation_share"] < 1


def test_serve_load_runs_on_cpu_at_a_tiny_shape():
    """bench/serve_load.py end to end at a tiny shape (a random model, the live server as a subprocess, the offline
    engine; transformers is not a dependency, so not its side): every request completes with its tokens counted."""
    lines = _bench_lines("serve_load.py", "--random-model", "--depth", "1", "--width", "64", "--vocab-size", "300", "--ctx", "64",
                         "--clients", "1,3", "--requests-per-client", "2", "--prompt-len", "8", "--max-tokens", "4",
                         "--sides", "offline,server")
    rows = {(r["side"], r["clients"]): r for r in lines if r["bench"] == "serve_load"}
    assert set(rows) == {(s, c) for s in ("offline", "server") for c in (1, 3)}
    for (side, c), r in rows.items():
        assert r["requests"] == 2 * c and 0 < r["tokens"] <= 4 * r["requests"] and r["tokens_per_s"] > 0, r
    assert all(rows[("server", c)]["errors"] == 0 and rows[("server", c)]["ttft_ms_p50"] > 0 for c in (1, 3))
    summary = lines[-1]
    assert summary["bench"] == "serve_load_summary" and summary["clients"] == 3 and summary["vs_offline"] > 0


def test_batch_invariance_compares_alone_and_busy_at_a_tiny_shape():
    """bench/batch_invariance.py runs end to end and reports, per temperature, how many requests changed (the CPU
    figure is 0: a row's arithmetic does not depend on which other rows share its step)."""
    lines = _bench_lines("batch_invariance.py", "--depth", "1", "--width", "64", "--vocab-size", "300", "--ctx", "64",
                         "--requests", "6", "--slots", "3", "--new-tokens", "24")
    assert [r["temperature"] for r in lines] == [1.0, 0.0]
    assert all(r["peak_running"] == 3 and r["differ"] == 0 for r in lines)


def test_stop_strings_bench_runs_at_a_tiny_shape():
    """bench/stop_strings.py times the engine with and without a stop string that never matches; every row still
    runs to its length, so both sides count the same tokens."""
    lines = _bench_lines("stop_strings.py", "--depth", "1", "--width", "64", "--ctx", "64", "--rows", "2",
                         "--vocab-size", "300", "--repeats", "1")
    runs, summary = lines[:-1], lines[-1]
    assert [r["stop_strings"] for r in runs] == [0, 1] and all(r["tokens"] == 2 * 48 and r["tokens_per_s"] > 0 for r in runs)
    assert summary["bench"] == "stop_strings_cost" and summary["nextbit_with_over_without"] > 0


def test_the_docs_name_bench_scripts_results_and_stages_that_exist():
    """Every `bench/...` path that BENCHMARKS.md, its log, the README and docs/ name exists, and every stage they pass
    to bench/gpu_stages.sh is one of its stages (the names say what is measured; a rename must not leave one behind)."""
    import re
    stages = set(re.findall(r"^\s{4}([a-z_]+)\)", (ROOT / "bench" / "gpu_stages.sh").read_text(), re.M))
    assert {"train_vs_hf", "generate_vs_hf", "time_to_quality", "train_budget", "memory"} <= stages
    docs = [ROOT / "BENCHMARKS.md", ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
            *sorted((ROOT / "bench" / "results").rglob("README.md"))]
    missing = []
    for doc in docs:
        text = doc.read_text()
        for path in set(re.findall(r"(?<![\w/.])bench/[\w./-]*\w", text)):
            if not (ROOT / path).exists():
                missing.append(f"{doc.name}: {path}")
        for args in re.findall(r"bench/gpu_stages\.sh((?: [a-z_]+)+)", text):
            missing += [f"{doc.name}: stage {s}" for s in args.split() if s not in stages]
    assert not missing, missing


def test_serve_start_measures_each_engine_at_a_tiny_shape(tmp_path):
    """bench/serve_start.py starts `nextbit serve` on a random checkpoint (made once in --cache), once per engine, and
    records the start time and each process's peak memory: with an engine process there are two processes that
    hold memory, with a thread engine one."""
    args = [sys.executable, str(ROOT / "bench" / "serve_start.py"), "--cache", str(tmp_path / "cache"), "--label", "t",
            "--results", str(tmp_path), "--depth", "1", "--vocab-size", "320", "--tokenizer-vocab", "300", "--repeats", "1"]
    out = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {r["engine"]: r for r in map(json.loads, (tmp_path / "serve_start_t.jsonl").read_text().splitlines())}
    assert set(rows) == {"process", "thread"}
    for r in rows.values():
        assert r["start_s"] > 0 and r["cpu_s"] > 0 and r["peak_http_mib"] > 50 and r["peak_total_mib"] >= r["peak_http_mib"]
    assert rows["process"]["peak_engine_mib"] > 50 and rows["process"]["processes"] >= 2
    assert rows["thread"]["peak_engine_mib"] == 0 and rows["thread"]["processes"] == 1
    assert "process  1 starts" in out.stdout and "thread   1 starts" in out.stdout
