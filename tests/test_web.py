"""The HTTP layer both web apps stand on (nextbit/web/): the bounded JSON reader, the error handlers, the bearer check
and the key-file reader on a small app of their own; then the same mistakes sent to `nextbit serve` and to
`nextbit label serve`, which must answer each with the same status and error shape; then the one client
(web/client.py) against a live server: its one-line errors for a refused connection, a timeout, a refused or
missing key and an OpenAI-shaped error body."""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Optional

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("sqlalchemy")
httpx = pytest.importorskip("httpx")

from fastapi import FastAPI, Request  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from pydantic import BaseModel, Field  # noqa: E402

from conftest import tiny_config  # noqa: E402
from nextbit.core.errors import NextbitError  # noqa: E402
from nextbit.web.api import WebError, check_bearer, install_handlers, read_json  # noqa: E402
from nextbit.web.client import Client, KeyRefused, ServerError, TimedOut, Unreachable  # noqa: E402
from nextbit.web.keys import read_key  # noqa: E402

KEY = "sk-web-test"
SHAPE = {"message", "type", "param", "code"}


class Body(BaseModel):
    n: int = Field(ge=0)
    name: Optional[str] = None


def small_app(max_bytes: int = 64) -> FastAPI:
    app = FastAPI()
    install_handlers(app, "nextbit test")

    @app.post("/echo")
    async def echo(request: Request):
        check_bearer(request, KEY)
        return (await read_json(request, Body, max_bytes)).model_dump()

    @app.get("/boom")
    async def boom():
        raise RuntimeError("/secret/path exploded")

    @app.get("/items/{n}")
    async def item(n: int):
        return {"n": n}

    return app


def error_of(r) -> dict:
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == SHAPE, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
    return body["error"]


# ---- the layer alone ------------------------------------------------------------------------------------------------
def test_the_reader_and_the_handlers_answer_each_mistake_in_the_error_shape(capfd):
    auth = {"Authorization": f"Bearer {KEY}"}
    with TestClient(small_app(), raise_server_exceptions=False) as c:
        assert c.post("/echo", json={"n": 3}, headers=auth).json() == {"n": 3, "name": None}
        assert c.post("/echo", content=b'{"n": 3}', headers=auth).status_code == 200  # no Content-Type: read as JSON
        assert c.post("/echo", content=b'{"n": 3}', headers={**auth, "Content-Type": "application/vnd.x+json; charset=utf-8"}).status_code == 200
        cases = [
            (dict(content=b"x" * 65), 413, "body_too_large", None),
            (dict(content=iter([b"{", b" " * 40, b" " * 40, b"}"])), 413, "body_too_large", None),  # chunked, no Content-Length
            (dict(content=b'{"n": 1}', headers={"Content-Type": "text/plain"}), 415, "bad_content_type", None),
            (dict(content=b"n=1", headers={"Content-Type": "application/x-www-form-urlencoded"}), 415, "bad_content_type", None),
            (dict(content=b"{nope"), 400, "bad_json", None),
            (dict(content=b"\xff\xfe{}"), 400, "bad_json", None),
            (dict(content=b"[1]"), 400, "bad_json", None),
            (dict(content=b""), 400, "bad_json", None),
            (dict(content=b"[" * 30 + b"]" * 30), 400, "bad_json", None),
            (dict(json={"n": -1}), 400, "bad_field", "n"),
            (dict(json={"n": "x"}), 400, "bad_field", "n"),
            (dict(json={}), 400, "bad_field", "n"),
        ]
        for kw, status, code, param in cases:
            r = c.post("/echo", headers={**auth, **kw.pop("headers", {})}, **kw)
            assert r.status_code == status, (kw, r.text)
            err = error_of(r)
            assert (err["code"], err["param"], err["type"]) == (code, param, "invalid_request_error"), (kw, err)
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}, {"Authorization": "Bearer "}):
            r = c.post("/echo", json={"n": 1}, headers=headers)
            assert r.status_code == 401 and error_of(r)["type"] == "authentication_error", (headers, r.text)
        r = c.get("/nowhere")
        assert r.status_code == 404 and error_of(r)["code"] == "no_route"
        r = c.get("/echo")
        assert r.status_code == 405 and error_of(r)["code"] == "method_not_allowed"
        r = c.get("/items/abc")  # a typed path parameter: 400 in the shape, not FastAPI's 422 {"detail"}
        assert r.status_code == 400 and error_of(r)["code"] == "bad_field"
        capfd.readouterr()
        r = c.get("/boom")
        err = error_of(r)
        assert r.status_code == 500 and err["code"] == "internal" and err["type"] == "server_error" and "secret" not in r.text
        ref = err["message"].split()[2].rstrip(";")
        log = capfd.readouterr().err
        assert f"nextbit test: internal error {ref} on GET /boom" in log and "RuntimeError: /secret/path exploded" in log


