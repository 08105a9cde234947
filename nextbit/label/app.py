"""The labeling app: a JSON API under /api, the labeling page at / and the admin page at /admin.

Auth. POST /api/login with a token from `nextbit label add-user` sets the session cookie (HttpOnly, SameSite=Strict);
a script can instead send `Authorization: Bearer TOKEN` on every request. A labeler sees only their own labels;
/admin and /api/admin/* need an admin (403 for anyone else, 401 when logged out). A browser (Accept: text/html) that
opens /admin logged out is sent to the login page; logged in as a labeler it gets a 403 page saying who they are
signed in as and that this user is not an admin; any other client gets the JSON error.

Cross-site requests. Every state-changing request (POST) made with the session cookie must carry the session's CSRF
token in X-CSRF-Token (GET /api/me and the login answer hand it to the page) and, when the browser sends an Origin
or Referer, come from this origin; otherwise 403 and nothing is stored. A bearer token needs no CSRF token (a browser
never attaches it by itself). GET /api/next hands out an assignment but no label; SameSite=Strict keeps it from
other sites.

Errors are JSON in OpenAI's shape, {"error": {"message", "type", "param", "code"}} (web/api.py, the same plumbing
as `nextbit serve`: the same mistake gets the same status from both apps), with a 4xx for anything the client sent:
a body that is not JSON (400), not declared as JSON (415) or over the size bound (413), a field of the wrong type
or out of range (400, code bad_field), an unknown pair (404), a pair not assigned or already answered (409). Store
calls run in the threadpool, so a slow database write never holds up the event loop.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import re
import threading
import time
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Optional
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.concurrency import run_in_threadpool

from nextbit.label import store
from nextbit.label.agreement import labeler_stats
from nextbit.label.db import Database
from nextbit.web.api import WebError, bearer, install_handlers, read_json

COOKIE = "nextbit_label_session"
CSRF_HEADER = "x-csrf-token"
PAGE = Path(__file__).with_name("page.html")
ADMIN_PAGE = Path(__file__).with_name("admin.html")
NOT_ADMIN_PAGE = Path(__file__).with_name("not_admin.html")  # {{name}}: the signed-in user, HTML-escaped
SIDES = ("left", "right", "tie", "cant_tell")
# the status of each store.LabelError code; anything else the store refuses is a 400
LABEL_ERRORS = {"bad_side": 400, "bad_key": 400, "bad_comment": 400, "unknown_user": 404, "unknown_pair": 404,
                "not_assigned": 409, "already_answered": 409, "key_reused": 409, "expired": 409}


# ---- request bodies ---------------------------------------------------------------------------------------------
def _clean(v: str) -> str:
    """Text the database can hold: no NUL (PostgreSQL refuses it) and no lone surrogate (not UTF-8)."""
    if "\x00" in v:
        raise ValueError("must not contain NUL characters")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid UTF-8 text (a lone surrogate is not)")
    return v


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)  # strict: "5" is not a pair id, true is not a number


class LoginBody(_Body):
    token: str = Field(min_length=1, max_length=256)

    @field_validator("token")
    @classmethod
    def _text(cls, v: str) -> str:
        return _clean(v)


class AnswerBody(_Body):
    pair_id: int = Field(ge=-(2**62), le=2**62)  # an int64 either way: an unknown id is the store's 404
    side: Literal["left", "right", "tie", "cant_tell"]
    idempotency_key: str = Field(min_length=8, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")
    comment: str = Field("", max_length=store.MAX_COMMENT)

    @field_validator("comment")
    @classmethod
    def _text(cls, v: str) -> str:
        return _clean(v)


# ---- the app's state ------------------------------------------------------------------------------------------
@dataclass
class Who:
    user: Any  # store.User: id, name, is_admin
    csrf: Optional[str]  # None when authenticated by a bearer token
    session_id: Optional[str]


class Refresher:
    """Calls `fn()` in a background thread once `every` new labels have come in since the last call began; one call
    at a time (labels arriving meanwhile count toward the next). Errors are kept in `.last_error`, never raised into
    a request."""

    def __init__(self, fn: Callable[[], Any], every: int):
        self.fn, self.every = fn, max(1, every)
        self.lock = threading.Lock()
        self.pending, self.runs, self.running = 0, 0, False
        self.last_error: Optional[str] = None
        self.thread: Optional[threading.Thread] = None

    def labelled(self, n: int = 1) -> None:
        with self.lock:
            self.pending += n
            if self.running or self.pending < self.every:
                return
            self.pending, self.running = 0, True
        self._start()

    def kick(self) -> None:
        """Run now (unless a run is under way): at start-up, from the labels already stored."""
        with self.lock:
            if self.running:
                return
            self.pending, self.running = 0, True
        self._start()

    def _start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="nextbit-label-refresh", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.fn()
            self.last_error = None
        except Exception as e:  # noqa: BLE001 - reported on the admin page, the server keeps going
            self.last_error = f"{type(e).__name__}: {e}"
        finally:
            with self.lock:
                self.running = False
                self.runs += 1

    def join(self, timeout: Optional[float] = None) -> None:
        t = self.thread
        if t is not None:
            t.join(timeout)


@dataclass
class LabelState:
    db: Database
    overlap: int = 1
    timeout_s: float = 600.0
    select: str = "random"
    seed: int = 0
    session_ttl_s: float = 7 * 24 * 3600
    secure_cookie: bool = False
    max_body: int = 1 << 16
    reward: Optional[Any] = None  # reward_probs.RewardProbs, or None
    refresher: Optional[Refresher] = None  # re-ranks the queue every N new labels (--select disagreement)


def plain(x: Any) -> Any:
    """A store record (dataclass) as JSON-ready data."""
    if is_dataclass(x):
        return {k: plain(v) for k, v in asdict(x).items()}
    if isinstance(x, dict):
        return {str(k): plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    return x


def page_headers(page: str) -> dict:
    """A Content-Security-Policy that lets only the page's own inline scripts run (by hash; none if it has none) and
    reach nothing but this origin: markup that got into the page by mistake still could not run or load anything."""
    scripts = re.findall(r"<script>(.*?)</script>", page, re.S)
    hashes = " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'" for s in scripts)
    hashes = hashes or "'none'"
    return {
        "Content-Security-Policy": f"default-src 'none'; script-src {hashes}; "
                                   "style-src 'unsafe-inline'; connect-src 'self'; img-src data:; form-action 'self'; "
                                   "base-uri 'none'; frame-ancestors 'none'",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "same-origin",
        "Cache-Control": "no-store",
    }


def page_response(path: Path) -> Callable[[], HTMLResponse]:
    """The page, with page_headers."""
    page = path.read_text(encoding="utf-8")
    headers = page_headers(page)
    return lambda: HTMLResponse(page, headers=headers)


def not_admin_response(name: str) -> HTMLResponse:
    """403: the page that tells a signed-in labeler who they are and that /admin is not for them (name escaped)."""
    page = NOT_ADMIN_PAGE.read_text(encoding="utf-8").replace("{{name}}", html.escape(name, quote=True))
    return HTMLResponse(page, status_code=403, headers=page_headers(page))


def wants_html(request: Request) -> bool:
    """Whether the client asked for a page rather than JSON: text/html listed in Accept with a higher weight than
    application/json (a browser's navigation does; `*/*`, JSON clients and scripts get JSON)."""
    weights: dict[str, float] = {}
    for part in request.headers.get("accept", "").split(","):
        media, *params = [x.strip() for x in part.split(";")]
        q = 1.0
        for prm in params:
            k, _, v = prm.partition("=")
            if k.strip().lower() == "q":
                try:
                    q = float(v)
                except ValueError:
                    q = 0.0
        media = media.lower()
        weights[media] = max(weights.get(media, 0.0), q)
    return weights.get("text/html", 0.0) > weights.get("application/json", 0.0)


def same_origin(request: Request) -> bool:
    """Origin (or, without it, Referer) names this server, when the browser sends either."""
    host = (request.headers.get("host") or "").lower()
    for name in ("origin", "referer"):
        v = request.headers.get(name)
        if v is None:
            continue
        if v == "null":
            return False
        try:
            parts = urlsplit(v)
        except ValueError:
            return False
        return parts.scheme in ("http", "https") and parts.netloc.lower() == host
    return True


def create_app(state: LabelState) -> FastAPI:
    app = FastAPI(title="nextbit label", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.label = state
    db = state.db
    labeling_page, admin_page = page_response(PAGE), page_response(ADMIN_PAGE)

    # ---- plumbing (web/api.py), and the store's refusals ------------------------------------------------------------
    install_handlers(app, "nextbit label")

    @app.exception_handler(store.LabelError)
    async def _label_error(request: Request, e: store.LabelError):
        code = getattr(e, "code", "bad_request")
        status = LABEL_ERRORS.get(code, 400)
        type_ = {404: "not_found_error", 409: "conflict_error"}.get(status, "invalid_request_error")
        return WebError(status, str(e), code, type_=type_).response()

    async def body(request: Request, model: type[BaseModel]):
        """The JSON body, bounded in size and validated against `model` (web/api.py's read_json)."""
        return await read_json(request, model, state.max_body)

    # ---- who is asking --------------------------------------------------------------------------------------------
    def identify(request: Request) -> Who:
        """(in the threadpool) The user behind a bearer token or the session cookie; 401 if neither is valid."""
        token = bearer(request)
        if token is not None:
            user = store.user_for_token(db, token)
            if user is None:
                raise WebError(401, "unknown token", "bad_token", type_="authentication_error")
            return Who(user, None, None)
        sid = request.cookies.get(COOKIE)
        if not sid:
            raise WebError(401, "not logged in: POST /api/login with your token", "not_logged_in", type_="authentication_error")
        got = store.session_user(db, sid)
        if got is None:
            raise WebError(401, "the session has expired or was logged out; log in again", "session_expired",
                           type_="authentication_error")
        return Who(got[0], got[1], sid)

    async def who(request: Request, *, write: bool = False, admin: bool = False) -> Who:
        w = await run_in_threadpool(identify, request)
        if write and w.session_id is not None:  # a cookie is sent by the browser on its own: prove it is our page
            if not same_origin(request):
                raise WebError(403, "cross-origin request refused", "bad_origin", type_="permission_error")
            sent = request.headers.get(CSRF_HEADER, "")
            if not sent or not hmac.compare_digest(sent.encode(), (w.csrf or "").encode()):
                raise WebError(403, "missing or wrong CSRF token (send it in X-CSRF-Token)", "csrf", type_="permission_error")
        if admin and not w.user.is_admin:
            raise WebError(403, "admins only", "admin_only", type_="permission_error")
        return w

    def me(w: Who) -> dict:
        return {"name": w.user.name, "is_admin": bool(w.user.is_admin), "csrf": w.csrf,
                "progress": store.progress(db, w.user.id, overlap=state.overlap),
                "settings": {"overlap": state.overlap, "timeout_s": state.timeout_s, "select": state.select}}

    # ---- pages ----------------------------------------------------------------------------------------------------
    @app.get("/")
    async def index():
        return labeling_page()

    @app.get("/admin")
    async def admin(request: Request):
        try:
            w = await who(request)
        except WebError as e:
            if e.status == 401:  # log in on the labeling page first; it links here for admins
                return RedirectResponse("/?next=admin", status_code=303)
            raise
        if not w.user.is_admin:
            if wants_html(request):  # a browser: a page that says so; a script: the JSON error
                return not_admin_response(w.user.name)
            raise WebError(403, "admins only", "admin_only", type_="permission_error")
        return admin_page()

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    # ---- session --------------------------------------------------------------------------------------------------
    @app.post("/api/login")
    async def login(request: Request):
        if not same_origin(request):  # no login CSRF: another site cannot log this browser in as someone else
            raise WebError(403, "cross-origin request refused", "bad_origin", type_="permission_error")
        req = await body(request, LoginBody)

        def run():
            got = store.login(db, req.token.strip(), ttl_s=state.session_ttl_s)
            if got is None:
                raise WebError(401, "unknown token", "bad_token", type_="authentication_error")
            user, sid, csrf = got
            return sid, me(Who(user, csrf, sid))

        sid, out = await run_in_threadpool(run)
        resp = JSONResponse(out)
        resp.set_cookie(COOKIE, sid, max_age=int(state.session_ttl_s), httponly=True, samesite="strict",
                        secure=state.secure_cookie, path="/")
        return resp

    @app.post("/api/logout")
    async def logout(request: Request):
        w = await who(request, write=True)
        if w.session_id is not None:
            await run_in_threadpool(store.delete_session, db, w.session_id)
        resp = JSONResponse({"ok": True})
        resp.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict", secure=state.secure_cookie)
        return resp

    @app.get("/api/me")
    async def get_me(request: Request):
        w = await who(request)
        return await run_in_threadpool(me, w)

    # ---- labeling -------------------------------------------------------------------------------------------------
    @app.get("/api/next")
    async def next_pair(request: Request):
        w = await who(request)

        def run():
            shown = store.next_pair(db, w.user.id, overlap=state.overlap, timeout_s=state.timeout_s, select=state.select,
                                    seed=state.seed)
            progress = store.progress(db, w.user.id, overlap=state.overlap)
            if shown is None:
                return {"pair_id": None, "pair": None, "progress": progress}
            return {"pair_id": shown.pair_id, "prompt": shown.prompt, "left": shown.left, "right": shown.right,
                    "expires_at": shown.expires_at, "progress": progress}

        return await run_in_threadpool(run)

    @app.post("/api/answer")
    async def answer(request: Request):
        w = await who(request, write=True)
        req = await body(request, AnswerBody)
        label, created = await run_in_threadpool(lambda: store.answer(db, w.user.id, req.pair_id, req.side,
                                                                      idempotency_key=req.idempotency_key,
                                                                      comment=req.comment))
        if created and state.refresher is not None:
            state.refresher.labelled()
        return {"label_id": label.id, "pair_id": label.pair_id, "choice": label.choice, "created": created}

    @app.post("/api/undo")
    async def undo(request: Request):
        w = await who(request, write=True)
        pair_id = await run_in_threadpool(lambda: store.undo_last(db, w.user.id, timeout_s=state.timeout_s))
        if pair_id is None:
            raise WebError(409, "nothing to undo", "nothing_to_undo", type_="conflict_error")
        return {"pair_id": pair_id}

    @app.get("/api/labels")
    async def labels(request: Request):
        w = await who(request)
        return {"labels": plain(await run_in_threadpool(store.labels_of, db, w.user.id))}

    # ---- admin ----------------------------------------------------------------------------------------------------
    @app.get("/api/admin/stats")
    async def stats(request: Request):
        await who(request, admin=True)

        def run():
            reward_prob = None
            if state.reward is not None:
                labelled = {lab.pair_id for lab in store.all_labels(db)}
                reward_prob = state.reward.probs(p for p in store.pairs(db) if p.id in labelled)
            out = plain(labeler_stats(db, reward_prob=reward_prob))
            out["settings"] = {"overlap": state.overlap, "timeout_s": state.timeout_s, "select": state.select,
                               "reward": getattr(state.reward, "path", None)}
            if state.refresher is not None:
                out["refresh"] = {"every": state.refresher.every, "runs": state.refresher.runs,
                                  "running": state.refresher.running, "last_error": state.refresher.last_error}
            out["generated_at"] = time.time()
            return out

        return await run_in_threadpool(run)

    return app
