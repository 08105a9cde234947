"""The uvicorn launcher of both web apps: uvicorn on a socket already bound (core/net.py's `listen`, so a port in use
is one line before the banner), Ctrl-C letting the requests in flight finish for `shutdown_timeout` seconds; and the
same server in a thread (`in_thread`, what `nextbit eval lm` runs its in-process server with)."""

from __future__ import annotations

import contextlib
import importlib
import socket
import sys
import threading
import time
from typing import Callable, Iterator, Optional

from nextbit.core.errors import NextbitError


def need_uvicorn(command: str, extra: str):
    """The uvicorn module, or one line naming the extra that installs it."""
    try:
        import uvicorn
    except ImportError:
        raise NextbitError(f'{command} needs the [{extra}] extra: pip install -e ".[{extra}]"')
    return uvicorn


def base_url(host: str, sock: socket.socket) -> str:
    """The URL of the bound socket (the port the OS gave for --port 0; an IPv6 host in brackets)."""
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{sock.getsockname()[1]}"


def preload() -> None:
    """Import before serving what the first streamed response would import: anyio's asyncio backend, which Starlette's
    StreamingResponse loads lazily (a fifth of a second here, during which the first stream's tokens wait)."""
    try:
        importlib.import_module("anyio._backends._asyncio")
    except ImportError:  # anyio moved it: the first stream imports what it needs, a little later
        pass


def run(app, sock: socket.socket, *, name: str, log_level: str, shutdown_timeout: float,
        on_stop: Optional[Callable[[], None]] = None) -> None:
    """Serve `app` on `sock` until Ctrl-C; then `on_stop()`, the socket closed and "NAME: stopped" on stderr."""
    import uvicorn

    try:  # a Ctrl-C from here on (the banner is out) ends like one while serving
        preload()
        config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=shutdown_timeout)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        try:
            if on_stop is not None:
                on_stop()
        finally:
            sock.close()
            print(f"{name}: stopped", file=sys.stderr, flush=True)


@contextlib.contextmanager
def in_thread(app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning", start_timeout: float = 60.0) -> Iterator[str]:
    """`app` served by uvicorn in a daemon thread on host:port (0: a free one); yields its URL, stops it on leaving."""
    from nextbit.core.net import listen

    uvicorn = need_uvicorn("the in-process server", "serve")
    preload()
    sock = listen(host, port)
    try:
        server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="off"))
    except BaseException:
        sock.close()
        raise
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + start_timeout
        while not server.started and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not server.started:
            raise NextbitError("the in-process server did not start")
        yield base_url(host, sock)
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
