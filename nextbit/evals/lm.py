"""`nextbit eval lm`: lm-evaluation-harness through nextbit's OpenAI-compatible API.

    nextbit eval lm runs/demo --tasks imdb_sentiment,stdlib_next_line      # starts `nextbit serve` in this process
    nextbit eval lm --server http://127.0.0.1:8000 --tasks hellaswag       # any lm-eval task, against a running server

lm-eval runs its `local-completions` model unchanged: log-likelihoods come from the server's `echo` + `logprobs`,
generations from greedy completions, and tokenization from the server's /tokenize (its remote tokenizer), so no
local copy of the tokenizer is needed. The two nextbit tasks (evals/lm_tasks.py) are written offline into the
results folder; any other task name passes through to lm-eval's own registry (which may need the internet).
Results: lm-eval's results JSON (results.json) and its table (results.md) in --out.

A server that needs a key: --api-key KEY or --api-key-file FILE (read the way `nextbit serve` reads it). The key is
checked first with one request to /v1/models (a refused key is one line, not lm-eval's retries), then handed to
lm-eval the one way its `local-completions` sends it in every version: the OPENAI_API_KEY environment variable,
set for the run only (and unset when no key is given, so a key for another service is never sent to this server).
lm-eval's `git describe` for its results' git hash is skipped (its "fatal: not a git repository" outside a checkout).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Optional

from nextbit.core.options import opt
from nextbit.core.atomic import write_json, write_text
from nextbit.core.errors import NextbitError
from nextbit.evals.lm_tasks import TASKS, write_tasks
from nextbit.web.client import Client
from nextbit.web.keys import read_key
from nextbit.web.launch import in_thread


@dataclass
class EvalLMConfig:
    checkpoint: str = opt("runs/demo", "the checkpoint to serve and evaluate (ignored with --server)")
    server: Optional[str] = opt(None, "evaluate a running `nextbit serve` at this URL (http://host:port) instead")
    api_key: Optional[str] = opt(None, "with --server: its API key (sent as `Authorization: Bearer KEY`)")
    api_key_file: Optional[str] = opt(None, "with --server: read its API key from this file instead (kept out of the "
                                            "process list)")
    tasks: list[str] = opt(factory=lambda: ["imdb_sentiment", "stdlib_next_line"], help="nextbit's tasks or any "
                                                                                        "lm-eval task name")
    limit: int = opt(0, "documents per task at most (0 = all)")
    num_fewshot: Optional[int] = opt(None, "few-shot examples (default: the task's own)")
    out: str = opt("", "results folder (default: <run folder>/lm_eval, or ./lm_eval with --server)")
    model_name: str = opt("nextbit", "the name the in-process server serves (with --server: read from /v1/models)")
    max_batch: int = opt(8, "the in-process server's slots")
    concurrency: int = opt(4, "requests lm-eval keeps in flight")
    seed: int = opt(1234, "seed of lm-eval's sampling of few-shot examples and of the generations")
    device: Literal["auto", "cpu", "cuda"] = opt("auto", "the in-process server's device: auto | cpu | cuda")


class InProcessServer:
    """`nextbit serve` in this process (engine loop thread + uvicorn thread, web/launch.py) on a free local port."""

    def __init__(self, cfg: EvalLMConfig):
        from nextbit.serve.server import ServeConfig, build_app

        self.app, self.runner, self.ckpt = build_app(ServeConfig(checkpoint=cfg.checkpoint, max_batch=cfg.max_batch,
                                                                 served_model_name=cfg.model_name, device=cfg.device))
        self.name, self.max_len = cfg.model_name, self.app.state.nextbit.max_len
        self.serving = in_thread(self.app)

    def __enter__(self) -> str:
        self.runner.start()
        try:
            return self.serving.__enter__()
        except BaseException:
            self.runner.stop()
            raise

    def __exit__(self, *exc) -> None:
        try:
            self.serving.__exit__(*exc)
        finally:
            self.runner.stop()


def _remote_model(url: str, api_key: Optional[str]) -> tuple[str, int]:
    """(model name, context) of a running server, or one line saying why not (web/client.py's errors)."""
    m = Client(url, api_key, timeout=5.0).models()[0]
    return m["id"], int(m.get("max_model_len") or 2048)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return "an unknown version"


def task_manager(tasks: list[str], task_dir: Path):
    """lm-eval's task registry with nextbit's tasks added (its own ~thousands only when a task needs them: indexing
    them takes a while); a name in neither is one line."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(task_dir), include_defaults=not all(t in TASKS for t in tasks))
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise NextbitError(f"lm-eval has no task {unknown[0]!r} (nextbit's own: {', '.join(TASKS)})")
    return manager


def read_api_key(cfg: EvalLMConfig) -> Optional[str]:
    """--api-key or --api-key-file, read as `nextbit serve` reads its own (one line if both, or the file is missing or empty)."""
    return read_key(cfg.api_key, cfg.api_key_file)


@contextlib.contextmanager
def lm_eval_settings(api_key: Optional[str]):
    """For one lm-eval run: OPENAI_API_KEY is the key (`local-completions` sends `Bearer $OPENAI_API_KEY` on every
    request; its `auth_token` reaches only the remote tokenizer) or unset, and lm-eval's git hash is None instead of
    a `git describe` whose stderr reaches the terminal. Both are put back afterwards."""
    from lm_eval import evaluator

    old_key = os.environ.get("OPENAI_API_KEY")
    old_hash = getattr(evaluator, "get_git_commit_hash", None)
    if api_key:
        os.environ["OPENAI_API_KEY"] = api_key
    else:
        os.environ.pop("OPENAI_API_KEY", None)
    if old_hash is not None:
        evaluator.get_git_commit_hash = lambda: None
    try:
        yield
    finally:
        if old_key is None:
            os.environ.pop("OPENAI_API_KEY", None)
        else:
            os.environ["OPENAI_API_KEY"] = old_key
        if old_hash is not None:
            evaluator.get_git_commit_hash = old_hash


def run_lm_eval(url: str, name: str, max_len: int, cfg: EvalLMConfig, manager, api_key: Optional[str] = None) -> dict:
    from lm_eval import simple_evaluate

    args = {"model": name, "base_url": f"{url}/v1/completions", "num_concurrent": cfg.concurrency, "max_retries": 2,
            "tokenized_requests": True, "max_length": max_len, "timeout": 300}
    if api_key:
        args["auth_token"] = api_key  # the remote tokenizer's (/tokenizer_info, /tokenize, /detokenize) key
    with lm_eval_settings(api_key):
        return simple_evaluate(model="local-completions", model_args=args, tasks=list(cfg.tasks), task_manager=manager,
                               limit=cfg.limit or None, num_fewshot=cfg.num_fewshot, bootstrap_iters=0, random_seed=cfg.seed,
                               numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed)


def eval_lm(cfg: EvalLMConfig) -> dict:
    try:
        import lm_eval  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise NextbitError('nextbit eval lm needs lm-eval and the server: pip install -e ".[serve,eval]"')
    import lm_eval.utils

    if not hasattr(lm_eval.utils, "RemoteTokenizer"):  # before 0.4.9.2 local-completions loads a Hugging Face tokenizer
        raise NextbitError(f"nextbit eval lm needs lm-eval 0.4.9.2 or newer (its remote tokenizer), found {_version()}: "
                           'pip install -U "lm-eval[api]"')
    if not cfg.tasks:
        raise NextbitError("--tasks: give at least one task")
    if cfg.limit < 0:
        raise NextbitError(f"--limit must be >= 0, got {cfg.limit}")
    api_key = read_api_key(cfg)
    if api_key and not cfg.server:
        raise NextbitError("--api-key / --api-key-file are for --server (the in-process server needs no key)")
    if cfg.server:
        url = cfg.server.rstrip("/").removesuffix("/v1")
        name, max_len = _remote_model(url, api_key)
        out = Path(cfg.out or "lm_eval")
    else:
        from nextbit.core.checkpoint import resolve

        ck = resolve(cfg.checkpoint)
        out = Path(cfg.out) if cfg.out else (ck.parent if ck.name == "checkpoint" else ck) / "lm_eval"
    task_dir = out / "tasks"
    write_tasks(list(cfg.tasks), task_dir)
    manager = task_manager(list(cfg.tasks), task_dir)
    if cfg.server:
        results = run_lm_eval(url, name, max_len, cfg, manager, api_key)
    else:
        srv = InProcessServer(cfg)
        with srv as srv_url:
            results = run_lm_eval(srv_url, srv.name, srv.max_len, cfg, manager)
    return _report(results, cfg, out, bool(cfg.server and api_key))


def _report(results: dict, cfg: EvalLMConfig, out: Path, keyed: bool) -> dict:
    from lm_eval.utils import make_table

    table = make_table(results)
    keep = {k: results[k] for k in ("results", "versions", "n-shot", "config") if k in results}
    model_args = keep.get("config", {}).get("model_args")
    if isinstance(model_args, dict) and "auth_token" in model_args:  # the API key: written as given or not, never itself
        keep["config"] = {**keep["config"], "model_args": {**model_args, "auth_token": bool(model_args["auth_token"])}}
    keep["nextbit"] = {"settings": {**asdict(cfg), "api_key": keyed}}  # whether a key was sent, never the key itself
    write_json(out / "results.json", keep)
    write_text(out / "results.md", table)
    print(table, flush=True)
    print(f"results in {out}/results.json", flush=True)
    return keep
