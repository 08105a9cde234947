"""The listening socket of nextbit's web servers (`nextbit serve`, `nextbit label serve`), bound before anything is
announced: a port in use or a host that is not there is one line naming it, not uvicorn's log and exit code 3 after
the banner; connections made once the URL is printed wait in the backlog until uvicorn accepts them."""

from __future__ import annotations

import socket

from nextbit.core.errors import NextbitError


def listen(host: str, port: int, backlog: int = 2048) -> socket.socket:
    if not 0 <= port <= 65535:
        raise NextbitError(f"--port must be in [0, 65535], got {port}")
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(addr)
            sock.listen(backlog)
        except OSError:
            sock.close()
            raise
    except OSError as e:  # socket.gaierror too
        raise NextbitError(f"cannot listen on {host}:{port} (--host / --port): {e.strerror or e}")
    return sock
