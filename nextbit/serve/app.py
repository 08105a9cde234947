"""The routes of the FastAPI app: OpenAI's /v1/models, /v1/completions and /v1/chat/completions, vLLM's /tokenize,
/detokenize and /tokenizer_info, /health, /metrics, /admin/reload and the chat page at /.

A route is thin: the key (web/api.py's bearer check), the body (read_json: bounded, validated against a protocol
model), then the serving class (serve/serving.py) does the work. Every error is OpenAI's shape, {"error": {"message",
"type", "param", "code"}}, with a 4xx for anything the client sent (malformed JSON, wrong types, values out of
range, prompts past the context, unknown models, a full queue: 429 with Retry-After). With an API key, /v1 and the
tokenizer routes need `Authorization: Bearer KEY` (compared in constant time); /health and the page stay open.
Requests are counted by route and status for /metrics.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response, StreamingResponse

from nextbit.serve.metrics import Metrics
from nextbit.serve.protocol import ChatRequest, CompletionRequest, DetokenizeRequest, ReloadRequest, TokenizeRequest
from nextbit.serve.serving import Answer, ServerState, Serving
from nextbit.web.api import WebError, check_bearer, install_handlers, read_json

PAGE = Path(__file__).with_name("chat.html")
ROUTES = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize", "/detokenize", "/tokenizer_info",
          "/health", "/metrics", "/admin/reload", "/"}  # counted by name in /metrics; any other path is "other"


def counted(app_, metrics: Metrics):
    """Requests by route and status, counted when the response starts. A plain ASGI wrapper: Starlette's
    BaseHTTPMiddleware would hide a client's disconnect from request.is_disconnected()."""

    async def count(scope, receive, send):
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

    return count


def answer(out: Answer):
    """A serving method's answer as a response: JSON, or server-sent events."""
    return out if isinstance(out, dict) else StreamingResponse(out, media_type="text/event-stream")


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="nextbit", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = Metrics()
    state.runner.on_step = metrics.load
    serving = Serving(state, metrics)
    app.state.nextbit = state
    install_handlers(app, "nextbit serve")
    app.add_middleware(counted, metrics=metrics)

    async def body(request: Request, model, key: Optional[str]):
        """The key checked, then the body read and validated."""
        check_bearer(request, key)
        return await read_json(request, model, state.max_body)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await body(request, CompletionRequest, state.api_key)
        return answer(await serving.completions(req, request.is_disconnected, time.perf_counter()))

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = await body(request, ChatRequest, state.api_key)
        return answer(await serving.chat(req, request.is_disconnected, time.perf_counter()))

    @app.get("/v1/models")
    async def models(request: Request):
        check_bearer(request, state.api_key)
        return serving.models()

    @app.get("/v1/models/{name:path}")
    async def one_model(request: Request, name: str):
        check_bearer(request, state.api_key)
        return serving.one_model(name)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        return serving.tokenize(await body(request, TokenizeRequest, state.api_key))

    @app.post("/detokenize")
    async def detokenize(request: Request):
        return serving.detokenize(await body(request, DetokenizeRequest, state.api_key))

    @app.get("/tokenizer_info")
    async def tokenizer_info(request: Request):
        check_bearer(request, state.api_key)
        return serving.tokenizer_info()

    @app.get("/health")
    async def health():
        if not state.runner.alive:  # so that a load balancer stops sending requests that would never be answered
            return WebError(503, "the engine loop is not running", type_="server_error").response()
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics_route():
        metrics.load(*state.runner.load)
        return Response(metrics.text(), media_type="text/plain; version=0.0.4")

    @app.post("/admin/reload")
    async def reload(request: Request):
        return await serving.reload(await body(request, ReloadRequest, state.admin_key))

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    return app
