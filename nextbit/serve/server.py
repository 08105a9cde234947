"""`nextbit serve CHECKPOINT`: an OpenAI-compatible API (and a chat page) for a nextbit checkpoint.

    nextbit serve runs/demo --port 8000
    curl localhost:8000/v1/completions -H 'Content-Type: application/json' -d '{"prompt": "def fib(n):", "max_tokens": 32}'

One engine loop owns the model and `--max-batch` slots (continuous batching: requests join the running batch as
they arrive); uvicorn serves HTTP. Ctrl-C stops accepting connections, lets the requests in flight finish (up to
--shutdown-timeout seconds), then stops the engine.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from nextbit.core.checkpoint import load_checkpoint, load_shape
from nextbit.core.device import pick_device
from nextbit.core.errors import NextbitError
from nextbit.core.net import listen


@dataclass
class ServeConfig:
    checkpoint: str = "runs/demo"  # a checkpoint folder, or a run folder holding checkpoint/
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: Optional[str] = None  # require `Authorization: Bearer KEY` on /v1 and the tokenizer routes
    api_key_file: Optional[str] = None  # read the key from this file instead (kept out of the process list)
    admin_key: Optional[str] = None  # the key for /admin/reload; default: the API key (no key: open, like the API)
    max_batch: int = 32  # engine slots: requests decoded together
    max_waiting: int = 256  # requests queued for a slot at most; past it the server answers 429 with Retry-After
    max_model_len: int = 0  # tokens per sequence (prompt + completion); 0 = the model's context
    max_n: int = 16  # choices per request at most (`n`)
    max_body_bytes: int = 1 << 20  # largest request body accepted
    served_model_name: Optional[str] = None  # the name clients pass as `model`; default: the checkpoint folder's name
    shutdown_timeout: float = 10.0  # seconds Ctrl-C waits for requests in flight
    device: str = "auto"  # auto | cpu | cuda
    engine: str = "process"  # process: the engine loop in its own process (no GIL shared with HTTP) | thread: in this one
    engine_threads: int = 0  # torch threads of the engine process on CPU; 0 = every core but one (the HTTP side's)
    log_level: str = "warning"  # uvicorn's access and error log level


def read_key(cfg: ServeConfig) -> Optional[str]:
    if cfg.api_key and cfg.api_key_file:
        raise NextbitError("give --api-key or --api-key-file, not both")
    if cfg.api_key_file:
        p = Path(cfg.api_key_file)
        if not p.is_file():
            raise NextbitError(f"--api-key-file not found: {p}")
        key = p.read_text(encoding="utf-8").strip()
        if not key:
            raise NextbitError(f"--api-key-file {p} is empty")
        return key
    return cfg.api_key or None


def build_app(cfg: ServeConfig):
    """The app and its engine loop (not yet started), from the config: what `serve` runs and tests start."""
    from nextbit.serve.app import ServerState, create_app
    from nextbit.serve.engine_process import check_servable, default_threads
    from nextbit.serve.runner import EngineRunner, in_fresh_thread

    for name in ("max_batch", "max_n", "max_body_bytes"):
        if getattr(cfg, name) < 1:
            raise NextbitError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.max_waiting < 0 or cfg.max_model_len < 0:
        raise NextbitError("--max-waiting and --max-model-len must be >= 0")
    if cfg.engine not in ("process", "thread"):
        raise NextbitError(f"--engine must be process or thread, got {cfg.engine!r}")
    if cfg.engine_threads < 0:
        raise NextbitError(f"--engine-threads must be >= 0, got {cfg.engine_threads}")
    if cfg.engine_threads and cfg.engine == "thread":
        raise NextbitError("--engine-threads is for --engine process (a thread engine uses this process's torch threads)")
    key = read_key(cfg)
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
    try:
        import uvicorn
    except ImportError:
        raise NextbitError('nextbit serve needs the [serve] extra: pip install -e ".[serve]"')
    app, runner, ck = build_app(cfg)
    sock = listen(cfg.host, cfg.port)
    runner.start()
    state = app.state.nextbit
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    base = f"http://{host}:{sock.getsockname()[1]}"  # the port the OS gave for --port 0
    print(f"nextbit serve: {ck.path} as {state.model_name!r} ({ck.model.num_params() / 1e6:.2f}M params, context {state.max_len}, "
          f"{cfg.max_batch} slots, {state.device})\n  API        {base}/v1  (OpenAI-compatible{', key required' if state.api_key else ''})\n"
          f"  chat page  {base}/\n  metrics    {base}/metrics\nCtrl-C stops it.", flush=True)
    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level,
                            timeout_graceful_shutdown=cfg.shutdown_timeout)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        runner.stop()
        sock.close()
        print("nextbit serve: stopped", file=sys.stderr, flush=True)
