"""`nextbit serve CHECKPOINT`: an OpenAI-compatible API (and a chat page) for a nextbit checkpoint.

    nextbit serve runs/demo --port 8000
    curl localhost:8000/v1/completions -H 'Content-Type: application/json' -d '{"prompt": "def fib(n):", "max_tokens": 32}'

One engine loop owns the model and `--max-batch` slots (continuous batching: requests join the running batch as
they arrive); uvicorn serves HTTP. Ctrl-C stops accepting connections, lets the requests in flight finish (up to
--shutdown-timeout seconds), then stops the engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from nextbit.core.checkpoint import load_checkpoint, load_shape
from nextbit.core.options import check as check_options, opt
from nextbit.core.device import pick_device
from nextbit.core.errors import NextbitError
from nextbit.core.net import listen
from nextbit.web.keys import read_key
from nextbit.web.launch import base_url, need_uvicorn, run


@dataclass
class ServeConfig:
    checkpoint: str = opt("runs/demo", "a checkpoint folder, or a run folder holding checkpoint/")
    host: str = opt("127.0.0.1", "the address to listen on (0.0.0.0: every interface)")
    port: int = opt(8000, "the TCP port to listen on (0: any free port)", ge=0, le=65535)
    api_key: Optional[str] = opt(None, "require `Authorization: Bearer KEY` on /v1 and the tokenizer routes")
    api_key_file: Optional[str] = opt(None, "read the key from this file instead (kept out of the process list)")
    admin_key: Optional[str] = opt(None, "the key for /admin/reload; default: the API key (no key: open, like the API)")
    max_batch: int = opt(32, "engine slots: requests decoded together", ge=1)
    max_waiting: int = opt(256, "requests queued for a slot at most; past it the server answers 429 with Retry-After",
                           ge=0)
    max_model_len: Optional[int] = opt(None, "tokens per sequence (prompt + completion); default: the model's context",
                                       ge=1)
    max_n: int = opt(16, "choices per request at most (`n`)", ge=1)
    max_body_bytes: int = opt(1 << 20, "largest request body accepted", ge=1)
    served_model_name: Optional[str] = opt(None, "the name clients pass as `model`; default: the checkpoint folder's "
                                                 "name")
    shutdown_timeout: float = opt(10.0, "seconds Ctrl-C waits for requests in flight", ge=0)
    device: Literal["auto", "cpu", "cuda"] = opt("auto", "where the engine runs (auto: CUDA when there is one)")
    engine: Literal["process", "thread"] = opt("process", "process: the engine loop in its own process (no GIL shared "
                                                          "with HTTP); thread: in this one")
    engine_threads: int = opt(0, "torch threads of the engine process on CPU; 0 = every core but one (the HTTP side's)",
                              ge=0)
    log_level: str = opt("warning", "uvicorn's access and error log level")


def build_app(cfg: ServeConfig):
    """The app and its engine loop (not yet started), from the config: what `serve` runs and tests start."""
    from nextbit.serve.app import create_app
    from nextbit.serve.engine_process import check_servable, default_threads
    from nextbit.serve.runner import EngineRunner, in_fresh_thread
    from nextbit.serve.serving import ServerState

    check_options(cfg)
    if cfg.engine_threads and cfg.engine == "thread":
        raise NextbitError("--engine-threads is for --engine process (a thread engine uses this process's torch threads)")
    key = read_key(cfg.api_key, cfg.api_key_file)
    device = pick_device(cfg.device)
    in_process = cfg.engine == "thread"
    # With an engine process, the HTTP side reads the tokenizer and the model's shape only (no weights, no hash): that
    # process alone loads and checks the weights. No torch work in this (the HTTP) thread: see in_fresh_thread.
    ck = in_fresh_thread(lambda: load_checkpoint(cfg.checkpoint, device) if in_process else load_shape(cfg.checkpoint))
    check_servable(ck)
    ctx = ck.model.cfg.seq_len
    max_len = cfg.max_model_len or ctx
    if max_len > ctx:
        raise NextbitError(f"--max-model-len {max_len} is past the model's context of {ctx}")
    name = cfg.served_model_name or (ck.path.parent.name if ck.path.name == "checkpoint" else ck.path.name)
    threads = cfg.engine_threads or (default_threads() if device.type == "cpu" else 0)
    runner = EngineRunner(ck.tokenizer, str(ck.path.resolve()), slots=cfg.max_batch, max_len=max_len, max_waiting=cfg.max_waiting,
                          device=device, model=ck.model if in_process else None, threads=threads)
    state = ServerState(runner, ck.tokenizer, name, max_len, key, cfg.admin_key or key, cfg.max_n, cfg.max_body_bytes, str(device))
    return create_app(state), runner, ck


def serve(cfg: ServeConfig) -> None:
    need_uvicorn("nextbit serve", "serve")
    app, runner, ck = build_app(cfg)
    sock = listen(cfg.host, cfg.port)
    runner.start()
    state = app.state.nextbit
    base = base_url(cfg.host, sock)
    print(f"nextbit serve: {ck.path} as {state.model_name!r} ({ck.model.num_params() / 1e6:.2f}M params, context {state.max_len}, "
          f"{cfg.max_batch} slots, {state.device})\n  API        {base}/v1  (OpenAI-compatible{', key required' if state.api_key else ''})\n"
          f"  chat page  {base}/\n  metrics    {base}/metrics\nCtrl-C stops it.", flush=True)
    run(app, sock, name="nextbit serve", log_level=cfg.log_level, shutdown_timeout=cfg.shutdown_timeout, on_stop=runner.stop)
