"""`nextbit eval humaneval`: the pass@k estimator, the sandbox (canonical solutions pass, wrong ones fail, hostile
ones are contained and the run goes on), the server client, and the command end to end on a tiny checkpoint."""

import json
import math
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import run_cli
from nextbit.core.errors import NextbitError
from nextbit.evals.humaneval import (DEFAULT_STOP, HumanEvalConfig, execute, humaneval, load_problems, seed_of,
                                     unescape)
from nextbit.evals.passk import mean_pass_at_k, parse_ks, pass_at_k
from nextbit.evals.sandbox import Limits, Sandbox

MARK = "test-marker"
ROOT_RUN = os.geteuid() == 0


@pytest.fixture(scope="module")
def problems():
    return load_problems(0)


@pytest.fixture(scope="module")
def box():
    with Sandbox(Limits(timeout=2.0), workers=2) as b:
        yield b


def sandbox_processes(box) -> list[int]:
    """Processes still running under the sandbox's user ids (root mode: the ids are the sandbox's own); killed ones
    that their new parent (init) has not reaped yet are dead already and not counted."""
    if not ROOT_RUN:
        return []
    ids = set(box.ids)
    left = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and d.stat().st_uid in ids and (d / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                left.append(int(d.name))
        except OSError:
            pass
    return left


# ---- pass@k ---------------------------------------------------------------------------------------------------
def test_pass_at_k_matches_the_closed_form():
    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                closed = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(closed, abs=1e-12), (n, c, k)
            assert pass_at_k(n, c, 1) == pytest.approx(c / n)
    assert pass_at_k(200, 0, 100) == 0.0 and pass_at_k(200, 200, 100) == 1.0
    assert pass_at_k(200, 1, 100) == pytest.approx(0.5)  # one good sample in 200: half the 100-draws hold it
    assert mean_pass_at_k([(2, 1), (2, 0)], [1, 2]) == {"pass@1": 0.25, "pass@2": 0.5}
    with pytest.raises(ValueError):
        pass_at_k(5, 6, 1)


def test_k_above_n_is_skipped_and_bad_k_refused():
    assert parse_ks("1,10,100", 10) == ([1, 10], [100])
    assert parse_ks("10, 1", 10) == ([1, 10], [])
    for bad, needle in [("1,x", "integers"), ("0", ">= 1"), ("", "integers"), ("100", "raise --n")]:
        with pytest.raises(NextbitError, match=needle):
            parse_ks(bad, 10)


def test_stop_sequences_read_escapes():
    assert unescape("\\ndef") == "\ndef" and unescape("a\\tb\\\\n") == "a\tb\\n" and unescape("\\x") == "\\x"
    assert DEFAULT_STOP == ["\ndef", "\nclass", "\nif", "\nprint", "\n#"]


# ---- the sandbox ----------------------------------------------------------------------------------------------
def test_canonical_solutions_all_pass(problems):
    """All 164 canonical solutions pass in the sandbox (2 workers, a generous timeout for a loaded machine)."""
    t0 = time.perf_counter()
    with Sandbox(Limits(timeout=10.0), workers=2) as b, ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda p: execute(b, p, p["canonical_solution"], MARK), problems))
    assert len(problems) == 164
    failed = [(p["task_id"], r) for p, r in zip(problems, results) if r[0] != "passed"]
    assert not failed, failed
    assert mean_pass_at_k([(1, 1)] * len(results), [1]) == {"pass@1": 1.0}
    assert time.perf_counter() - t0 < 40


def test_wrong_solutions_fail_with_their_error(box, problems):
    p = problems[0]
    assert execute(box, p, "    return not True\n", MARK)[:2] == ("failed", "AssertionError")
    result, error, _ = execute(box, p, "    return undefined_name\n", MARK)
    assert result == "failed" and error.startswith("NameError")
    assert execute(box, p, "    return (\n", MARK)[0] == "failed"  # a syntax error
    # leaving early with status 0 is not passing: the checks never ran to their end
    assert execute(box, p, "    pass\nimport sys\nsys.exit(0)\n", MARK)[:2] == ("failed", "exited before its tests finished")


def test_an_infinite_loop_times_out(box, problems):
    result, error, seconds = execute(box, problems[0], "    while True:\n        pass\n", MARK)
    assert result == "timed out" and "2 s" in error and seconds < 4


