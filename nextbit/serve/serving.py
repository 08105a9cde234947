"""The serving class: what /v1/completions, /v1/chat/completions, /v1/models, the tokenizer routes and /admin/reload
do, apart from HTTP (vLLM's OpenAIServing* role). The routes (serve/app.py) read the key and the body and hand a
validated request (serve/protocol.py) to a method here; each method returns the answer's JSON, or, for a streamed
answer, the server-sent events as an async iterator of bytes. Errors are web/api.py's WebError, in OpenAI's shape.

    serving = Serving(state, Metrics())
    out = await serving.completions(CompletionRequest(prompt="x", max_tokens=4), disconnected, time.perf_counter())

`disconnected()` says whether the client went away (the route passes its request's is_disconnected): whatever is
still running for a client that went away is cancelled.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable, Optional, Union

from nextbit.core.chat import render_messages
from nextbit.core.errors import NextbitError
from nextbit.core.tokenizer import SPECIAL_TOKENS
from nextbit.infer.decoding import row_seed
from nextbit.serve.choices import Choice, legacy_logprobs
from nextbit.serve.engine_process import ServeCheck, Submission
from nextbit.serve.metrics import Metrics
from nextbit.serve.protocol import ChatRequest, CompletionRequest, DetokenizeRequest, ReloadRequest, TokenizeRequest
from nextbit.serve.runner import EngineFailed, EngineGone, EngineRunner, QueueFull, ReloadSuperseded, Sink
from nextbit.web.api import WebError, error_body

DISCONNECT_CHECK = 0.25  # seconds between checks that the client is still there
Disconnected = Callable[[], Awaitable[bool]]
Answer = Union[dict, AsyncIterator[bytes]]  # a whole response's JSON, or a stream's server-sent events

# A Jinja rendering of core/chat.py's template, for clients that format chats themselves (lm-eval's remote tokenizer).
CHAT_TEMPLATE = ("<|endoftext|>{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@dataclass
class ServerState:
    runner: EngineRunner
    tokenizer: object
    model_name: str
    max_len: int
    api_key: Optional[str]
    admin_key: Optional[str]
    max_n: int
    max_body: int
    device: str = "cpu"


def bad(message: str, param: Optional[str] = None) -> WebError:
    """A 400 about the request's field `param`."""
    return WebError(400, message, param=param)


def engine_gone() -> WebError:
    """The answer to work for an engine loop that has stopped (or whose process died): it would never be answered."""
    return WebError(503, "the engine loop is not running", type_="server_error")


def server_error(message: str, param: Optional[str] = None) -> WebError:
    return WebError(500, message, param=param, type_="server_error")


