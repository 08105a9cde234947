"""Graceful Ctrl-C for a training loop (every training stage, PPO included), and what a run that stopped early means.

A training run's result (TrainLoop's, PPO's) carries `stopped_early`: the run ended before its last step, with a
checkpoint written; `interrupted`: Ctrl-C stopped it (otherwise --stop-after did); `step`: the last step done.
`report_stop` is the one place that reads them: a stopped run is said in one line on stderr, and one that Ctrl-C
stopped exits 130 (the shell's code for SIGINT), as does one whose caller cannot go on without its end (`fatal`).
"""

from __future__ import annotations

import signal
import sys
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


INTERRUPTED = 130  # the exit code of a run Ctrl-C stopped: the shell's 128 + SIGINT


def stopped_early(result: dict) -> bool:
    """Whether a training run ended before its last step (Ctrl-C or --stop-after), its checkpoint written."""
    return bool(result.get("stopped_early"))


def report_stop(result: dict, then: str, stage: str = "", fatal: bool = False) -> bool:
    """After a training run: nothing if it reached its last step (returns False). Otherwise one line on stderr,
    "interrupted [in the STAGE stage] at step N; THEN" (`then`: what becomes of its outputs), and exit 130 when Ctrl-C
    stopped it or when `fatal` (a pipeline that cannot go on without the stage's end); returns True when it goes on."""
    if not stopped_early(result):
        return False
    how = "interrupted" if result.get("interrupted") else "stopped"
    where = f" in the {stage} stage" if stage else ""
    print(f"{how}{where} at step {result.get('step')}; {then}", file=sys.stderr, flush=True)
    if result.get("interrupted") or fatal:
        raise SystemExit(INTERRUPTED)
    return True
