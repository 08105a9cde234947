"""Graceful Ctrl-C for a training loop (every training stage, PPO included)."""

from __future__ import annotations

import signal
import threading

from tqdm import tqdm


class CtrlC:
    """Graceful Ctrl-C for a training loop, as a context manager: the first SIGINT only sets `requested` (the loop
    finishes its step, writes a checkpoint and stops); a second one raises KeyboardInterrupt at once. Installed only
    in the main thread (signal handlers can live nowhere else); the previous handler comes back on exit."""

    def __init__(self, say: bool = True):
        self.requested, self.say, self._old = False, say, None

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self.say:
            tqdm.write("Ctrl-C: finishing this step and writing a checkpoint (press again to abort without saving)")

    def __enter__(self) -> "CtrlC":
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
            self._old = None
