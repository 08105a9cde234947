"""Live servers and a browser for the tests, started the same way everywhere (imported by the modules that need them,
so the rest of the suite does not need uvicorn or selenium).

    with uvicorn_in_thread(app) as srv:   # an ASGI app on a free port of 127.0.0.1, uvicorn in a thread
        httpx.get(srv.url + "/health")
        srv.stop()                         # optional: also done on leaving the block
    with label_app_in_thread(cfg) as (url, state): ...   # `nextbit label serve` in this process, the same way
    with chromium() as driver: ...         # Debian's headless Chromium through Selenium
    wait_for(lambda: ..., timeout, "what")
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


class ThreadServer:
    def __init__(self, url: str, server, thread: threading.Thread, sock: socket.socket, join: float):
        self.url, self.server, self.thread, self.sock, self.join = url, server, thread, sock, join

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(self.join)
        self.sock.close()


@contextlib.contextmanager
def uvicorn_in_thread(app, join: float = 15):
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    srv = ThreadServer(f"http://127.0.0.1:{sock.getsockname()[1]}", server, thread, sock, join)
    try:
        yield srv
    finally:
        srv.stop()


@contextlib.contextmanager
def label_app_in_thread(cfg):
    """`nextbit label serve` in this process (a LabelServeConfig): build_label_app + uvicorn in a thread, on a free
    port of 127.0.0.1. Yields (url, state); the database is closed on leaving."""
    from nextbit.label.server import build_label_app

    app, state = build_label_app(cfg)
    try:
        with uvicorn_in_thread(app, join=10) as srv:
            yield srv.url, state
    finally:
        state.db.close()


@contextlib.contextmanager
def chromium(width: int = 1280, height: int = 860):
    import pytest

    webdriver = pytest.importorskip("selenium.webdriver")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", f"--window-size={width},{height}",
              "--force-device-scale-factor=1", "--no-first-run", "--disable-extensions"):
        opts.add_argument(a)
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    try:
        driver.set_window_size(width, height)
        yield driver
    finally:
        driver.quit()


def wait_for(cond, timeout=10.0, what="a condition"):
    from selenium.common.exceptions import StaleElementReferenceException

    deadline = time.time() + timeout
    while True:
        try:
            v = cond()
            if v:
                return v
        except StaleElementReferenceException:
            pass
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
