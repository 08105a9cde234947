"""The engine loop: one thread owns the model and the engine's slots; HTTP handlers talk to it through a queue.

    runner = EngineRunner(model, tokenizer, checkpoint, slots=32, max_len=1024, max_waiting=256)
    sink = Sink(asyncio_loop)        # where one API request's events land, in its event loop
    runner.submit(request, runner.emitter(sink))   # events: ("token",) | ("done", finish) | ("error", message)
    runner.cancel(request)           # the client went away: its slot is freed at the next step
    await runner.call(fn)            # run fn(engine) between two steps (scoring a prompt for echo, for example)
    await runner.reload(model, path) # swap the model between steps, once the running rows have finished

Events are posted on the loop thread and handed to asyncio once per engine step (one call_soon_threadsafe for all
the rows of that step, per event loop), not once per token: with 32 streams, per-token wake-ups of the event loop
cost the engine thread its GIL and its cores (BENCHMARKS.md, serving).

Requests that arrive while others decode join the batch at the next step (continuous batching). The number of
requests in the server (running and waiting) is bounded: submit raises QueueFull past it. A fault inside a step fails
the requests in that batch only; the loop starts the engine afresh and keeps serving the queue.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
import traceback
from concurrent.futures import Future, InvalidStateError
from typing import Any, Callable, Optional

from nextbit.core.model import GPT
from nextbit.infer.engine import Engine, Request

Emit = Callable[[tuple], None]


class QueueFull(Exception):
    pass


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


class ReloadSuperseded(Exception):
    """A reload still waiting for the running rows to finish was replaced by a later one."""


class EngineRunner:
    def __init__(self, model: GPT, tokenizer, checkpoint: str, *, slots: int, max_len: int, max_waiting: int,
                 on_step: Optional[Callable[[int, int], None]] = None):
        self.tokenizer, self.slots, self.max_len, self.max_waiting = tokenizer, slots, max_len, max_waiting
        self.checkpoint = checkpoint
        self.on_step = on_step  # (running, waiting) after every step, for the metrics
        self.engine = self._new_engine(model)
        self._inbox: "queue.Queue[tuple]" = queue.Queue()
        self._emit: dict[int, tuple[Request, Emit]] = {}  # every request the loop holds, by id
        self._outbox: dict[asyncio.AbstractEventLoop, list] = {}  # events posted since the last flush, per event loop
        self._reload: Optional[tuple[GPT, str, Future]] = None
        self._in_server = 0  # running + waiting + not yet taken from the inbox
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="nextbit-engine", daemon=True)
        self.steps = 0

    def _new_engine(self, model: GPT) -> Engine:
        eng = Engine(model.eval(), self.tokenizer, sync_every=1)  # one step per sync: tokens stream as they come
        eng.start(self.slots, self.max_len)
        return eng

    # ---- called from the HTTP side --------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._inbox.put(("wake",))
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        """Whether the loop thread runs (a request submitted to a stopped loop would wait forever)."""
        return self._thread.is_alive() and not self._stop.is_set()

    @property
    def load(self) -> tuple[int, int]:
        """(running, waiting) right now."""
        running = len(self.engine.running)
        return running, max(0, self._in_server - running)

    def submit(self, req: Request, emit: Emit) -> None:
        with self._lock:
            if self._in_server >= self.slots + self.max_waiting:
                raise QueueFull
            self._in_server += 1
        self._inbox.put(("submit", req, emit))

    def submit_many(self, reqs: list[Request], emits: list[Emit]) -> None:
        """All or none: a request with n choices is admitted whole."""
        with self._lock:
            if self._in_server + len(reqs) > self.slots + self.max_waiting:
                raise QueueFull
            self._in_server += len(reqs)
        for r, e in zip(reqs, emits):
            self._inbox.put(("submit", r, e))

    def cancel(self, req: Request) -> None:
        self._inbox.put(("cancel", req))

    def emitter(self, sink: "Sink") -> Emit:
        """An Emit for the loop thread that posts to `sink`; posted events reach it at the next flush."""
        def emit(event: tuple) -> None:
            self._outbox.setdefault(sink.loop, []).append((sink, time.perf_counter(), event))
        return emit

    async def call(self, fn: Callable[[Engine], Any]) -> Any:
        """fn(engine) on the loop thread between two steps."""
        fut: Future = Future()
        self._inbox.put(("call", fn, fut))
        return await asyncio.wrap_future(fut)

    async def reload(self, model: GPT, checkpoint: str) -> None:
        fut: Future = Future()
        self._inbox.put(("reload", model, checkpoint, fut))
        await asyncio.wrap_future(fut)

    # ---- the loop thread ------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            busy = self.engine.busy
            try:
                msg = self._inbox.get_nowait() if busy else self._inbox.get(timeout=0.05)
            except queue.Empty:
                msg = None
            while msg is not None:
                self._handle(msg)
                try:
                    msg = self._inbox.get_nowait()
                except queue.Empty:
                    msg = None
            if self._reload is not None and not self.engine.running:
                self._swap()
            if self.engine.busy:
                self._step()
            self._flush()

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

    def _handle(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "submit":
            _, req, emit = msg
            self._emit[id(req)] = (req, emit)
            try:
                self.engine.submit(req)
            except Exception as e:  # noqa: BLE001 - checked by the HTTP side already; never let it kill the loop
                self._finish(req, ("error", str(e)))
        elif kind == "cancel":
            req = msg[1]
            if id(req) in self._emit:
                self.engine.cancel(req)
                self._finish(req, None)
        elif kind == "call":
            _, fn, fut = msg
            if not fut.set_running_or_notify_cancel():  # its caller is gone (the server is shutting down)
                return
            try:
                fut.set_result(fn(self.engine))
            except Exception as e:  # noqa: BLE001
                fut.set_exception(e)
        elif kind == "reload":
            _, model, checkpoint, fut = msg
            if self._reload is not None:  # the earlier one never took effect: say so (it would wait forever)
                _settle(self._reload[2], error=ReloadSuperseded(f"superseded by a later reload of {checkpoint}"))
            self._reload = (model, checkpoint, fut)

    def _step(self) -> None:
        try:
            finished = self.engine.step(admit=self._reload is None)
        except Exception as e:  # noqa: BLE001 - a fault fails the batch it hit, not the server
            traceback.print_exc()
            waiting = list(self.engine.waiting)
            # every request held that is not waiting: the batch, and any the step had already taken out of it
            queued = {id(r) for r in waiting}
            hit = [r for r, _ in list(self._emit.values()) if id(r) not in queued]
            self.engine.start(self.slots, self.max_len)
            for r in hit:
                self._finish(r, ("error", f"the engine failed on this request's batch: {type(e).__name__}: {e}"))
            for r in waiting:
                self.engine.submit(r)
            return
        self.steps += 1
        for r in finished:
            self._finish(r, ("done", r.finish))
        if self.on_step is not None:
            self.on_step(*self.load)

    def _swap(self) -> None:
        model, checkpoint, fut = self._reload
        waiting = list(self.engine.waiting)
        try:
            engine = self._new_engine(model)
        except Exception as e:  # noqa: BLE001
            _settle(fut, error=e)
        else:
            self.engine, self.checkpoint = engine, checkpoint
            _settle(fut)
        for r in waiting:
            self.engine.submit(r)
        self._reload = None

    def _finish(self, req: Request, event: Optional[tuple]) -> None:
        held = self._emit.pop(id(req), None)
        if held is None:
            return
        emit = held[1]
        with self._lock:
            self._in_server -= 1
        if event is not None:
            emit(event)


def _settle(fut: Future, result: Any = None, error: Optional[BaseException] = None) -> None:
    """Resolve a future whose caller may have gone meanwhile (cancelled it, as a server shutting down does): that
    must never raise on the loop thread."""
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