class Serving:
    def __init__(self, state: ServerState, metrics: Metrics):
        self.state, self.metrics, self.tok = state, metrics, state.tokenizer

    # ---- checks -----------------------------------------------------------------------------------------------------
    def need_engine(self) -> None:
        """Work for the engine loop is refused when the loop has stopped: it would never be answered."""
        if not self.state.runner.alive:
            raise engine_gone()

    def check_model(self, name: Optional[str]) -> None:
        if name is not None and name != self.state.model_name:
            raise WebError(404, f"the model {name!r} does not exist; this server serves {self.state.model_name!r}",
                           param="model", type_="NotFoundError")

    def encode_prompt(self, p: Union[str, list[int]]) -> list[int]:
        tok = self.tok
        if isinstance(p, str):
            return tok.encode_document(p)  # as in training and `nextbit sample`
        if any(t < 0 or t >= tok.vocab_size for t in p):
            raise bad(f"prompt token ids must be in [0, {tok.vocab_size})", "prompt")
        if not p:
            raise bad("a prompt needs at least one token", "prompt")
        return list(p)

    def prompt_text(self, raw: Union[str, list[int]], ids: list[int]) -> str:
        """What echo returns for a prompt: the text as sent (its implicit <|endoftext|> shows as ""), or the ids decoded."""
        return raw if isinstance(raw, str) else self.tok.decode(ids)

    def room(self, ids: list[int], max_tokens: Optional[int], field: str) -> int:
        n, max_len = len(ids), self.state.max_len
        if n >= max_len:
            raise bad(f"this model's maximum context length is {max_len} tokens; the prompt has {n}", "prompt")
        if max_tokens is None:
            return max_len - n
        if n + max_tokens > max_len:
            raise bad(f"this model's maximum context length is {max_len} tokens; you requested {n + max_tokens} "
                      f"({n} in the prompt, {max_tokens} in {field})", field)
        return max_tokens

    def check_n(self, req, n_prompts: int) -> None:
        if req.n > self.state.max_n:
            raise bad(f"n must be at most {self.state.max_n}", "n")
        if getattr(req, "best_of", None) not in (None, req.n):
            raise bad(f"best_of must equal n ({req.n}): this server returns every sample it draws", "best_of")
        room_ = self.state.runner.slots + self.state.runner.max_waiting
        if n_prompts * req.n > room_:  # it could never be admitted: not a 429 to retry forever
            raise bad(f"{n_prompts} prompt(s) x n={req.n} choices is more than this server holds at once ({room_})", "n")

    # ---- running choices --------------------------------------------------------------------------------------------
    def choices_for(self, prompts: list[list[int]], req, max_new: list[int], logprobs: int, stop_ids=None) -> list[Choice]:
        tok = self.tok
        self.check_n(req, len(prompts))
        base = req.seed if req.seed is not None else random.getrandbits(62)
        bias = req.token_bias()
        if bias and max(bias) >= tok.vocab_size:
            raise bad(f"logit_bias token ids must be in [0, {tok.vocab_size})", "logit_bias")
        out = []
        for i, (ids, m) in enumerate(zip(prompts, max_new)):
            for j in range(req.n):
                params = req.sampling_params(m, tok.vocab_size, stop_ids)
                out.append(Choice(len(out), Submission(ids, params, row_seed(base + i if req.seed is None else base, j),
                                                       logprobs=logprobs), tok, req.stops()))
        return out

    async def run(self, choices: list[Choice], disconnected: Disconnected, t0: float) -> AsyncIterator[Choice]:
        """Submit the choices, then yield a choice each time it has new tokens or finished, until all are done.
        A client that goes away cancels whatever is still running."""
        runner, metrics = self.state.runner, self.metrics
        sink = Sink(asyncio.get_running_loop())
        by_id = {id(c): c for c in choices}
        last: dict[int, float] = {}
        emit = runner.emitter(sink)
        self.need_engine()
        try:
            runner.submit_many([c.req for c in choices], [lambda event, rid=id(c): emit((rid, *event)) for c in choices])
        except QueueFull:
            raise WebError(429, "the server is at capacity; retry shortly", type_="rate_limit_error", headers={"Retry-After": "1"})
        except EngineGone:
            raise engine_gone()
        metrics.prompt_tokens.inc(sum(len(c.req.prompt) for c in choices))
        pending = len(choices)
        check = time.perf_counter() + DISCONNECT_CHECK
        try:
            while pending:
                events = await sink.get(DISCONNECT_CHECK)
                if not events or time.perf_counter() >= check:  # while tokens flow too (a whole response)
                    check = time.perf_counter() + DISCONNECT_CHECK
                    if await disconnected():
                        return
                moved: dict[int, Choice] = {}  # the choices that moved on, in order: one chunk each for all their news
                for stamp, (rid, kind, *rest) in events:
                    c = moved[rid] = by_id[rid]
                    if kind == "token":
                        c.add(*rest)
                        metrics.generation_tokens.inc()
                        (metrics.itl.observe(stamp - last[rid]) if rid in last else metrics.ttft.observe(stamp - t0))
                        last[rid] = stamp
                    else:
                        c.finish = rest[0] if kind == "done" else "error"
                        c.error = rest[0] if kind == "error" else None
                        pending -= 1
                for c in moved.values():
                    yield c
        finally:
            for c in choices:
                if not c.done:
                    runner.cancel(c.req)

    async def complete(self, choices: list[Choice], disconnected: Disconnected, t0: float) -> None:
        """Run the choices to the end (a whole, non-streamed response)."""
        async for _ in self.run(choices, disconnected, t0):
            pass
        bad_ = [c for c in choices if c.finish == "error"]
        if bad_:
            raise server_error(bad_[0].error or "the engine failed")

    async def event_stream(self, choices: list[Choice], disconnected: Disconnected, t0: float, head: list[dict],
                           piece: Callable[[Choice], Optional[dict]], tail: Callable[[], Optional[dict]]) -> AsyncIterator[bytes]:
        """Server-sent events: `head` chunks, then `piece(choice)` each time a choice moves on (None: nothing to
        send yet), then `tail()` (the usage chunk, if asked) and [DONE]. Errors raised before the first event (a full
        queue) are raised here, so that they are still a proper HTTP error."""
        gen = self.run(choices, disconnected, t0)
        first = await _first(gen)

        async def events():
            for h in head:
                yield sse(h)
            async for c in _chain(first, gen):
                if c.finish == "error":
                    yield sse(error_body(c.error or "the engine failed", "server_error", None, 500))
                    continue
                ev = piece(c)
                if ev is not None:
                    yield sse(ev)
            end = tail()
            if end is not None:
                yield sse(end)
            yield b"data: [DONE]\n\n"

        return events()

    # ---- /v1/completions ----------------------------------------------------------------------------------------------
    async def completions(self, req: CompletionRequest, disconnected: Disconnected, t0: float) -> Answer:
        self.check_model(req.model)
        state, tok = self.state, self.tok
        raw = req.prompts()
        prompts = [self.encode_prompt(p) for p in raw]
        if req.max_tokens == 0 and not req.echo:
            raise bad("max_tokens must be >= 1 (0 only with echo)", "max_tokens")
        max_new = [self.room(ids, req.max_tokens, "max_tokens") for ids in prompts]
        self.check_n(req, len(prompts))  # before any work (echo with max_tokens 0 generates nothing, but answers n times)
        logprobs = -1 if req.logprobs is None else req.logprobs
        scored: list = [None] * len(prompts)
        if req.echo and req.logprobs is not None:
            self.need_engine()
            try:
                scored = [await state.runner.score(ids, logprobs) for ids in prompts]
            except EngineGone:
                raise engine_gone()
            except EngineFailed as e:
                raise server_error(f"the engine failed scoring the prompt: {e}")
        n_prompt = sum(len(p) for p in prompts)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if req.max_tokens == 0:  # echo only: score the prompt, generate nothing
            choices = [{"index": i * req.n + j, "text": self.prompt_text(raw[i], ids), "finish_reason": "length",
                        "logprobs": legacy_logprobs(tok, list(zip(ids, scored[i])), isinstance(raw[i], str))
                        if req.logprobs is not None else None}
                       for i, ids in enumerate(prompts) for j in range(req.n)]
            return {"id": rid, "object": "text_completion", "created": created, "model": state.model_name, "choices": choices,
                    "usage": {"prompt_tokens": n_prompt, "completion_tokens": 0, "total_tokens": n_prompt}}
        choices = self.choices_for(prompts, req, max_new, logprobs)
        echo_text = {c.index: self.prompt_text(raw[c.index // req.n], prompts[c.index // req.n]) if req.echo else ""
                     for c in choices}

        def logprobs_of(c: Choice):
            if req.logprobs is None:
                return None
            i = c.index // req.n
            return c.completion_logprobs(prompts[i] if req.echo else None, scored[i] if req.echo else None, isinstance(raw[i], str))

        def chunk(c: Choice, text: str, finish, lp=None) -> dict:
            return {"id": rid, "object": "text_completion", "created": created, "model": state.model_name,
                    "choices": [{"index": c.index, "text": text, "logprobs": lp, "finish_reason": finish}]}

        if not req.stream:
            await self.complete(choices, disconnected, t0)
            out = [{"index": c.index, "text": echo_text[c.index] + c.text(), "logprobs": logprobs_of(c), "finish_reason": c.finish_reason}
                   for c in choices]
            return {"id": rid, "object": "text_completion", "created": created, "model": state.model_name, "choices": out,
                    "usage": usage(choices, n_prompt)}

        sent_lp = {c.index: 0 for c in choices}
        head = []
        for c in choices:
            if req.echo:  # the prompt first, with its own logprobs when asked (as the whole response has them)
                lp = None
                if req.logprobs is not None:
                    n = sent_lp[c.index] = len(prompts[c.index // req.n])
                    lp = {key: v[:n] for key, v in logprobs_of(c).items()}
                head.append(chunk(c, echo_text[c.index], None, lp))

        def piece(c: Choice) -> Optional[dict]:
            text, lp = c.delta(), None
            if req.logprobs is not None:
                full = logprobs_of(c)
                lp = {key: v[sent_lp[c.index]:] for key, v in full.items()}
                sent_lp[c.index] = len(full["tokens"])
            return chunk(c, text, c.finish_reason, lp) if text or c.done or (lp and lp["tokens"]) else None

        def tail() -> Optional[dict]:
            if req.stream_options and req.stream_options.include_usage:
                return {"id": rid, "object": "text_completion", "created": created, "model": state.model_name,
                        "choices": [], "usage": usage(choices, n_prompt)}
            return None

        return await self.event_stream(choices, disconnected, t0, head, piece, tail)

    # ---- /v1/chat/completions -----------------------------------------------------------------------------------------
    async def chat(self, req: ChatRequest, disconnected: Disconnected, t0: float) -> Answer:
        self.check_model(req.model)
        state, tok = self.state, self.tok
        ids = render_messages(tok, [m.model_dump() for m in req.messages], add_generation_prompt=True)[0]
        field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        max_new = self.room(ids, req.max_completion_tokens or req.max_tokens, field)
        top = req.top_logprobs if req.top_logprobs is not None else 0
        if top > 5:
            raise bad("top_logprobs must be at most 5", "top_logprobs")
        choices = self.choices_for([ids], req, [max_new], top if req.logprobs else -1)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(c: Choice, delta: dict, finish, lp=None) -> dict:
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": state.model_name,
                    "choices": [{"index": c.index, "delta": delta, "logprobs": lp, "finish_reason": finish}]}

        if not req.stream:
            await self.complete(choices, disconnected, t0)
            out = [{"index": c.index, "message": {"role": "assistant", "content": c.text()},
                    "logprobs": c.chat_logprobs() if req.logprobs else None, "finish_reason": c.finish_reason} for c in choices]
            return {"id": rid, "object": "chat.completion", "created": created, "model": state.model_name, "choices": out,
                    "usage": usage(choices, len(ids))}

        sent_lp = {c.index: 0 for c in choices}

        def piece(c: Choice) -> Optional[dict]:
            text, lp = c.delta(), None
            if req.logprobs:
                n = len(c.tokens)
                lp = c.chat_logprobs(sent_lp[c.index], n)
                sent_lp[c.index] = n
            return chunk(c, {"content": text} if text else {}, c.finish_reason, lp) if text or c.done or (lp and lp["content"]) else None

        def tail() -> Optional[dict]:
            if req.stream_options and req.stream_options.include_usage:
                return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": state.model_name,
                        "choices": [], "usage": usage(choices, len(ids))}
            return None

        head = [chunk(c, {"role": "assistant", "content": ""}, None) for c in choices]
        return await self.event_stream(choices, disconnected, t0, head, piece, tail)

    # ---- models, tokenizer, reload ----------------------------------------------------------------------------------
    def model_card(self) -> dict:
        state = self.state
        return {"id": state.model_name, "object": "model", "created": int(time.time()), "owned_by": "nextbit",
                "root": state.runner.checkpoint, "max_model_len": state.max_len}

    def models(self) -> dict:
        return {"object": "list", "data": [self.model_card()]}

    def one_model(self, name: str) -> dict:
        self.check_model(name)
        return self.model_card()

    def tokenize(self, req: TokenizeRequest) -> dict:
        self.check_model(req.model)
        tok = self.tok
        if (req.prompt is None) == (req.messages is None):
            raise bad("give either prompt or messages", "prompt")
        if req.messages is not None:
            ids = render_messages(tok, [m.model_dump() for m in req.messages], add_generation_prompt=req.add_generation_prompt)[0]
        else:
            ids = ([tok.eot_id] if req.add_special_tokens else []) + encode_with_special(tok, req.prompt)
        return {"tokens": ids, "count": len(ids), "max_model_len": self.state.max_len}

    def detokenize(self, req: DetokenizeRequest) -> dict:
        self.check_model(req.model)
        tok = self.tok
        if any(t < 0 or t >= tok.vocab_size for t in req.tokens):
            raise bad(f"token ids must be in [0, {tok.vocab_size})", "tokens")
        return {"prompt": tok.decode(req.tokens)}

    def tokenizer_info(self) -> dict:
        return {"tokenizer_class": "nextbit-bpe", "vocab_size": self.tok.vocab_size, "model_max_length": self.state.max_len,
                "eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "pad_token": "<|pad|>",
                "chat_template": CHAT_TEMPLATE}

    async def reload(self, req: ReloadRequest) -> dict:
        if not req.checkpoint.strip():
            raise bad("checkpoint must be a checkpoint folder's path", "checkpoint")
        self.need_engine()
        try:  # the engine core loads and checks it (in a short-lived thread), then swaps it in between steps
            info = await self.state.runner.reload(req.checkpoint, ServeCheck(self.tok.hash, self.state.max_len))
        except NextbitError as e:
            raise bad(str(e), "checkpoint")
        except ReloadSuperseded as e:
            raise WebError(409, f"{req.checkpoint} was not loaded: {e}", param="checkpoint", type_="conflict_error")
        except EngineFailed as e:
            raise server_error(f"{req.checkpoint} was not loaded: {e}", "checkpoint")
        except EngineGone:
            raise engine_gone()
        return {"status": "ok", **info}


def usage(choices: list[Choice], prompt_tokens: int) -> dict:
    completion = sum(len(c.tokens) for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def sse(obj) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


def encode_with_special(tok, text: str) -> list[int]:
    """Like the tokenizer's encode, but the reserved tokens' strings become their ids (what vLLM's /tokenize does;
    a prompt sent as text to /v1 stays text)."""
    ids: list[int] = []
    for part in re.split("(" + "|".join(map(re.escape, SPECIAL_TOKENS)) + ")", text):
        ids += [tok.special[part]] if part in tok.special else (tok.encode(part) if part else [])
    return ids


async def _first(gen):
    """The generator's first item (or None when it ends at once), so errors raised before streaming starts surface
    as a normal HTTP error."""
    try:
        return await gen.__anext__()
    except StopAsyncIteration:
        return None


async def _chain(first, gen):
    if first is not None:
        yield first
    async for x in gen:
        yield x
