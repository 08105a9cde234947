"""`nextbit eval lm`: lm-evaluation-harness through the API, with nextbit's two offline tasks, end to end."""

import json

import pytest

from conftest import run_cli, run_main

pytest.importorskip("lm_eval")
pytest.importorskip("uvicorn")

OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9",
           "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def checkpoint(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_lm") / "run"
    r = run_cli("train", "--data", dataset, "--out", out, "--steps", "3", "--depth", "1", "--width", "64", "--n-head", "2",
                "--seq-len", "128", "--batch-tokens", "256", "--device", "cpu", "--quiet")
    assert r.returncode == 0, r.stderr
    return out


def test_eval_lm_runs_both_nextbit_tasks_offline_through_an_in_process_server(checkpoint, tmp_path):
    out = tmp_path / "res"
    r = run_cli("eval", "lm", checkpoint, "--tasks", "imdb_sentiment", "stdlib_next_line", "--limit", "4", "--out", out,
                "--device", "cpu", env={**OFFLINE, "HF_HOME": str(tmp_path / "hf")}, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())["results"]
    assert 0 <= res["imdb_sentiment"]["acc,none"] <= 1 and 0 <= res["stdlib_next_line"]["exact_match,none"] <= 1
    assert "imdb_sentiment" in (out / "results.md").read_text() and "imdb_sentiment" in r.stdout
    labels = [json.loads(x)["label"] for x in (out / "tasks" / "imdb_sentiment.jsonl").read_text().splitlines()]
    assert len(labels) == 200 and sum(labels) == 100 and labels[:4] == [0, 1, 0, 1]  # balanced, so chance is 0.5
    rows = (out / "tasks" / "stdlib_next_line.jsonl").read_text().splitlines()
    assert rows and all(set(json.loads(x)) == {"context", "target"} for x in rows)


def test_eval_lm_bad_input_is_one_line(checkpoint, tmp_path):
    from test_cli import assert_one_line_error

    env = {**OFFLINE, "HF_HOME": str(tmp_path / "hf")}
    assert_one_line_error(run_main("eval", "lm", tmp_path / "nope"), "checkpoint not found")  # in this process: quick
    assert_one_line_error(run_main("eval", "lm", "--server", "http://127.0.0.1:9", "--out", tmp_path / "o"), "not answering")
    assert_one_line_error(run_cli("eval", "lm", checkpoint, "--tasks", "no_such_task_xyz", "--out", tmp_path / "o2", "--device", "cpu",
                                  env=env, timeout=300), "no task 'no_such_task_xyz'")