def test_hostile_samples_are_contained_and_the_run_goes_on(box, problems, tmp_path):
    p = problems[0]
    good = p["canonical_solution"]
    outside = tmp_path / "escaped.txt"
    hostile = {
        "fork bomb": "    import os\n    while True:\n        try:\n            os.fork()\n        except OSError:\n            pass\n",
        "write outside": f"    open({str(outside)!r}, 'w').write('x')\n",
        "write /etc": "    open('/etc/nextbit-escaped', 'w').write('x')\n",
        "setsid daemon": "    import os, time\n    if os.fork() == 0:\n        os.setsid()\n        time.sleep(60)\n    return True\n",
        "huge output": "    import sys\n    while True:\n        sys.stdout.write('x' * 65536)\n",
        "network": "    import socket\n    socket.create_connection(('8.8.8.8', 53), timeout=1)\n",
    }
    if ROOT_RUN or box.layers["pid namespace"]:  # without either, these reach the caller's own processes
        hostile["kill the parent"] = "    import os\n    os.kill(os.getppid(), 9)\n"
        hostile["kill everything"] = "    import os, signal\n    os.kill(-1, signal.SIGKILL)\n"
    results = {name: execute(box, p, code, MARK) for name, code in hostile.items()}
    # memory: a smaller address space (touching 1 GiB takes seconds on a loaded machine), a roomier timeout
    with Sandbox(Limits(timeout=5.0, memory_mb=256), workers=1) as small:
        results["memory hog"] = execute(small, p, "    blocks = []\n    while True:\n        blocks.append(bytearray(1 << 24))\n", MARK)
        results["big alloc"] = execute(small, p, "    x = bytearray(8 << 30)\n", MARK)
    for name, (result, error, _) in results.items():
        assert result in ("failed", "timed out"), (name, result, error)
    assert results["fork bomb"][0] == "timed out"
    assert results["memory hog"][1] == "MemoryError" and results["big alloc"][1] == "MemoryError"
    assert not Path("/etc/nextbit-escaped").exists()
    assert "OSError" in results["network"][1] or box.layers["network"] == "shared with the host"
    if ROOT_RUN:  # as root the sandbox runs as its own unprivileged user
        assert results["kill the parent"][1].startswith("PermissionError")
        assert not outside.exists()
        assert not sandbox_processes(box)  # the fork bomb's and the daemon's processes are gone
    # this process survived all of that, and the next samples are scored as usual, in parallel
    with ThreadPoolExecutor(2) as pool:
        after = list(pool.map(lambda q: execute(box, q, q["canonical_solution"], MARK)[0], problems[:6]))
    assert after == ["passed"] * 6


def test_the_sandbox_says_what_it_has(box):
    layers = box.layers
    assert layers["environment"] == ["HOME", "LANG", "LC_ALL", "PATH", "TMPDIR"]  # nothing of the caller's
    assert layers["rlimits"]["AS"] == 1 << 30 and layers["rlimits"]["FSIZE"] == 16 << 20
    if ROOT_RUN:
        assert "unprivileged" in layers["user"] and layers["rlimits"]["NPROC"] == 8
    os.environ["NEXTBIT_TEST_SECRET_KEY"] = "hunter2"
    try:
        r = box.run("import os; print(sorted(os.environ), os.getcwd())")
    finally:
        del os.environ["NEXTBIT_TEST_SECRET_KEY"]
    assert "SECRET" not in r.stdout and "nextbit-sandbox-" in r.stdout


