"""The HTTP side's handle on the engine core (serve/engine_process.py), which runs in its own process or in a thread.

    runner = EngineRunner(tokenizer, checkpoint, slots=32, max_len=1024, max_waiting=256, device="cpu")  # a process
    runner = EngineRunner(tokenizer, checkpoint, ..., model=model)    # the core in a thread of this process
    runner.start()
    sink = Sink(asyncio_loop)        # where one API request's events land, in its event loop
    runner.submit(submission, runner.emitter(sink))
        # events: ("token", token, TokenLogprobs | None) | ("done", Finish) | ("error", message)
    runner.cancel(submission)        # the client went away: its slot is freed at the next step
    await runner.score(ids, top)     # each prompt token's log-probability (echo), between two engine steps
    await runner.reload(path, check) # swap in another checkpoint, once the running rows have finished (logged on stderr)

Why a process: on a 2-core CPU the engine thread and the event loop fought over one GIL, and every torch op that
returned waited for the event loop to let go of it (BENCHMARKS.md, serving). Messages are plain tuples on a duplex
connection (a multiprocessing Pipe, or a pair of queues for a thread), so both cores see the same protocol.

The wire carries a Submission (prompt ids, sampling parameters, seed, logprobs); the engine's Request lives in the
core only, and the caller keeps its own record of what comes back. A receiver thread reads the core's news (one
message per engine step) and hands each request's events (its tokens with their log-probabilities, its end) to
asyncio in one call_soon_threadsafe per event loop and message.
The number of requests in the server (running and waiting) is bounded here: submit raises QueueFull past it. If the
core goes away (its process killed), every request held fails with an error event and `alive` turns False.
"""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing
import queue
import sys
import threading
import time
import traceback
from concurrent.futures import Future, InvalidStateError
from typing import Any, Callable, Optional

from nextbit.core.errors import NextbitError
from nextbit.core.model import GPT
from nextbit.infer.engine import TokenLogprobs
from nextbit.serve.engine_process import EngineCore, ServeCheck, Submission, core_process

Emit = Callable[[tuple], None]
READY_TIMEOUT = 600.0  # seconds a new engine process may take to load the checkpoint (a large model on a slow disk)


class QueueFull(Exception):
    pass


class EngineGone(RuntimeError):
    """The core has stopped (or its process went away): nothing submitted now would be answered."""


class EngineFailed(RuntimeError):
    """The core could not do what a call asked (a scoring pass or a new engine failed): the message says why."""


class ReloadSuperseded(Exception):
    """A reload still waiting for the running rows to finish was replaced by a later one."""


def in_fresh_thread(fn: Callable[[], Any]) -> Any:
    """fn() in a short-lived thread, its result returned (or its exception raised) here. Torch work done there
    (loading a checkpoint, allocating the cache) leaves no OpenMP thread pool behind in a long-lived thread: with two
    pools on a 2-core CPU, libgomp throttles its spin-waits and the engine thread's decode step ran 1.6x slower
    (see BENCHMARKS.md, serving)."""
    out: dict = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            out["error"] = e

    t = threading.Thread(target=run, name="nextbit-load")
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


class ThreadPipe:
    """One end of an in-process duplex connection with multiprocessing.Connection's poll / recv / send."""

    def __init__(self, inbox: queue.Queue, outbox: queue.Queue):
        self._in, self._out, self._held = inbox, outbox, []

    def send(self, obj) -> None:
        self._out.put(obj)

    def poll(self, timeout: float = 0.0) -> bool:
        if not self._held:
            try:
                self._held.append(self._in.get(timeout=timeout) if timeout else self._in.get_nowait())
            except queue.Empty:
                return False
        return True

    def recv(self):
        return self._held.pop() if self._held else self._in.get()


def reload_line(old: str, info: dict) -> str:
    """The server's log line when a reload takes effect: which checkpoint, old -> new, the new weights' hash and step."""
    sha = info.get("weights_sha256") or "?"
    step = info.get("step")
    return (f"nextbit serve: reloaded {old} -> {info['checkpoint']} (weights sha256 {sha[:12]}"
            + ("" if step is None else f", step {step}") + ")")


