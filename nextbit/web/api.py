"""The HTTP plumbing of both web apps (`nextbit serve`, `nextbit label serve`), written once, so that the same mistake
gets the same answer from both.

Every error is OpenAI's shape, {"error": {"message", "type", "param", "code"}}: `code` is a short string naming the
mistake, or, where an app gives none, the HTTP status (vLLM's convention). Raise `WebError` anywhere in a route.

`read_json(request, model, max_bytes)` reads a request's JSON body, bounded, and validates it:

    a declared Content-Type that is not JSON (application/json, application/*+json)   415 bad_content_type
    a declared Content-Length over the bound; or more bytes than that arrive           413 body_too_large
    not JSON, not UTF-8, nested too deeply, not a JSON object                          400 bad_json
    the model refuses it (a missing field, a wrong type, a value out of range)         400 bad_field, param: the field

(400 for a schema failure, as OpenAI and vLLM answer; no Content-Type at all is read as JSON, as FastAPI does.)
`install_handlers(app, name)` answers in that shape: an unknown route 404 no_route, a wrong method 405
method_not_allowed, a path or query parameter FastAPI refuses 400 bad_field (its own default is a 422 in another
shape), and any other exception 500 internal, whose message is only an id: the traceback goes to the server's log
beside that id (a bug's details, a database error's SQL, never reach the client).
`bearer(request)` is the token of `Authorization: Bearer TOKEN`; `check_bearer(request, key)` answers 401
invalid_api_key unless it is `key` (compared in constant time; no key: open).
"""

from __future__ import annotations

import hmac
import json
import sys
import traceback
import uuid
from typing import Optional, TypeVar, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


class WebError(Exception):
    """An answer in the error shape: `status`, the message, `code` (None: the status), the field it is about."""

    def __init__(self, status: int, message: str, code: Optional[Union[str, int]] = None, *, param: Optional[str] = None,
                 type_: str = "invalid_request_error", headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.type, self.headers = status, message, code, param, type_, headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.status if self.code is None else self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(message: str, type_: str = "invalid_request_error", param: Optional[str] = None,
               code: Optional[Union[str, int]] = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def is_json(content_type: str) -> bool:
    media = content_type.split(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


async def read_json(request: Request, model: type[M], max_bytes: int) -> M:
    """The request's JSON body, bounded to `max_bytes` and validated against `model` (the table above)."""
    ctype = request.headers.get("content-type")
    if ctype is not None and not is_json(ctype):
        raise WebError(415, f"the body must be JSON (Content-Type: application/json), not {ctype.split(';')[0].strip()!r}",
                       "bad_content_type")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise WebError(413, f"request body over {max_bytes} bytes", "body_too_large")
    size, chunks = 0, []
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise WebError(413, f"request body over {max_bytes} bytes", "body_too_large")
        chunks.append(chunk)
    try:
        data = json.loads(b"".join(chunks) or b"null")
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer past Python's 4300 digits
        raise WebError(400, f"the body is not valid JSON: {e}", "bad_json")
    except RecursionError:
        raise WebError(400, "the body is not valid JSON: nested too deeply", "bad_json")
    if not isinstance(data, dict):
        raise WebError(400, "the body must be a JSON object", "bad_json")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        raise WebError(400, f"{where or 'body'}: {err['msg']}", "bad_field", param=where or None)


def install_handlers(app: FastAPI, name: str) -> None:
    """WebError, 404, 405 and 500 in the error shape; `name` ("nextbit serve") starts the log line of a 500."""

    @app.exception_handler(WebError)
    async def _web_error(request: Request, e: WebError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):  # a typed path or query parameter: as read_json
        err = (e.errors() or [{}])[0]
        where = ".".join(str(x) for x in err.get("loc", ()))
        return WebError(400, f"{where or 'request'}: {err.get('msg', 'invalid')}", "bad_field", param=where or None).response()

    @app.exception_handler(404)
    async def _not_found(request: Request, e):
        return WebError(404, f"no route {request.method} {request.url.path}", "no_route").response()

    @app.exception_handler(405)
    async def _not_allowed(request: Request, e):
        return WebError(405, f"{request.method} is not allowed on {request.url.path}", "method_not_allowed").response()

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        ref = uuid.uuid4().hex[:12]
        print(f"{name}: internal error {ref} on {request.method} {request.url.path}:", file=sys.stderr)
        traceback.print_exception(e, file=sys.stderr)
        return WebError(500, f"internal error {ref}; the server's log has the details", "internal",
                        type_="server_error").response()


def bearer(request: Request) -> Optional[str]:
    """The token of `Authorization: Bearer TOKEN`, or None."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return (token.strip() or None) if scheme.lower() == "bearer" else None


def check_bearer(request: Request, key: Optional[str]) -> None:
    """401 unless the request carries `Authorization: Bearer KEY` (compared in constant time); no key: open."""
    if key is None:
        return
    token = bearer(request)
    if token is None or not hmac.compare_digest(token.encode(), key.encode()):
        raise WebError(401, "invalid or missing API key (send Authorization: Bearer KEY)", "invalid_api_key",
                       type_="authentication_error")