# ---- the command against a server (a fake one that answers with the canonical solutions) ------------------------
class FakeServer:
    def __init__(self, problems, hang: bool = False, key: str = ""):
        self.answers = {p["prompt"]: p["canonical_solution"] for p in problems}
        self.tokenized = {}
        self.lock = threading.Lock()
        self.bodies, self.headers = [], []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def reply(self, code, obj):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if hang:
                    time.sleep(30)
                fake.headers.append(dict(self.headers))
                if key and self.headers.get("Authorization") != f"Bearer {key}":
                    return self.reply(401, {"error": {"message": "invalid or missing API key", "code": 401}})
                self.reply(200, {"data": [{"id": "fake", "max_model_len": 4096}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.bodies.append((self.path, body))
                if self.path == "/tokenize":
                    with fake.lock:
                        key = len(fake.tokenized)
                        fake.tokenized[key] = body["prompt"]
                    ids = [key] * 5000  # too long: the client keeps the last tokens
                    return self.reply(200, {"tokens": ids, "count": len(ids)})
                prompt = body["prompt"]
                if isinstance(prompt, str) and "separate_paren_groups" in prompt:
                    return self.reply(400, {"error": {"message": "this model's maximum context length is 4096 tokens"}})
                text = fake.answers[prompt if isinstance(prompt, str) else fake.tokenized[prompt[0]]]
                self.reply(200, {"choices": [{"index": i, "text": text + "\ndef extra():\n", "finish_reason": "stop"}
                                             for i in reversed(range(body["n"]))]})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


def test_server_mode_sends_the_api_request_and_scores(problems, tmp_path, capsys):
    fake = FakeServer(problems[:3])
    try:
        s = humaneval(HumanEvalConfig(server=fake.url + "/v1", api_key="sk-test", limit=3, n=17, k="1,10,100",
                                      out=str(tmp_path / "he"), quiet=True, seed=7))
    finally:
        fake.close()
    assert s["pass@1"] == 1.0 and s["pass@10"] == 1.0 and s["skipped_k"] == [100] and s["samples"] == 51
    assert s["prompts_truncated"] == 1  # problem 1 was too long: sent as its last tokens
    assert fake.headers[0]["Authorization"] == "Bearer sk-test"
    comps = [b for path, b in fake.bodies if path == "/v1/completions"]
    first = next(b for b in comps if b["prompt"] == problems[0]["prompt"] and b["n"] == 16)
    assert first["stop"] == DEFAULT_STOP and first["max_tokens"] == 300 and first["temperature"] == 0.8
    assert first["top_p"] == 0.95 and first["model"] == "fake" and isinstance(first["seed"], int)
    assert sorted(b["n"] for b in comps if b["prompt"] == problems[0]["prompt"]) == [1, 16]  # n=17 in two requests
    assert any(isinstance(b["prompt"], list) and len(b["prompt"]) == 4096 - 300 for b in comps)
    summary = json.loads((tmp_path / "he" / "summary.json").read_text())
    assert summary["settings"]["api_key"] is True and "sk-test" not in (tmp_path / "he" / "summary.json").read_text()
    rows = [json.loads(x) for x in (tmp_path / "he" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 51 and all(r["passed"] for r in rows)
    assert not any("def extra" in r["completion"] for r in rows)  # cut at the stop sequence on our side too
    assert "pass@100 needs at least 100 samples" in capsys.readouterr().err


def test_server_mode_reads_the_key_from_a_file_and_a_refused_key_is_one_line(problems, tmp_path):
    fake = FakeServer(problems[:1], key="sk-file")
    (tmp_path / "key.txt").write_text("sk-file\n")
    (tmp_path / "wrong.txt").write_text("sk-wrong\n")
    common = dict(server=fake.url, limit=1, n=1, k="1", quiet=True)
    try:
        s = humaneval(HumanEvalConfig(api_key_file=str(tmp_path / "key.txt"), out=str(tmp_path / "he"), **common))
        assert s["pass@1"] == 1.0 and fake.headers[0]["Authorization"] == "Bearer sk-file"
        assert json.loads((tmp_path / "he" / "summary.json").read_text())["settings"]["api_key"] is True
        for kw, msg in ((dict(api_key_file=str(tmp_path / "wrong.txt")), "refused the API key (401)"), ({}, "needs an API key (401)"),
                        (dict(api_key="sk-file", api_key_file=str(tmp_path / "key.txt")), "not both")):
            with pytest.raises(NextbitError, match=msg.replace("(", r"\(").replace(")", r"\)")):
                humaneval(HumanEvalConfig(out=str(tmp_path / "he2"), **kw, **common))
    finally:
        fake.close()
    with pytest.raises(NextbitError, match="are for --server"):
        humaneval(HumanEvalConfig(checkpoint=str(tmp_path / "ck"), api_key="sk-file", out=str(tmp_path / "he3"), limit=1, n=1, k="1"))


def test_a_server_that_does_not_answer_is_one_quick_line(problems, tmp_path, monkeypatch):
    import nextbit.evals.humaneval as he

    monkeypatch.setattr(he, "CONNECT_TIMEOUT", 1.0)  # 5 s in use
    with socket.socket() as s:  # a port with nothing behind it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    with pytest.raises(NextbitError, match="no server answering at http://127.0.0.1:.*connection refused"):
        humaneval(HumanEvalConfig(server=f"http://127.0.0.1:{port}", out=str(tmp_path / "a"), quiet=True))
    fake = FakeServer(problems[:1], hang=True)  # accepts the connection, never answers
    try:
        with pytest.raises(NextbitError, match="did not answer /v1/models within 1 s"):
            humaneval(HumanEvalConfig(server=fake.url, out=str(tmp_path / "b"), quiet=True))
    finally:
        threading.Thread(target=fake.close, daemon=True).start()
    assert time.perf_counter() - t0 < 10
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing written


def test_bad_options_are_refused_before_anything_runs(tmp_path):
    for kw, needle in [(dict(n=0), "--n"), (dict(k="50", n=5), "raise --n"), (dict(timeout=0), "--timeout"),
                       (dict(server="ftp://x"), "--server"), (dict(server="http://x", checkpoint="runs/demo"), "not both"),
                       (dict(top_p=0), "--top-p"), (dict(workers=0), "--workers"), (dict(limit=-1), "--limit")]:
        with pytest.raises(NextbitError, match=needle):
            humaneval(HumanEvalConfig(out=str(tmp_path / "o"), quiet=True, **kw))
    (tmp_path / "file").write_text("x")
    with pytest.raises(NextbitError, match="not a folder"):
        humaneval(HumanEvalConfig(server="http://127.0.0.1:1", out=str(tmp_path / "file"), quiet=True))
    assert not (tmp_path / "o").exists()


# ---- the command end to end -----------------------------------------------------------------------------------
def run_eval(*args, timeout=300):
    return run_cli("eval", "humaneval", *args, timeout=timeout)


def one_line_error(r, *needles):
    assert r.returncode == 1, (r.returncode, r.stderr)
    err = r.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("nextbit: error:") and all(n in err for n in needles), err


@pytest.fixture(scope="module")
def tiny_run(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("he") / "run"
    r = run_cli("train", "--data", dataset, "--out", out, "--steps", "3", "--depth", "1", "--width", "64",
                "--n-head", "2", "--seq-len", "64", "--batch-tokens", "128", "--device", "cpu", "--quiet")
    assert r.returncode == 0, r.stderr
    return out


def test_end_to_end_on_a_tiny_checkpoint(tiny_run, tmp_path):
    r = run_eval(tiny_run, "--limit", "2", "--n", "2", "--k", "1,2,10", "--max-new-tokens", "16", "--seed", "3",
                 "--timeout", "2", "--stop", "\\ndef", "\\nclass")
    assert r.returncode == 0, r.stderr
    out = tiny_run / "humaneval"  # the default: beside the checkpoint, in its run folder
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) >= {"pass@1", "pass@2", "n", "problems", "seconds", "settings", "sandbox", "model"}
    assert summary["problems"] == 2 and summary["n"] == 2 and summary["samples"] == 4 and summary["skipped_k"] == [10]
    assert summary["settings"]["stop"] == ["\ndef", "\nclass"] and summary["settings"]["max_new_tokens"] == 16
    assert summary["prompts_truncated"] == 2  # a 64-token context holds neither prompt
    assert 0 <= summary["pass@1"] <= summary["pass@2"] <= 1
    rows = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert [(x["task_id"], x["sample"]) for x in rows] == [("HumanEval/0", 0), ("HumanEval/0", 1),
                                                          ("HumanEval/1", 0), ("HumanEval/1", 1)]
    assert all(x["result"] in ("passed", "failed", "timed out") for x in rows)
    assert all(x["result"] == "passed" or x["error"] for x in rows)
    assert "pass@1" in r.stdout and "pass@10 needs at least 10 samples" in r.stderr
    assert not list(out.glob(".*.tmp"))  # the atomic writes left nothing behind
    # the same seed in this process gives the same samples (the streams are per sample, not per batch)
    again = humaneval(HumanEvalConfig(checkpoint=str(tiny_run), limit=2, n=2, k="1", max_new_tokens=16, seed=3,
                                      timeout=2, stop=["\\ndef", "\\nclass"], out=str(tmp_path / "again"), quiet=True))
    rows2 = [json.loads(x) for x in (tmp_path / "again" / "samples.jsonl").read_text().splitlines()]
    assert [x["completion"] for x in rows2] == [x["completion"] for x in rows] and again["pass@1"] == summary["pass@1"]
    assert seed_of(3, 0, 1) != seed_of(3, 0, 0) != seed_of(3, 1, 0)


def test_bad_input_from_the_command_line(tmp_path):
    t0 = time.perf_counter()
    one_line_error(run_eval(tmp_path / "nope", "--out", tmp_path / "o"), "checkpoint not found")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    one_line_error(run_eval("--server", f"http://127.0.0.1:{port}", "--out", tmp_path / "o"), "no server answering")
    assert not (tmp_path / "o").exists()
    assert time.perf_counter() - t0 < 30