def thread_pipe() -> tuple[ThreadPipe, ThreadPipe]:
    a, b = queue.Queue(), queue.Queue()
    return ThreadPipe(a, b), ThreadPipe(b, a)


class EngineRunner:
    def __init__(self, tokenizer, checkpoint: str, *, slots: int, max_len: int, max_waiting: int, device="cpu",
                 model: Optional[GPT] = None, threads: int = 0, on_step: Optional[Callable[[int, int], None]] = None):
        """model given: the core runs in a thread of this process, on that model. Else start() spawns an engine
        process that loads `checkpoint` on `device` with `threads` torch threads (0: torch's default)."""
        self.tokenizer, self.slots, self.max_len, self.max_waiting = tokenizer, slots, max_len, max_waiting
        self.checkpoint, self.device, self.threads = checkpoint, str(device), threads
        self.on_step = on_step  # (running, waiting) after every engine step, for the metrics
        self.core: Optional[EngineCore] = None  # the core itself, when it runs in this process (tests reach into it)
        self._proc: Optional[multiprocessing.Process] = None
        if model is not None:
            self._conn, theirs = thread_pipe()
            self.core = in_fresh_thread(lambda: EngineCore(theirs, model, tokenizer, checkpoint, slots=slots, max_len=max_len,
                                                           device=next(model.parameters()).device))
        self._held: dict[int, tuple[Submission, Emit]] = {}  # every request in the server, by its id on the wire
        self._rid: dict[int, int] = {}  # id(submission) -> its id on the wire
        self._calls: dict[int, Future] = {}
        self._ids = itertools.count()
        self._outbox: dict[asyncio.AbstractEventLoop, list] = {}  # events posted since the last flush, per event loop
        self._running = 0  # as the core last said
        self._lock = threading.Lock()  # _held, _rid, _calls, _gone (never held while writing to the pipe)
        self._send_lock = threading.Lock()  # one writer at a time
        self._started = self._stopping = self._gone = False
        self.exit_reason = ""

    # ---- lifecycle ------------------------------------------------------------------------------------------------
    def start(self) -> None:
        if self.core is not None:
            threading.Thread(target=self.core.run, name="nextbit-engine", daemon=True).start()
        else:
            self._spawn()
        self._receiver = threading.Thread(target=self._receive, name="nextbit-receiver", daemon=True)
        self._receiver.start()
        self._started = True

    def _spawn(self) -> None:
        ctx = multiprocessing.get_context("spawn")  # never fork a process that holds torch's threads (or CUDA)
        self._conn, theirs = ctx.Pipe()
        self._proc = ctx.Process(target=core_process, name="nextbit-engine", daemon=True,
                                 args=(theirs, self.checkpoint, self.device, self.slots, self.max_len, self.threads))
        self._proc.start()
        theirs.close()
        deadline = time.monotonic() + READY_TIMEOUT
        msg = None
        try:
            while msg is None:
                if self._conn.poll(0.1):
                    msg = self._conn.recv()
                elif not self._proc.is_alive() or time.monotonic() > deadline:
                    break
        except (EOFError, OSError):  # it died before it said anything
            msg = None
        if msg is None:
            self._proc.kill()
            self._proc.join()
            raise NextbitError(f"the engine process did not start (exit code {self._proc.exitcode})")
        if msg[0] != "ready":
            self._proc.join(10)
            raise NextbitError(f"the engine process could not start: {msg[1]}")
        self.engine_info = msg[1]

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the core; requests still held get an error event (nobody would answer them)."""
        self._stopping = True
        if not self._started:
            return
        try:
            self._send(("stop",))
        except EngineGone:
            pass
        self._receiver.join(timeout)
        if self._proc is not None:
            self._proc.join(timeout)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join()
            self._conn.close()

    @property
    def alive(self) -> bool:
        """Whether the core runs (a request submitted to a stopped core would wait forever)."""
        return self._started and not self._stopping and not self._gone

    @property
    def engine(self):
        """The engine, when the core runs in this process (for tests and debugging)."""
        if self.core is None:
            raise AttributeError("the engine runs in another process")
        return self.core.engine

    @property
    def load(self) -> tuple[int, int]:
        """(running, waiting) right now."""
        running = self._running
        return running, max(0, len(self._held) - running)

    # ---- requests -------------------------------------------------------------------------------------------------
    def submit(self, req: Submission, emit: Emit) -> None:
        self.submit_many([req], [emit])

    def submit_many(self, reqs: list[Submission], emits: list[Emit]) -> None:
        """All or none: a request with n choices is admitted whole."""
        with self._lock:
            if self._gone:
                raise EngineGone(self.exit_reason)
            if len(self._held) + len(reqs) > self.slots + self.max_waiting:
                raise QueueFull
            rids = []
            for r, e in zip(reqs, emits):
                rids.append(next(self._ids))
                self._held[rids[-1]], self._rid[id(r)] = (r, e), rids[-1]
        try:
            self._send(*[("submit", rid, r) for rid, r in zip(rids, reqs)])
        except EngineGone:
            with self._lock:  # never taken: nobody will be told of them
                for rid, r in zip(rids, reqs):
                    self._held.pop(rid, None)
                    self._rid.pop(id(r), None)
            raise

    def cancel(self, req: Submission) -> None:
        rid = self._rid.get(id(req))
        if rid is not None:
            try:
                self._send(("cancel", rid))
            except EngineGone:  # the core is gone: the receiver fails the request anyway
                pass

    def emitter(self, sink: "Sink") -> Emit:
        """An Emit for the receiver thread that posts to `sink`; posted events reach it at the next flush."""
        def emit(event: tuple) -> None:
            self._outbox.setdefault(sink.loop, []).append((sink, time.perf_counter(), event))
        return emit

    async def score(self, ids: list[int], top: int) -> list[Optional[TokenLogprobs]]:
        return await self._call(lambda cid: ("score", cid, list(ids), top))

    async def reload(self, checkpoint: str, check: ServeCheck) -> dict:
        """Load `checkpoint` in the core and swap it in between steps, once the running rows have finished:
        {"checkpoint", "weights_sha256"}. NextbitError: it cannot be served (said in one line). `checkpoint` (what
        /v1/models names) changes when the core says so, even if the caller has gone meanwhile."""
        return await self._call(lambda cid: ("reload", cid, checkpoint, check), reload=True)

    async def _call(self, message: Callable[[int], tuple], reload: bool = False) -> Any:
        fut: Future = Future()
        with self._lock:
            if self._gone:
                raise EngineGone(self.exit_reason)
            cid = next(self._ids)
            self._calls[cid] = (fut, reload)
        try:
            self._send(message(cid))
        except EngineGone:
            with self._lock:
                self._calls.pop(cid, None)
            raise
        return await asyncio.wrap_future(fut)

    def _send(self, *msgs: tuple) -> None:
        """Write to the core (never while holding _lock: the receiver needs it to read the core's news, and a core
        blocked on a full pipe would never read ours). A pipe that breaks is a core that has gone."""
        try:
            with self._send_lock:
                for m in msgs:
                    self._conn.send(m)
        except (OSError, ValueError) as e:
            raise EngineGone(self.exit_reason or f"the engine process is not there ({type(e).__name__})") from None

    # ---- the receiver thread --------------------------------------------------------------------------------------
    def _receive(self) -> None:
        why = "the engine stopped"
        try:
            while True:
                msg = self._conn.recv()
                if msg[0] == "bye":
                    break
                try:
                    self._news(*msg[1:])
                except Exception:  # noqa: BLE001 - a bug here must not leave every later request hanging
                    traceback.print_exc()
        except BaseException as e:  # noqa: BLE001 - EOF (the process died), or anything else: the same end
            with self._lock:
                self._gone = True
            if self._proc is not None:
                self._proc.join(5)
                why = f"the engine process exited (code {self._proc.exitcode})"
            elif not isinstance(e, (EOFError, OSError)):
                why = f"the engine link failed: {type(e).__name__}: {e}"
        with self._lock:  # from here on nothing new is taken (submit and calls raise EngineGone)
            self._gone, self.exit_reason, self._running = True, why, 0
            held, calls, self._calls = list(self._held), [f for f, _ in self._calls.values()], {}
        if not self._stopping:
            print(f"nextbit serve: {why}; /health answers 503 from now on", file=sys.stderr, flush=True)
        for rid in held:
            self._event(rid, "error", why)
        for fut in calls:
            _settle(fut, error=EngineGone(why))
        self._flush()
        if self.on_step is not None:
            self.on_step(0, 0)

    def _news(self, events: list[tuple], replies: list[tuple], load: tuple[int, int]) -> None:
        self._running = load[0]
        for ev in events:
            self._event(*ev)
        for cid, ok, value in replies:
            self._reply(cid, ok, value)
        self._flush()
        if self.on_step is not None:
            self.on_step(*self.load)

    def _event(self, rid: int, kind: str, *rest) -> None:
        if kind == "token":
            held = self._held.get(rid)
            if held is not None:
                t, logprob, top = rest
                held[1](("token", t, None if logprob is None else TokenLogprobs(logprob, [tuple(x) for x in top])))
            return
        with self._lock:
            held = self._held.pop(rid, None)
            if held is None:
                return
            self._rid.pop(id(held[0]), None)
        if kind in ("done", "error"):  # dropped: its client is gone, nobody waits
            held[1]((kind, rest[0]))

    def _reply(self, cid: int, ok: bool, value: Any) -> None:
        with self._lock:
            fut, reload = self._calls.pop(cid, (None, False))
        if fut is None:
            return
        if ok:
            if reload:
                old, self.checkpoint = self.checkpoint, value["checkpoint"]
                print(reload_line(old, value), file=sys.stderr, flush=True)
            _settle(fut, value)
            return
        kind, message = value
        _settle(fut, error={"bad_checkpoint": NextbitError, "superseded": ReloadSuperseded}.get(kind, EngineFailed)(message))

    def _flush(self) -> None:
        """Hand the posted events over: one thread-safe call per event loop."""
        if not self._outbox:
            return
        outbox, self._outbox = self._outbox, {}
        for loop, items in outbox.items():
            try:
                loop.call_soon_threadsafe(deliver, items)
            except RuntimeError:  # that event loop is closed (the server is going away): nobody waits for these
                pass


def _settle(fut: Future, result: Any = None, error: Optional[BaseException] = None) -> None:
    """Resolve a future whose caller may have gone meanwhile (cancelled it, as a server shutting down does)."""
    try:
        fut.set_exception(error) if error is not None else fut.set_result(result)
    except InvalidStateError:
        pass


class Sink:
    """The events of one API request, in its asyncio event loop: `deliver` (on that loop) adds, `get` takes them all,
    waiting up to `timeout` seconds when there are none (an empty list: time to check on the client)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.items: list[tuple[float, tuple]] = []  # (time posted, event)
        self._waiter: Optional[asyncio.Future] = None

    def add(self, stamp: float, event: tuple) -> None:
        self.items.append((stamp, event))
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def get(self, timeout: float) -> list[tuple[float, tuple]]:
        if not self.items:
            self._waiter = waiter = self.loop.create_future()
            timer = self.loop.call_later(timeout, lambda: waiter.done() or waiter.set_result(None))
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
        out, self.items = self.items, []
        return out


def deliver(items: list[tuple["Sink", float, tuple]]) -> None:
    """On the event loop: one engine step's events into their sinks."""
    for sink, stamp, event in items:
        sink.add(stamp, event)
