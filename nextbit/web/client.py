"""The one HTTP client that calls a nextbit server (or any OpenAI-compatible one): `eval humaneval --server`,
`eval lm --server` (its up-front key check) and `loop --serve` use it.

    c = Client("http://127.0.0.1:8000/v1", key, flag="--server")     # the API base (…/v1) works too
    c.get("/v1/models")                                               # the JSON answer, or one NextbitError
    c.post("/v1/completions", {"prompt": "x", "max_tokens": 4})

Every failure is one line that starts with the user's flag (`flag`, or `key_flag` for the key), never a traceback:

    nothing listens, the host is unknown              Unreachable   "--server: no server answering at URL (connection refused)"
    no answer within `timeout`                        TimedOut      "--server: the server at URL did not answer /v1/models within 5 s"
    401 / 403 when a key was sent                     KeyRefused    "--api-key: the server at URL refused the API key (401): ..."
    401 / 403 with no key                             KeyRefused    "--api-key: the server at URL needs an API key (401); give ..."
    any other 4xx / 5xx (OpenAI's error shape read)   ServerError   "--server: the server at URL answered PATH with HTTP 400: MESSAGE"
    an answer that is not JSON                        NextbitError

429 (the server is at capacity) is retried up to `retries` times, waiting as its Retry-After asks (10 s at most).
"""

from __future__ import annotations

import json
import time
from typing import Any, Optional

from nextbit.core.errors import NextbitError


class ServerError(NextbitError):
    """The server answered `path` with an error `status`; `message` is its error body's message."""

    def __init__(self, text: str, status: int, message: str, path: str):
        super().__init__(text)
        self.status, self.message, self.path = status, message, path


class KeyRefused(ServerError):
    """401 or 403: the key was refused, or one is needed."""


class Unreachable(NextbitError):
    """Nothing answers at the URL."""


class TimedOut(NextbitError):
    """The server took the connection but did not answer in time."""


def root_of(url: str) -> str:
    """The server's base URL: without a trailing / and without the API base's /v1."""
    url = url.strip().rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def error_message(body: Any, fallback: str) -> str:
    """The message of OpenAI's error shape ({"error": {"message": ...}}, or {"error": "..."}), else `fallback`."""
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str) and err:
            return err
    return fallback


class Client:
    """Calls to the server at `url`, with `Authorization: Bearer KEY` when a key is given. `flag` names the option
    that gave the URL and `key_flag` the one that gave the key (both start the errors); `key_name` is what the key
    is to the server ("API key", "admin key")."""

    def __init__(self, url: str, key: Optional[str] = None, *, flag: str = "--server", key_flag: str = "--api-key",
                 key_name: str = "API key", timeout: float = 60.0, retries: int = 5):
        self.url, self.key, self.flag, self.key_flag, self.key_name = root_of(url), key or None, flag, key_flag, key_name
        self.timeout, self.retries = timeout, retries
        self.headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.key:
            self.headers["Authorization"] = f"Bearer {self.key}"

    def get(self, path: str, timeout: Optional[float] = None) -> Any:
        return self.call("GET", path, None, timeout)

    def post(self, path: str, body: dict, timeout: Optional[float] = None) -> Any:
        return self.call("POST", path, body, timeout)

    def call(self, method: str, path: str, body: Optional[dict] = None, timeout: Optional[float] = None) -> Any:
        """The JSON answer of one request; any failure is one of the errors above."""
        try:
            import httpx
        except ImportError:
            raise NextbitError('calling a server needs httpx: pip install httpx (the [eval] and [label] extras have it)')
        timeout = self.timeout if timeout is None else timeout
        content = None if body is None else json.dumps(body).encode()
        for attempt in range(self.retries + 1):
            try:
                r = httpx.request(method, self.url + path, content=content, headers=self.headers, timeout=timeout)
            except httpx.TimeoutException:
                raise TimedOut(f"{self.flag}: the server at {self.url} did not answer {path} within {timeout:g} s")
            except (httpx.UnsupportedProtocol, httpx.InvalidURL) as e:
                raise NextbitError(f"{self.flag}: {self.url} is not a URL to call ({e})")
            except httpx.TransportError as e:  # refused, unknown host, the connection dropped
                raise Unreachable(f"{self.flag}: no server answering at {self.url} ({_why(e)})")
            if r.status_code == 429 and attempt < self.retries:
                time.sleep(min(_seconds(r.headers.get("retry-after")), 10.0))
                continue
            break
        try:
            data = r.json() if r.content else None
        except ValueError:
            data = None
            if r.status_code < 400:
                raise NextbitError(f"{self.flag}: the server at {self.url} answered {path} with something that is not JSON")
        if r.status_code < 400:
            return data
        message = error_message(data, r.text[:200].strip() or r.reason_phrase)
        if r.status_code in (401, 403):
            if self.key:
                text = f"{self.key_flag}: the server at {self.url} refused the {self.key_name} ({r.status_code}): {message}"
            else:
                text = (f"{self.key_flag}: the server at {self.url} needs an {self.key_name} ({r.status_code}); "
                        f"give {self.key_flag} or {self.key_flag}-file")
            raise KeyRefused(text, r.status_code, message, path)
        if r.status_code == 429:
            raise ServerError(f"{self.flag}: the server at {self.url} stayed at capacity (HTTP 429) for {path}", 429, message, path)
        raise ServerError(f"{self.flag}: the server at {self.url} answered {path} with HTTP {r.status_code}: {message}",
                          r.status_code, message, path)

    def models(self, timeout: Optional[float] = None) -> list[dict]:
        """/v1/models' list ({"id", "root", "max_model_len"?} each); one line when it lists none."""
        got = self.get("/v1/models", timeout)
        data = got.get("data") if isinstance(got, dict) else None
        if not data or not isinstance(data, list):
            raise NextbitError(f"{self.flag}: the server at {self.url} lists no model at /v1/models")
        return data


def _why(e: Exception) -> str:
    text = str(e) or type(e).__name__
    if "refused" in text.lower():
        return "connection refused"
    return text


def _seconds(value: Optional[str]) -> float:
    try:
        return max(0.0, float(value or 1))
    except ValueError:
        return 1.0
