"""The engine core: the loop that owns the model and the engine's slots, in its own process (the default) or in a
thread of the server's process. It talks to the HTTP side (serve/runner.py) only through messages on a duplex
connection, so the two sides never share a GIL when they are two processes (vLLM's engine core does the same).

Messages to the core (tuples of plain values and small dataclasses; ids are the HTTP side's, `cid` names a call that
gets a reply):

    ("submit", rid, Submission)                       a request joins the queue (and the batch at the next step)
    ("cancel", rid)                                   its client went away: its slot is freed at once
    ("score", cid, ids, top)                          each token's log-probability (echo), between two steps
    ("reload", cid, checkpoint, check)                load a checkpoint (in a short-lived thread), check it, and swap
                                                      it in once the running rows have finished
    ("stop",)

Messages from the core, one per loop turn that had news (so one per engine step while it decodes):

    ("ready", info) | ("failed", message)             first, once: the core is up, or why it could not start
    ("news", events, replies, (running, waiting))
        events:  (rid, "token", token, logprob, top) | (rid, "done", Finish) | (rid, "error", message) | (rid, "dropped")
        replies: (cid, True, value) | (cid, False, (kind, message))    kind: "bad_checkpoint" | "superseded" | "failed"
    ("bye",)                                          last: the core stopped

The engine's Request lives here only: it is built from the Submission, and the HTTP side keeps its own record of
what it streams (serve/choices.py).

A fault inside a step fails the requests in that batch only; the core starts the engine afresh and keeps serving the
queue. A reload takes effect between steps: no request fails and none mixes two models' weights.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import threading
import traceback
from dataclasses import dataclass
from typing import Any, Optional

import torch

from nextbit.core.checkpoint import load_checkpoint
from nextbit.core.errors import NextbitError
from nextbit.core.model import GPT
from nextbit.infer.engine import Engine, Request
from nextbit.infer.decoding import SamplingParams

IDLE_POLL = 0.05  # seconds the core waits for a message when it has nothing to decode


@dataclass(frozen=True, eq=False)  # a submission is itself: two alike requests are still two
class Submission:
    """One request as the wire carries it to the engine core: what the engine needs to run it, nothing it reports."""

    prompt: list[int]
    params: SamplingParams
    seed: int  # the row's random stream (sampling.row_seed)
    logprobs: int = -1  # >= 0: report each token's log-probability and this many top alternatives


@dataclass(frozen=True)
class ServeCheck:
    """What a checkpoint must match to be served in place of the one running (a hot reload)."""

    tokenizer_hash: str
    max_len: int


def check_servable(ck, check: Optional[ServeCheck] = None) -> None:
    """One line saying why this checkpoint cannot be served (a reward model; another tokenizer; too short a context)."""
    if "reward" in ck.model.heads or ck.info.get("meta", {}).get("kind") == "reward_model":
        raise NextbitError(f"{ck.path} is a reward model; serve a policy (a pretrained, SFT or PPO checkpoint)")
    if check is not None:
        if ck.tokenizer.hash != check.tokenizer_hash:
            raise NextbitError(f"{ck.path} has another tokenizer ({ck.tokenizer.hash}, serving {check.tokenizer_hash})")
        if ck.model.cfg.seq_len < check.max_len:
            raise NextbitError(f"{ck.path} has a context of {ck.model.cfg.seq_len}, less than --max-model-len {check.max_len}")


def read_checkpoint(path: str, device) -> Any:
    """load_checkpoint, with the errors the OS gives for a bad path (too long, a NUL byte, no permission) as one line."""
    try:
        return load_checkpoint(path, device)
    except (OSError, ValueError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise NextbitError(f"cannot read the checkpoint {path[:200]!r}: {why}") from None


class EngineCore:
    def __init__(self, conn, model: GPT, tokenizer, checkpoint: str, *, slots: int, max_len: int, device):
        self.conn, self.tokenizer, self.slots, self.max_len, self.device = conn, tokenizer, slots, max_len, device
        self.checkpoint = checkpoint
        self.engine = self._new_engine(model)
        self.reqs: dict[int, Request] = {}  # every request the core holds (waiting or running), by the HTTP side's id
        self.events: list[tuple] = []
        self.replies: list[tuple] = []
        self.pending_reload: Optional[tuple[GPT, str, int, dict]] = None  # loaded and checked, waiting for the rows
        self.loaded: "queue.Queue[tuple]" = queue.Queue()  # reload loader threads -> the loop
        self._said: Optional[tuple] = None  # the (running, waiting) last sent

    def _new_engine(self, model: GPT) -> Engine:
        eng = Engine(model.eval(), self.tokenizer, sync_every=1)  # one step per sync: tokens stream as they come
        eng.start(self.slots, self.max_len)
        return eng

    @property
    def load(self) -> tuple[int, int]:
        running = len(self.engine.running)
        return running, len(self.reqs) - running

    # ---- the loop -------------------------------------------------------------------------------------------------
    def run(self) -> None:
        try:
            while True:
                wait = 0.0 if self.engine.busy else IDLE_POLL
                while self.conn.poll(wait):
                    msg = self.conn.recv()
                    if msg[0] == "stop":
                        return
                    self._handle(msg)
                    wait = 0.0
                while not self.loaded.empty():
                    self._loaded(*self.loaded.get_nowait())
                if self.pending_reload is not None and not self.engine.running:
                    self._swap()
                if self.engine.busy:
                    self._step()
                self._send_news()
        except (EOFError, OSError):  # the HTTP side is gone: nobody to serve
            return
        finally:
            try:
                self._send_news()  # what this turn produced (a request that finished) still goes out
                self.conn.send(("bye",))
            except (OSError, ValueError):
                pass

    def _send_news(self) -> None:
        load = self.load
        if self.events or self.replies or load != self._said:
            self.conn.send(("news", self.events, self.replies, load))
            self.events, self.replies, self._said = [], [], load

    def _handle(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "submit":
            _, rid, sub = msg
            req = Request(sub.prompt, sub.params, sub.seed, logprobs=sub.logprobs)
            req.on_token = lambda r, t, lp, rid=rid: self.events.append(
                (rid, "token", t, None if lp is None else lp.logprob, None if lp is None else lp.top))
            self.reqs[rid] = req
            try:
                self.engine.submit(req)
            except Exception as e:  # noqa: BLE001 - checked by the HTTP side already; never let it kill the loop
                self._end(rid, ("error", str(e)))
        elif kind == "cancel":
            rid = msg[1]
            if rid in self.reqs:
                self.engine.cancel(self.reqs[rid])
                self._end(rid, ("dropped",))
        elif kind == "score":
            _, cid, ids, top = msg
            try:
                self.replies.append((cid, True, self.engine.score(ids, top=top)))
            except Exception as e:  # noqa: BLE001
                self.replies.append((cid, False, ("failed", f"{type(e).__name__}: {e}")))
        elif kind == "reload":
            _, cid, checkpoint, check = msg
            threading.Thread(target=self._load, args=(cid, checkpoint, check), name="nextbit-load", daemon=True).start()

    def _load(self, cid: int, checkpoint: str, check: ServeCheck) -> None:
        """In a short-lived thread (so no OpenMP pool outlives it next to the loop's): load and check a checkpoint."""
        try:
            ck = read_checkpoint(checkpoint, self.device)
            check_servable(ck, check)
        except NextbitError as e:
            self.loaded.put((cid, None, ("bad_checkpoint", str(e))))
        except BaseException as e:  # noqa: BLE001 - whatever it was, the caller hears of it (it would wait forever)
            self.loaded.put((cid, None, ("failed", f"{type(e).__name__}: {e}")))
        else:
            self.loaded.put((cid, ck, None))

    def _loaded(self, cid: int, ck, error: Optional[tuple]) -> None:
        if error is not None:
            self.replies.append((cid, False, error))
            return
        if self.pending_reload is not None:  # the earlier one never took effect: say so (it would wait forever)
            self.replies.append((self.pending_reload[2], False, ("superseded", f"superseded by a later reload of {ck.path}")))
        path = str(ck.path.resolve())  # absolute, as /v1/models names the checkpoint it started with
        info = {"checkpoint": path, "weights_sha256": ck.info.get("weights_sha256"), "step": ck.info.get("meta", {}).get("step")}
        self.pending_reload = (ck.model, path, cid, info)

    def _step(self) -> None:
        try:
            finished = self.engine.step(admit=self.pending_reload is None)
        except Exception as e:  # noqa: BLE001 - a fault fails the batch it hit, not the server
            traceback.print_exc()
            waiting = list(self.engine.waiting)
            # every request held that is not waiting: the batch, and any the step had already taken out of it
            queued = {id(r) for r in waiting}
            hit = [rid for rid, r in self.reqs.items() if id(r) not in queued]
            self.engine.start(self.slots, self.max_len)
            for rid in hit:
                self._end(rid, ("error", f"the engine failed on this request's batch: {type(e).__name__}: {e}"))
            for r in waiting:
                self.engine.submit(r)
            return
        if finished:
            done = {id(r) for r in finished}
            for rid in [rid for rid, r in self.reqs.items() if id(r) in done]:
                self._end(rid, ("done", self.reqs[rid].finish))

    def _swap(self) -> None:
        model, checkpoint, cid, info = self.pending_reload
        self.pending_reload = None
        try:
            engine = self._new_engine(model)
        except Exception as e:  # noqa: BLE001 - the old engine goes on, its queue as it was
            self.replies.append((cid, False, ("failed", f"{type(e).__name__}: {e}")))
            return
        for r in self.engine.waiting:  # the queue moves to the new engine, in order
            engine.submit(r)
        self.engine, self.checkpoint = engine, checkpoint
        self.replies.append((cid, True, info))

    def _end(self, rid: int, event: tuple) -> None:
        if self.reqs.pop(rid, None) is not None:
            self.events.append((rid, *event))


def core_process(conn, checkpoint: str, device: str, slots: int, max_len: int, threads: int) -> None:
    """The engine process's main: load the checkpoint, say ready (or why not, in one line), run the loop."""
    if multiprocessing.parent_process() is not None:  # Ctrl-C reaches the whole process group: the server stops this one
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        if threads > 0:
            torch.set_num_threads(threads)
        ck = read_checkpoint(checkpoint, torch.device(device))
        core = EngineCore(conn, ck.model, ck.tokenizer, str(ck.path), slots=slots, max_len=max_len, device=torch.device(device))
    except Exception as e:  # noqa: BLE001 - said to the server, which stops with it
        conn.send(("failed", str(e) if isinstance(e, NextbitError) else f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", {"pid": os.getpid(), "threads": torch.get_num_threads()}))
    core.run()


def default_threads() -> int:
    """Torch threads for an engine process on CPU: every core but one, which the HTTP side needs (at least one)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cpus - 1)

