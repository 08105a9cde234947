"""The FastAPI app: OpenAI's /v1/models, /v1/completions and /v1/chat/completions, vLLM's /tokenize, /detokenize and
/tokenizer_info, /health, /metrics, /admin/reload and the chat page at /.

Every error is OpenAI's shape, {"error": {"message", "type", "param", "code"}}, with a 4xx for anything the client
sent (malformed JSON, wrong types, values out of range, prompts past the context, unknown models, a full queue:
429 with Retry-After). Request bodies are bounded. With an API key, /v1 and the tokenizer routes need
`Authorization: Bearer KEY` (compared in constant time); /health and the page stay open.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import random
import re
import sys
import time
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Callable, Optional, Union

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from nextbit.core.chat import render_messages
from nextbit.core.errors import NextbitError
from nextbit.core.tokenizer import SPECIAL_TOKENS
from nextbit.infer.sampling import SamplingParams, row_seed
from nextbit.serve.choices import Choice, legacy_logprobs
from nextbit.serve.metrics import Metrics
from nextbit.serve.protocol import (ChatRequest, CompletionRequest, DetokenizeRequest, ReloadRequest, TokenizeRequest,
                                    error_body)
from nextbit.serve.engine_process import ServeCheck, Submission
from nextbit.serve.runner import EngineFailed, EngineGone, EngineRunner, QueueFull, ReloadSuperseded, Sink

PAGE = Path(__file__).with_name("chat.html")
DISCONNECT_CHECK = 0.25  # seconds between checks that the client is still there


def engine_gone() -> "APIError":
    """The answer to work for an engine loop that has stopped (or whose process died): it would never be answered."""
    return APIError(503, "the engine loop is not running", type_="server_error")


class APIError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, type_: str = "invalid_request_error",
                 headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.headers = status, message, param, type_, headers


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


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="nextbit", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = Metrics()
    state.runner.on_step = metrics.load
    tok = state.tokenizer
    app.state.nextbit = state

    # ---- plumbing -------------------------------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return JSONResponse(error_body(e.message, e.type, e.param, e.status), status_code=e.status, headers=e.headers)

    @app.exception_handler(404)
    async def _not_found(request: Request, e):
        return JSONResponse(error_body(f"no route {request.method} {request.url.path}", "invalid_request_error", None, 404), 404)

    @app.exception_handler(405)
    async def _not_allowed(request: Request, e):
        return JSONResponse(error_body(f"{request.method} is not allowed on {request.url.path}", "invalid_request_error", None, 405), 405)

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        # a bug's details (paths, request contents) go to the server's log, with an id the client can quote
        ref = uuid.uuid4().hex[:12]
        print(f"nextbit serve: internal error {ref} on {request.method} {request.url.path}:", file=sys.stderr)
        traceback.print_exception(e, file=sys.stderr)
        return JSONResponse(error_body(f"internal error {ref}; the server's log has the details", "server_error", None, 500), 500)

    def count(app_):
        """Requests by route and status, counted when the response starts. A plain ASGI wrapper: Starlette's
        BaseHTTPMiddleware would hide a client's disconnect from request.is_disconnected()."""

        async def counted(scope, receive, send):
            if scope["type"] != "http":
                return await app_(scope, receive, send)
            route = scope["path"] if scope["path"] in ROUTES else "other"

            started = False

            async def send_(message):
                nonlocal started
                if message["type"] == "http.response.start":
                    started = True
                    metrics.requests.labels(route, str(message["status"])).inc()
                await send(message)

            try:
                await app_(scope, receive, send_)
            except Exception:
                if not started:  # the outermost handler answers 500
                    metrics.requests.labels(route, "500").inc()
                raise

        return counted

    app.add_middleware(count)

    def check_key(request: Request, key: Optional[str]) -> None:
        if key is None:
            return
        got = request.headers.get("authorization", "")
        scheme, _, token = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise APIError(401, "invalid or missing API key (send Authorization: Bearer KEY)", type_="authentication_error")

    async def body(request: Request, model: type[BaseModel]):
        """The request's JSON body, bounded in size and validated against `model`."""
        size = 0
        chunks = []
        async for chunk in request.stream():
            size += len(chunk)
            if size > state.max_body:
                raise APIError(413, f"request body over {state.max_body} bytes")
            chunks.append(chunk)
        try:
            data = json.loads(b"".join(chunks) or b"null")
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer past Python's 4300 digits
            raise APIError(400, f"the body is not valid JSON: {e}")
        except RecursionError:
            raise APIError(400, "the body is not valid JSON: nested too deeply")
        if not isinstance(data, dict):
            raise APIError(400, "the body must be a JSON object")
        try:
            return model.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(x) for x in err["loc"])
            raise APIError(400, f"{where}: {err['msg']}", param=where)

    def need_engine() -> None:
        """Work for the engine loop is refused when the loop has stopped: it would never be answered."""
        if not state.runner.alive:
            raise engine_gone()

    def check_model(name: Optional[str]) -> None:
        if name is not None and name != state.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {state.model_name!r}", "model",
                           type_="NotFoundError")

    # ---- generation -----------------------------------------------------------------------------------------------
    def encode_prompt(p: Union[str, list[int]]) -> list[int]:
        if isinstance(p, str):
            return [tok.eot_id] + tok.encode(p)  # documents start after <|endoftext|>, as in training and `nextbit sample`
        if any(t < 0 or t >= tok.vocab_size for t in p):
            raise APIError(400, f"prompt token ids must be in [0, {tok.vocab_size})", "prompt")
        if not p:
            raise APIError(400, "a prompt needs at least one token", "prompt")
        return list(p)

    def prompt_text(raw: Union[str, list[int]], ids: list[int]) -> str:
        """What echo returns for a prompt: the text as sent (its implicit <|endoftext|> shows as ""), or the ids decoded."""
        return raw if isinstance(raw, str) else tok.decode(ids)

    def room(ids: list[int], max_tokens: Optional[int], field: str) -> int:
        n = len(ids)
        if n >= state.max_len:
            raise APIError(400, f"this model's maximum context length is {state.max_len} tokens; the prompt has {n}", "prompt")
        if max_tokens is None:
            return state.max_len - n
        if n + max_tokens > state.max_len:
            raise APIError(400, f"this model's maximum context length is {state.max_len} tokens; you requested {n + max_tokens} "
                                f"({n} in the prompt, {max_tokens} in {field})", field)
        return max_tokens

    def check_n(req, n_prompts: int) -> None:
        if req.n > state.max_n:
            raise APIError(400, f"n must be at most {state.max_n}", "n")
        if getattr(req, "best_of", None) not in (None, req.n):
            raise APIError(400, f"best_of must equal n ({req.n}): this server returns every sample it draws", "best_of")
        room_ = state.runner.slots + state.runner.max_waiting
        if n_prompts * req.n > room_:  # it could never be admitted: not a 429 to retry forever
            raise APIError(400, f"{n_prompts} prompt(s) x n={req.n} choices is more than this server holds at once "
                                f"({room_})", "n")

    def choices_for(prompts: list[list[int]], req, max_new: list[int], logprobs: int, stop_ids=None) -> list[Choice]:
        check_n(req, len(prompts))
        base = req.seed if req.seed is not None else random.getrandbits(62)
        top_k = req.top_k if 0 < req.top_k < tok.vocab_size else 0  # -1, 0 or past the vocabulary: every candidate
        bias = req.token_bias()
        if bias and max(bias) >= tok.vocab_size:
            raise APIError(400, f"logit_bias token ids must be in [0, {tok.vocab_size})", "logit_bias")
        out = []
        for i, (ids, m) in enumerate(zip(prompts, max_new)):
            for j in range(req.n):
                params = SamplingParams(max_new_tokens=max(1, m), temperature=req.temperature, top_k=top_k,
                                        top_p=req.top_p, stop=req.stops(), stop_token_ids=stop_ids,
                                        frequency_penalty=req.frequency_penalty, presence_penalty=req.presence_penalty,
                                        logit_bias=bias)
                out.append(Choice(len(out), Submission(ids, params, row_seed(base + i if req.seed is None else base, j),
                                                       logprobs=logprobs), tok, req.stops()))
        return out

    async def run(choices: list[Choice], request: Request, t0: float) -> AsyncIterator[Choice]:
        """Submit the choices, then yield a choice each time it has new tokens or finished, until all are done.
        A client that goes away cancels whatever is still running."""
        sink = Sink(asyncio.get_running_loop())
        by_id = {id(c): c for c in choices}
        last: dict[int, float] = {}
        emit = state.runner.emitter(sink)
        need_engine()
        try:
            state.runner.submit_many([c.req for c in choices], [lambda event, rid=id(c): emit((rid, *event)) for c in choices])
        except QueueFull:
            raise APIError(429, "the server is at capacity; retry shortly", type_="rate_limit_error", headers={"Retry-After": "1"})
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
                    if await request.is_disconnected():
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
                    state.runner.cancel(c.req)

    def usage(choices: list[Choice], prompt_tokens: int) -> dict:
        completion = sum(len(c.tokens) for c in choices)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}

    def fail_if_errored(choices: list[Choice]) -> None:
        bad = [c for c in choices if c.finish == "error"]
        if bad:
            raise APIError(500, bad[0].error or "the engine failed", type_="server_error")

    def sse(obj) -> bytes:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()

    async def complete(choices: list[Choice], request: Request, t0: float) -> None:
        """Run the choices to the end (a whole, non-streamed response)."""
        async for _ in run(choices, request, t0):
            pass
        fail_if_errored(choices)

    async def event_stream(choices: list[Choice], request: Request, t0: float, head: list[dict],
                           piece: Callable[[Choice], Optional[dict]], tail: Callable[[], Optional[dict]]) -> StreamingResponse:
        """Server-sent events: `head` chunks, then `piece(choice)` each time a choice moves on (None: nothing to
        send yet), then `tail()` (the usage chunk, if asked) and [DONE]. Errors raised before the first event (a full
        queue) are still a proper HTTP error."""
        gen = run(choices, request, t0)
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

        return StreamingResponse(events(), media_type="text/event-stream")

    async def accept(request: Request, model: type[BaseModel]):
        """A generation request's preamble: the key, the validated body, the model name, the arrival time."""
        check_key(request, state.api_key)
        req = await body(request, model)
        check_model(req.model)
        return req, time.perf_counter()

    @app.post("/v1/completions")
    async def completions(request: Request):
        req, t0 = await accept(request, CompletionRequest)
        raw = req.prompts()
        prompts = [encode_prompt(p) for p in raw]
        if req.max_tokens == 0 and not req.echo:
            raise APIError(400, "max_tokens must be >= 1 (0 only with echo)", "max_tokens")
        max_new = [room(ids, req.max_tokens, "max_tokens") for ids in prompts]
        check_n(req, len(prompts))  # before any work (echo with max_tokens 0 generates nothing, but answers n times)
        logprobs = -1 if req.logprobs is None else req.logprobs
        scored: list = [None] * len(prompts)
        if req.echo and req.logprobs is not None:
            need_engine()
            try:
                scored = [await state.runner.score(ids, logprobs) for ids in prompts]
            except EngineGone:
                raise engine_gone()
            except EngineFailed as e:
                raise APIError(500, f"the engine failed scoring the prompt: {e}", type_="server_error")
        n_prompt = sum(len(p) for p in prompts)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if req.max_tokens == 0:  # echo only: score the prompt, generate nothing
            choices = [{"index": i * req.n + j, "text": prompt_text(raw[i], ids), "finish_reason": "length",
                        "logprobs": legacy_logprobs(tok, list(zip(ids, scored[i])), isinstance(raw[i], str))
                        if req.logprobs is not None else None}
                       for i, ids in enumerate(prompts) for j in range(req.n)]
            return {"id": rid, "object": "text_completion", "created": created, "model": state.model_name, "choices": choices,
                    "usage": {"prompt_tokens": n_prompt, "completion_tokens": 0, "total_tokens": n_prompt}}
        choices = choices_for(prompts, req, max_new, logprobs)
        echo_text = {c.index: prompt_text(raw[c.index // req.n], prompts[c.index // req.n]) if req.echo else "" for c in choices}

        def logprobs_of(c: Choice):
            if req.logprobs is None:
                return None
            i = c.index // req.n
            return c.completion_logprobs(prompts[i] if req.echo else None, scored[i] if req.echo else None, isinstance(raw[i], str))

        def chunk(c: Choice, text: str, finish, lp=None) -> dict:
            return {"id": rid, "object": "text_completion", "created": created, "model": state.model_name,
                    "choices": [{"index": c.index, "text": text, "logprobs": lp, "finish_reason": finish}]}

        if not req.stream:
            await complete(choices, request, t0)
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

        return await event_stream(choices, request, t0, head, piece, tail)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req, t0 = await accept(request, ChatRequest)
        ids = render_messages(tok, [m.model_dump() for m in req.messages], add_generation_prompt=True)[0]
        field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        max_new = room(ids, req.max_completion_tokens or req.max_tokens, field)
        top = req.top_logprobs if req.top_logprobs is not None else 0
        if top > 5:
            raise APIError(400, "top_logprobs must be at most 5", "top_logprobs")
        choices = choices_for([ids], req, [max_new], top if req.logprobs else -1)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(c: Choice, delta: dict, finish, lp=None) -> dict:
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": state.model_name,
                    "choices": [{"index": c.index, "delta": delta, "logprobs": lp, "finish_reason": finish}]}

        if not req.stream:
            await complete(choices, request, t0)
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
        return await event_stream(choices, request, t0, head, piece, tail)

    # ---- models, tokenizer, health, metrics, admin, page ---------------------------------------------------------
    def model_card() -> dict:
        return {"id": state.model_name, "object": "model", "created": int(time.time()), "owned_by": "nextbit",
                "root": state.runner.checkpoint, "max_model_len": state.max_len}

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request, state.api_key)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def one_model(request: Request, name: str):
        check_key(request, state.api_key)
        check_model(name)
        return model_card()

    @app.post("/tokenize")
    async def tokenize(request: Request):
        check_key(request, state.api_key)
        req = await body(request, TokenizeRequest)
        check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give either prompt or messages", "prompt")
        if req.messages is not None:
            ids = render_messages(tok, [m.model_dump() for m in req.messages], add_generation_prompt=req.add_generation_prompt)[0]
        else:
            ids = ([tok.eot_id] if req.add_special_tokens else []) + encode_with_special(tok, req.prompt)
        return {"tokens": ids, "count": len(ids), "max_model_len": state.max_len}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        check_key(request, state.api_key)
        req = await body(request, DetokenizeRequest)
        check_model(req.model)
        if any(t < 0 or t >= tok.vocab_size for t in req.tokens):
            raise APIError(400, f"token ids must be in [0, {tok.vocab_size})", "tokens")
        return {"prompt": tok.decode(req.tokens)}

    @app.get("/tokenizer_info")
    async def tokenizer_info(request: Request):
        check_key(request, state.api_key)
        return {"tokenizer_class": "nextbit-bpe", "vocab_size": tok.vocab_size, "model_max_length": state.max_len,
                "eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "pad_token": "<|pad|>",
                "chat_template": CHAT_TEMPLATE}

    @app.get("/health")
    async def health():
        if not state.runner.alive:  # so that a load balancer stops sending requests that would never be answered
            return JSONResponse(error_body("the engine loop is not running", "server_error", None, 503), 503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics_route():
        metrics.load(*state.runner.load)
        return Response(metrics.text(), media_type="text/plain; version=0.0.4")

    @app.post("/admin/reload")
    async def reload(request: Request):
        check_key(request, state.admin_key)
        req = await body(request, ReloadRequest)
        if not req.checkpoint.strip():
            raise APIError(400, "checkpoint must be a checkpoint folder's path", "checkpoint")
        need_engine()
        try:  # the engine core loads and checks it (in a short-lived thread), then swaps it in between steps
            info = await state.runner.reload(req.checkpoint, ServeCheck(tok.hash, state.max_len))
        except NextbitError as e:
            raise APIError(400, str(e), "checkpoint")
        except ReloadSuperseded as e:
            raise APIError(409, f"{req.checkpoint} was not loaded: {e}", "checkpoint", type_="conflict_error")
        except EngineFailed as e:
            raise APIError(500, f"{req.checkpoint} was not loaded: {e}", "checkpoint", type_="server_error")
        except EngineGone:
            raise engine_gone()
        return {"status": "ok", **info}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    ROUTES = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize", "/detokenize", "/tokenizer_info",
              "/health", "/metrics", "/admin/reload", "/"}
    return app


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


# A Jinja rendering of core/chat.py's template, for clients that format chats themselves (lm-eval's remote tokenizer).
CHAT_TEMPLATE = ("<|endoftext|>{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
