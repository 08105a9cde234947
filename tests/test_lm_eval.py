"""lm-evaluation-harness, unchanged, against a live `nextbit serve` (issue #10 item 8): `local-completions` with the
server's /tokenizer_info, /tokenize and /detokenize as its remote tokenizer, on two tasks this test writes itself
over local JSONL files (a multiple-choice task scored by log-likelihood through echo + logprobs, and a
generate_until task), fully offline."""

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT, run_cli

pytest.importorskip("lm_eval")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

CTX = 64  # the tiny model's context; lm-eval is told (max_length) so that its requests fit
GEN_TOKENS = 8

MC = [("def f(x):\n    return", [" x", " None", " self"], 0),
      ("import os\nimport", [" sys", " (", " 12"], 0),
      ("for i in range(10):\n   ", [" print(i)", " ]]]", " 0 0"], 0),
      ("class A:\n    def __init__(self", [", x):", "))((", " +-"], 0),
      ("if x is None:\n    raise", [" ValueError", " 42", " ]"], 0),
      ("# a comment\nx =", [" 1", " def", " :"], 0)]
GEN = ["def main():\n    ", "import ", "class Foo(", "    return ", "if __name__ == ", "    for x in "]

RUNNER = r"""
import json, sys
from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager
cfg = json.loads(sys.argv[1])
res = simple_evaluate(model="local-completions", model_args=cfg["model_args"], tasks=["nb_mc", "nb_gen"],
                      task_manager=TaskManager(include_path=cfg["tasks"], include_defaults=False), log_samples=True,
                      bootstrap_iters=0, random_seed=0)
samples = {t: [{k: s[k] for k in ("doc_id", "target", "resps", "filtered_resps")} for s in v] for t, v in res["samples"].items()}
json.dump({"results": res["results"], "samples": samples}, open(cfg["out"], "w"))
"""


@pytest.fixture(scope="module")
def checkpoint(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("lm_eval") / "run"
    r = run_cli("train", "--data", dataset, "--out", out, "--steps", "3", "--depth", "1", "--width", "64", "--n-head", "2",
                "--seq-len", str(CTX), "--batch-tokens", "256", "--device", "cpu", "--quiet")
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture
def server(checkpoint):
    """`nextbit serve` in this process: its engine loop thread and uvicorn in a thread, on a free port."""
    from nextbit.serve.server import ServeConfig, build_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app, runner, _ = build_app(ServeConfig(checkpoint=str(checkpoint), port=port, max_batch=4, served_model_name="nb", device="cpu"))
    runner.start()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    deadline = time.time() + 30
    while not srv.started and th.is_alive() and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started, "the server did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        th.join(15)
        runner.stop()


def greedy(url: str, text: str) -> str:
    """What lm-eval's generate_until request gets for `text`: the context tokenized by the server without
    <|endoftext|>, greedy, lm-eval's stop strings (the task's `until` plus the eos string) and max tokens."""
    ids = httpx.post(f"{url}/tokenize", json={"prompt": text, "add_special_tokens": False}).json()["tokens"]
    r = httpx.post(f"{url}/v1/completions", json={"model": "nb", "prompt": ids, "max_tokens": GEN_TOKENS, "temperature": 0,
                                                   "stop": ["\n", "<|endoftext|>"], "seed": 1234})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def write_tasks(d, url: str):
    (d / "mc.jsonl").write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in MC))
    # half the generation targets are the model's own greedy completion, half can never be produced: exact_match = 0.5
    targets = [greedy(url, q) if i % 2 == 0 else "\u2603 never" for i, q in enumerate(GEN)]
    (d / "gen.jsonl").write_text("".join(json.dumps({"question": q, "answer": t}) + "\n" for q, t in zip(GEN, targets)))
    common = lambda name, f: (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {d / f}\n"  # noqa: E731
                              f"test_split: test\ndoc_to_text: '{{{{question}}}}'\ndoc_to_target: answer\n")
    (d / "nb_mc.yaml").write_text(common("nb_mc", "mc.jsonl") + "output_type: multiple_choice\ndoc_to_choice: choices\n"
                                  "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    (d / "nb_gen.yaml").write_text(common("nb_gen", "gen.jsonl") + "output_type: generate_until\n"
                                   f"generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: {GEN_TOKENS}\n  do_sample: false\n"
                                   "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")
    return targets


def test_lm_eval_local_completions_scores_both_task_kinds(server, tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    targets = write_tasks(tasks, server)
    out = tmp_path / "results.json"
    cfg = {"tasks": str(tasks), "out": str(out),
           "model_args": {"model": "nb", "base_url": f"{server}/v1/completions", "num_concurrent": 1, "max_retries": 1,
                          "tokenized_requests": True, "max_length": CTX, "timeout": 60}}
    hf = tmp_path / "hf"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HOME": str(hf), "HF_DATASETS_CACHE": str(hf / "datasets"),
           "HF_ENDPOINT": "http://127.0.0.1:9",  # anything that still tries the hub fails at once instead of going online
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(cfg)], env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-4000:]
    res = json.loads(out.read_text())
    acc, em = res["results"]["nb_mc"]["acc,none"], res["results"]["nb_gen"]["exact_match,none"]
    print(f"lm-eval against nextbit serve: nb_mc acc {acc}, nb_gen exact_match {em}; greedy targets {targets[::2]}")
    assert isinstance(acc, float) and 0 <= acc <= 1
    assert isinstance(em, float) and 0 <= em <= 1

    # the multiple-choice score is lm-eval's reading of the server's log-likelihoods: one finite one per choice
    mc = sorted(res["samples"]["nb_mc"], key=lambda s: s["doc_id"])
    assert len(mc) == len(MC)
    right = 0
    for s, (_, choices, answer) in zip(mc, MC):
        lls = [float(x[0]) for x in s["filtered_resps"]]  # (log-likelihood, is_greedy) per choice
        assert len(lls) == len(choices) and all(-1e4 < ll < 0 for ll in lls), s
        right += max(range(len(lls)), key=lls.__getitem__) == answer
    assert acc == pytest.approx(right / len(MC))

    # generate_until: lm-eval's generations are the server's greedy completions
    gen = sorted(res["samples"]["nb_gen"], key=lambda s: s["doc_id"])
    got = [s["filtered_resps"][0] if isinstance(s["filtered_resps"], list) else s["filtered_resps"] for s in gen]
    assert got[::2] == targets[::2], (got, targets)
    assert em == pytest.approx(0.5)