def test_a_declared_length_over_the_bound_is_refused_before_a_byte_is_read():
    async def receive():
        raise AssertionError("the body was read")

    scope = {"type": "http", "method": "POST", "path": "/", "headers": [(b"content-length", b"1000000000")], "query_string": b""}
    with pytest.raises(WebError) as e:
        asyncio.run(read_json(Request(scope, receive), Body, 1 << 16))
    assert e.value.status == 413 and e.value.body()["error"]["code"] == "body_too_large"


def test_read_key(tmp_path):
    assert read_key("k", None) == "k" and read_key(None, None) is None and read_key("", "") is None
    (tmp_path / "key").write_text("  secret\n")
    assert read_key(None, str(tmp_path / "key")) == "secret"
    (tmp_path / "empty").write_text("\n")
    (tmp_path / "accent").write_text("sécret\n")
    for args, says in [(("k", str(tmp_path / "key")), "give --api-key or --api-key-file, not both"),
                       ((None, str(tmp_path / "nope")), "--api-key-file not found"),
                       ((None, str(tmp_path / "empty")), "--api-key-file"),
                       (("k", str(tmp_path / "key"), "--serve-key"), "give --serve-key or --serve-key-file, not both"),
                       (("clé", None), "--api-key: a key must be printable ASCII without spaces"),
                       (("two words", None), "a key must be printable ASCII"),
                       ((None, str(tmp_path / "accent")), "--api-key-file .*accent: a key must be printable ASCII")]:
        with pytest.raises(NextbitError, match=says):
            read_key(*args)


# ---- the same mistake, both apps ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def apps(tokenizer, tmp_path_factory):
    """`nextbit serve` (a tiny checkpoint, its engine not started: none of these mistakes reaches it) and `nextbit
    label serve` (a new SQLite database), both with a 2 KiB body bound, both in this process."""
    from nextbit.core.checkpoint import save_checkpoint
    from nextbit.core.model import GPT
    from nextbit.label import store
    from nextbit.label.server import LabelServeConfig, build_label_app
    from nextbit.serve.server import ServeConfig, build_app

    tmp = tmp_path_factory.mktemp("web")
    save_checkpoint(tmp / "ck", GPT(tiny_config()), tokenizer)
    serve_app, _, _ = build_app(ServeConfig(checkpoint=str(tmp / "ck"), api_key=KEY, max_body_bytes=2048, engine="thread", device="cpu"))
    label_app, state = build_label_app(LabelServeConfig(db=f"sqlite:///{tmp / 'labels.db'}", create=True, max_body_bytes=2048))
    token = store.add_user(state.db, "ann")
    store.import_pairs(state.db, [{"prompt": "p", "a": "x", "b": "y"}], source="test")
    with TestClient(serve_app) as s, TestClient(label_app) as lab:
        yield {"serve": (s, "/v1/completions", {"Authorization": f"Bearer {KEY}"}, {"prompt": "x", "max_tokens": "many"}),
               "label": (lab, "/api/answer", {"Authorization": f"Bearer {token}"},
                         {"pair_id": "1", "side": "left", "idempotency_key": "abcdefgh12"})}
    state.db.close()


def answers(apps, send) -> dict:
    """{app: (status, error)} for the same mistake sent to both apps by `send(client, path, auth, bad_body)`."""
    out = {}
    for name, (c, path, auth, bad) in apps.items():
        r = send(c, path, auth, bad)
        out[name] = (r.status_code, error_of(r))
    return out


