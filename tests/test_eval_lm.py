"""`nextbit eval lm`: lm-evaluation-harness through the API, with nextbit's two offline tasks, end to end."""

import json
import os
import subprocess
import time

import pytest

from conftest import assert_one_line_error, run_cli, run_main

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


KEY = "sk-eval-lm-right"


@pytest.fixture(scope="module")
def keyed_server(checkpoint):
    """`nextbit serve` in this process that requires KEY."""
    from live import uvicorn_in_thread

    from nextbit.serve.server import ServeConfig, build_app

    app, runner, _ = build_app(ServeConfig(checkpoint=str(checkpoint), api_key=KEY, max_batch=4, served_model_name="nb",
                                           device="cpu", engine="thread"))
    runner.start()
    try:
        with uvicorn_in_thread(app) as srv:
            yield srv.url
    finally:
        runner.stop()


def outside_git(tmp_path):
    """A working folder that is not in a git checkout (so the test below cannot pass by being inside one)."""
    d = tmp_path / "cwd"
    d.mkdir()
    assert subprocess.run(["git", "rev-parse"], cwd=d, capture_output=True).returncode != 0
    return d


def test_eval_lm_runs_both_nextbit_tasks_offline_through_an_in_process_server(checkpoint, tmp_path):
    out = tmp_path / "res"
    r = run_cli("eval", "lm", checkpoint, "--tasks", "imdb_sentiment", "stdlib_next_line", "--limit", "4", "--out", out,
                "--device", "cpu", env={**OFFLINE, "HF_HOME": str(tmp_path / "hf")}, cwd=outside_git(tmp_path), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "not a git repository" not in r.stderr + r.stdout  # lm-eval's `git describe` for its results' git hash
    res = json.loads((out / "results.json").read_text())["results"]
    assert 0 <= res["imdb_sentiment"]["acc,none"] <= 1 and 0 <= res["stdlib_next_line"]["exact_match,none"] <= 1
    assert "imdb_sentiment" in (out / "results.md").read_text() and "imdb_sentiment" in r.stdout
    labels = [json.loads(x)["label"] for x in (out / "tasks" / "imdb_sentiment.jsonl").read_text().splitlines()]
    assert len(labels) == 200 and sum(labels) == 100 and labels[:4] == [0, 1, 0, 1]  # balanced, so chance is 0.5
    rows = (out / "tasks" / "stdlib_next_line.jsonl").read_text().splitlines()
    assert rows and all(set(json.loads(x)) == {"context", "target"} for x in rows)


def test_eval_lm_bad_input_is_one_line(checkpoint, tmp_path):

    env = {**OFFLINE, "HF_HOME": str(tmp_path / "hf")}
    assert_one_line_error(run_main("eval", "lm", tmp_path / "nope"), "checkpoint not found")  # in this process: quick
    assert_one_line_error(run_main("eval", "lm", "--server", "http://127.0.0.1:9", "--out", tmp_path / "o"), "no server answering")
    assert_one_line_error(run_cli("eval", "lm", checkpoint, "--tasks", "no_such_task_xyz", "--out", tmp_path / "o2", "--device", "cpu",
                                  env=env, timeout=300), "no task 'no_such_task_xyz'")


def test_eval_lm_sends_the_api_key_from_the_command_line_or_a_file(keyed_server, tmp_path):
    env = {**OFFLINE, "HF_HOME": str(tmp_path / "hf"), "OPENAI_API_KEY": "sk-for-another-service"}
    (tmp_path / "key.txt").write_text(KEY + "\n")
    for how in (["--api-key", KEY], ["--api-key-file", tmp_path / "key.txt"]):
        out = tmp_path / how[0].strip("-")
        r = run_cli("eval", "lm", "--server", keyed_server, *how, "--tasks", "imdb_sentiment", "--limit", "2", "--out", out,
                    "--concurrency", "2", env=env, cwd=outside_git(tmp_path) if how[0] == "--api-key" else tmp_path, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        assert 0 <= json.loads((out / "results.json").read_text())["results"]["imdb_sentiment"]["acc,none"] <= 1
        assert KEY not in (out / "results.json").read_text()  # the settings say only that a key was given
        assert json.loads((out / "results.json").read_text())["nextbit"]["settings"]["api_key"] is True
        assert "Traceback" not in r.stderr and "not a git repository" not in r.stderr


def test_eval_lm_a_refused_or_missing_key_is_one_line_at_once(keyed_server, tmp_path, monkeypatch):

    monkeypatch.setenv("OPENAI_API_KEY", "sk-for-another-service")
    (tmp_path / "wrong.txt").write_text("sk-wrong\n")
    (tmp_path / "empty.txt").write_text("\n")
    o = ["--tasks", "imdb_sentiment", "--limit", "2", "--out", tmp_path / "o"]
    t = time.monotonic()
    assert_one_line_error(run_main("eval", "lm", "--server", keyed_server, "--api-key", "sk-wrong", *o), "refused the API key (401)")
    assert_one_line_error(run_main("eval", "lm", "--server", keyed_server + "/v1", "--api-key-file", tmp_path / "wrong.txt", *o),
                          "refused the API key (401)")
    assert_one_line_error(run_main("eval", "lm", "--server", keyed_server, *o), "needs an API key (401)")
    assert time.monotonic() - t < 20  # one request each, not lm-eval's retries
    assert_one_line_error(run_main("eval", "lm", "--server", keyed_server, "--api-key-file", tmp_path / "empty.txt", *o), "is empty")
    assert_one_line_error(run_main("eval", "lm", "--server", keyed_server, "--api-key-file", tmp_path / "nope.txt", *o), "not found")
    assert_one_line_error(run_main("eval", "lm", "--server", keyed_server, "--api-key", KEY, "--api-key-file", tmp_path / "wrong.txt",
                                   *o), "not both")
    assert_one_line_error(run_main("eval", "lm", tmp_path / "ckpt", "--api-key", KEY, *o), "are for --server")
    assert not (tmp_path / "o").exists()  # nothing half-written
    assert os.environ["OPENAI_API_KEY"] == "sk-for-another-service"


def test_lm_eval_settings_set_the_key_for_one_run_and_skip_git(tmp_path, monkeypatch, capfd):
    """lm-eval's local-completions reads its key from OPENAI_API_KEY (its `auth_token` reaches only the tokenizer), and
    its results' git hash ran `git describe`, which says "fatal: not a git repository" outside a checkout."""
    from lm_eval import evaluator
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    from nextbit.evals.lm import lm_eval_settings

    monkeypatch.chdir(outside_git(tmp_path))
    monkeypatch.setenv("OPENAI_API_KEY", "sk-for-another-service")
    hash_before = evaluator.get_git_commit_hash
    with lm_eval_settings(KEY):
        assert LocalCompletionsAPI.api_key.fget(None) == KEY
        assert evaluator.get_git_commit_hash() is None
    with lm_eval_settings(None):
        assert LocalCompletionsAPI.api_key.fget(None) == ""  # a key for another service is never sent to this server
    assert os.environ["OPENAI_API_KEY"] == "sk-for-another-service" and evaluator.get_git_commit_hash is hash_before
    assert "not a git repository" not in capfd.readouterr().err


def test_eval_lm_needs_an_lm_eval_with_the_remote_tokenizer(tmp_path, monkeypatch):
    import lm_eval.utils


    monkeypatch.delattr(lm_eval.utils, "RemoteTokenizer")  # as in lm-eval 0.4.8 to 0.4.9.1
    assert_one_line_error(run_main("eval", "lm", "--server", "http://127.0.0.1:9", "--out", tmp_path / "o"), "needs lm-eval 0.4.9.2")