MISTAKES = {
    "body too large": (lambda c, p, a, b: c.post(p, headers=a, content=json.dumps({"x": "a" * 4096})), 413, "body_too_large"),
    "not declared JSON": (lambda c, p, a, b: c.post(p, headers={**a, "Content-Type": "text/plain"}, content=json.dumps(b)), 415,
                          "bad_content_type"),
    "not JSON": (lambda c, p, a, b: c.post(p, headers={**a, "Content-Type": "application/json"}, content=b"{nope"), 400, "bad_json"),
    "not an object": (lambda c, p, a, b: c.post(p, headers=a, json=[1, 2]), 400, "bad_json"),
    "schema failure": (lambda c, p, a, b: c.post(p, headers=a, json=b), 400, "bad_field"),
    "unknown route": (lambda c, p, a, b: c.get("/no/such/route", headers=a), 404, "no_route"),
    "wrong method": (lambda c, p, a, b: c.delete(p, headers=a), 405, "method_not_allowed"),
    "bearer missing": (lambda c, p, a, b: c.post(p, json=b), 401, None),
    "bearer wrong": (lambda c, p, a, b: c.post(p, headers={"Authorization": "Bearer not-the-key"}, json=b), 401, None),
}


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_the_same_mistake_gets_the_same_status_and_shape_from_both_apps(apps, mistake):
    send, status, code = MISTAKES[mistake]
    got = answers(apps, send)
    (s1, e1), (s2, e2) = got["serve"], got["label"]
    assert s1 == s2 == status, got
    assert e1["type"] == e2["type"], got  # authentication_error for the key, invalid_request_error for the rest
    if code is not None:  # the key's code says what each app checks: an API key, a labeler's token or session
        assert e1["code"] == e2["code"] == code, got
    if mistake == "schema failure":
        assert e1["param"] == "max_tokens" and e2["param"] == "pair_id", got


# ---- the one client ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def live_app():
    """small_app on uvicorn in a thread: the client talks HTTP to it."""
    from live import uvicorn_in_thread

    app = small_app()

    @app.get("/slow")
    async def slow():
        await asyncio.sleep(3)
        return {}

    @app.get("/plain")
    async def plain():
        from fastapi.responses import PlainTextResponse

        return PlainTextResponse("hello")

    with uvicorn_in_thread(app) as srv:
        yield srv.url


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_client_answers_json_and_says_each_failure_in_one_line(live_app):
    assert Client(live_app + "/v1/", KEY).post("/echo", {"n": 2}) == {"n": 2, "name": None}  # the API base works too
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(Unreachable, match=rf"^--serve: no server answering at {url} \(connection refused\)$"):
        Client(url, flag="--serve").get("/health")
    with pytest.raises(TimedOut, match=r"^--server: the server at .* did not answer /slow within 0.5 s$"):
        Client(live_app).get("/slow", timeout=0.5)
    with pytest.raises(KeyRefused, match=r"^--api-key: the server at .* refused the API key \(401\): invalid or missing API key") as e:
        Client(live_app, "sk-wrong").post("/echo", {"n": 1})
    assert e.value.status == 401
    with pytest.raises(KeyRefused, match=r"^--serve-key: the server at .* needs an admin key \(401\); give --serve-key or --serve-key-file$"):
        Client(live_app, key_flag="--serve-key", key_name="admin key").post("/echo", {"n": 1})
    with pytest.raises(ServerError, match=r"^--server: the server at .* answered /echo with HTTP 400: n: Input should be") as e:
        Client(live_app, KEY).post("/echo", {"n": -1})
    assert (e.value.status, e.value.path) == (400, "/echo") and e.value.message.startswith("n: ")
    with pytest.raises(ServerError, match="answered /nowhere with HTTP 404: no route GET /nowhere"):
        Client(live_app).get("/nowhere")
    with pytest.raises(NextbitError, match="answered /plain with something that is not JSON"):
        Client(live_app).get("/plain")
    for e in (Unreachable, TimedOut, ServerError):
        assert issubclass(e, NextbitError)


def test_the_client_waits_out_a_429_as_retry_after_asks():
    from live import uvicorn_in_thread

    app, calls = FastAPI(), []
    install_handlers(app, "nextbit test")

    @app.get("/busy")
    async def busy():
        calls.append(1)
        if len(calls) < 3:
            raise WebError(429, "at capacity", headers={"Retry-After": "0"})
        return {"ok": True}

    with uvicorn_in_thread(app) as srv:
        assert Client(srv.url).get("/busy") == {"ok": True} and len(calls) == 3
        calls.clear()
        with pytest.raises(ServerError, match="stayed at capacity"):
            Client(srv.url, retries=1).get("/busy")
