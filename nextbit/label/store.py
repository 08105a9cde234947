"""What the labeling app does to its database: users and their sessions, pairs, who is shown what, and answers.

Every function takes the open Database first (db.py) and runs as one transaction; times are UTC epoch seconds and
`now` can be passed in (tests step the clock). The web app (server.py) is a thin layer over these functions.

Users and sessions. `add_user` returns a login token (`secrets.token_urlsafe(32)`); only its sha256 is stored, so a
lost token is replaced, never recovered: `reset_token` stores a new one and deletes the user's sessions, so the old
token and every browser logged in with it are refused from then on. `user_summaries` lists users with their counts. A session id (the cookie) is stored the same way. The CSRF token of a session
is derived from the session id (sha256 of a fixed label + id), so nothing secret is stored for it either; the server
compares it with `csrf_ok` (constant time).

The queue. A pair goes to `overlap` labelers. What the pair has taken of that: its labels, plus other labelers'
assignments that are shown, unanswered and not yet expired. `next_pair` for a labeler
    1. gives back the labeler's own unexpired, unanswered assignment if there is one (a reload shows the same pair,
       in the same left/right order; the timer is not restarted);
    2. else takes, among the pairs this labeler has not answered and whose taken count is < overlap, the first in
       this labeler's order: `random` = a per-labeler shuffle (sha256 of seed, user, pair: uniform, reproducible),
       `disagreement` = priority descending, then id (set_priorities, from the active-learning ensemble);
    3. records the assignment with expires_at = now + timeout_s and a left/right order drawn per (seed, user, pair).
A shown-but-unanswered pair thus returns to the queue when its assignment expires. An answer to an expired
assignment is still taken if no one else has been given the pair since it expired (else LabelError 'expired'), so
the overlap holds for answers too.

Concurrency. Every operation of one labeler first locks that labeler's row, so a labeler's two tabs take turns.
Between labelers, the pair row is locked (PostgreSQL: SELECT ... FOR NO KEY UPDATE SKIP LOCKED, a locked pair is
passed over; SQLite: one writer at a time anyway, BEGIN IMMEDIATE) and its taken count is checked again under the
lock before the assignment is written, so no pair is ever given to more than `overlap` labelers at once. The unique
constraints (labeler, pair) and (labeler, idempotency key) hold whatever happens above them.

Answers. `answer` takes the side the labeler clicked (left, right, tie, cant_tell) and stores it in terms of the
pair (a, b, tie, cant_tell) through the assignment's left/right order. A retry with the same idempotency key returns
the stored label (created=False); the answer is committed (synchronous on SQLite: synchronous=FULL) before the
function returns, so an acknowledged answer survives a crash.

LabelError codes (for the HTTP layer): bad_side, bad_key, bad_comment (400); unknown_user, unknown_pair (404);
not_assigned, already_answered, key_reused, expired (409).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Union

import sqlalchemy as sa
from sqlalchemy import and_, delete, exists, func, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from nextbit.core.errors import NextbitError
from nextbit.label.db import CHOICES, Database, assignments, labels, pairs as pairs_t, sessions, users

SIDES = ("left", "right", "tie", "cant_tell")
SELECTS = ("random", "disagreement")
MAX_COMMENT = 2000
MAX_KEY = 200
MAX_ID = 2**31 - 1  # ids are INTEGER columns: 32-bit on PostgreSQL, where a larger number is an error, not a miss


class LabelError(NextbitError):
    """A request the store refuses; `code` says which rule (see the module docstring for the codes)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class User:
    id: int
    name: str
    is_admin: bool


@dataclass
class Pair:
    id: int
    key: str
    prompt: Union[str, list]
    a: str
    b: str
    source: str
    meta: dict
    priority: float
    created_at: float


@dataclass
class Shown:
    pair_id: int
    prompt: Union[str, list]
    left: str
    right: str
    left_is_a: bool
    expires_at: float


@dataclass
class Label:
    id: int
    pair_id: int
    user_id: int
    user_name: str
    choice: str  # a | b | tie | cant_tell, in terms of the pair
    left_is_a: bool
    comment: str
    idempotency_key: str
    created_at: float


def _sha(s: str) -> str:
    return hashlib.sha256(s.encode("utf-8")).hexdigest()


def _now(now: Optional[float]) -> float:
    return time.time() if now is None else float(now)


# ---- users and sessions -----------------------------------------------------------------------------------------
def check_name(name: str) -> str:
    """The name stripped; a NextbitError naming NAME when it is empty, too long or holds control characters."""
    if not isinstance(name, str) or not name.strip():
        raise NextbitError("NAME: a user needs a non-empty name")
    name = name.strip()
    if len(name) > 200 or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise NextbitError(f"NAME: {name[:40]!r} must be at most 200 printable characters")
    return name


def add_user(db: Database, name: str, *, admin: bool = False, now: Optional[float] = None) -> str:
    """Create a user; returns their login token (shown once: only its sha256 is kept)."""
    name = check_name(name)
    token = secrets.token_urlsafe(32)

    def tx(conn: Connection) -> None:
        if conn.execute(select(users.c.id).where(users.c.name == name)).first() is not None:
            raise NextbitError(f"NAME: a user named {name!r} already exists")
        conn.execute(insert(users).values(name=name, token_hash=_sha(token), is_admin=bool(admin), created_at=_now(now)))

    try:
        db.transact(tx)
    except IntegrityError:  # the same name added at the same moment elsewhere
        raise NextbitError(f"NAME: a user named {name!r} already exists")
    return token


def list_users(db: Database) -> list[User]:
    with db.session() as conn:
        rows = conn.execute(select(users.c.id, users.c.name, users.c.is_admin).order_by(users.c.id)).all()
    return [User(r.id, r.name, bool(r.is_admin)) for r in rows]


@dataclass
class UserSummary:
    name: str
    is_admin: bool
    labels: int  # answers given (every choice, "can't tell" included)
    created_at: float


def user_summaries(db: Database) -> list[UserSummary]:
    """Every user with the number of labels they gave, in the order they were added."""
    n = (sa.select(labels.c.user_id, func.count().label("n")).group_by(labels.c.user_id).subquery())
    with db.session() as conn:
        rows = conn.execute(sa.select(users.c.name, users.c.is_admin, users.c.created_at, func.coalesce(n.c.n, 0).label("n"))
                            .select_from(users.outerjoin(n, n.c.user_id == users.c.id)).order_by(users.c.id)).all()
    return [UserSummary(r.name, bool(r.is_admin), int(r.n), float(r.created_at)) for r in rows]


def reset_token(db: Database, name: str) -> str:
    """Give the user named `name` a new login token and return it; the old token stops working and every session of
    the user is ended (their browsers must log in again). An unknown name is a NextbitError."""
    name = check_name(name)
    token = secrets.token_urlsafe(32)

    def tx(conn: Connection) -> None:
        row = conn.execute(select(users.c.id).where(users.c.name == name).with_for_update()).first()
        if row is None:
            raise NextbitError(f"NAME: no user named {name!r} (`nextbit label users` lists them)")
        conn.execute(update(users).where(users.c.id == row.id).values(token_hash=_sha(token)))
        conn.execute(delete(sessions).where(sessions.c.user_id == row.id))

    db.transact(tx)
    return token


def user_for_token(db: Database, token: str) -> Optional[User]:
    """The user whose login token this is, or None."""
    if not isinstance(token, str) or not token or len(token) > 512:
        return None
    h = _sha(token)
    with db.session() as conn:
        r = conn.execute(select(users.c.id, users.c.name, users.c.is_admin, users.c.token_hash)
                         .where(users.c.token_hash == h)).first()
    if r is None or not hmac.compare_digest(r.token_hash, h):
        return None
    return User(r.id, r.name, bool(r.is_admin))


def csrf_for(session_id: str) -> str:
    """The CSRF token of a session: derived from the session id, so it is never stored."""
    return _sha("nextbit-label-csrf:" + session_id)


def csrf_ok(session_id: str, token: Optional[str]) -> bool:
    """Whether `token` is the CSRF token of this session (constant-time comparison)."""
    if not isinstance(token, str) or not isinstance(session_id, str):
        return False
    return hmac.compare_digest(csrf_for(session_id).encode(), token.encode("utf-8", "replace"))


def create_session(db: Database, user_id: int, *, ttl_s: float = 7 * 24 * 3600, now: Optional[float] = None) -> tuple[str, str]:
    """A new login session: (session id for the cookie, CSRF token). Expired sessions are cleared on the way."""
    sid = secrets.token_urlsafe(32)
    t = _now(now)

    def tx(conn: Connection) -> None:
        if conn.execute(select(users.c.id).where(users.c.id == user_id)).first() is None:
            raise LabelError("unknown_user", f"no user with id {user_id}")
        conn.execute(delete(sessions).where(sessions.c.expires_at <= t))
        conn.execute(insert(sessions).values(id_hash=_sha(sid), user_id=user_id, created_at=t, expires_at=t + ttl_s))

    db.transact(tx)
    return sid, csrf_for(sid)


def login(db: Database, token: str, *, ttl_s: float = 7 * 24 * 3600, now: Optional[float] = None
          ) -> Optional[tuple[User, str, str]]:
    """(user, session id, CSRF token) of a new session for this login token, or None when no user has it. One
    transaction with the user's row locked, so a login racing `reset_token` either ends before it (its session is
    deleted by the reset) or sees the new token (and fails)."""
    if not isinstance(token, str) or not token or len(token) > 512:
        return None
    h = _sha(token)
    sid = secrets.token_urlsafe(32)
    t = _now(now)

    def tx(conn: Connection) -> Optional[User]:
        r = conn.execute(select(users.c.id, users.c.name, users.c.is_admin, users.c.token_hash)
                         .where(users.c.token_hash == h).with_for_update(key_share=True)).first()
        if r is None or not hmac.compare_digest(r.token_hash, h):
            return None
        conn.execute(delete(sessions).where(sessions.c.expires_at <= t))
        conn.execute(insert(sessions).values(id_hash=_sha(sid), user_id=r.id, created_at=t, expires_at=t + ttl_s))
        return User(r.id, r.name, bool(r.is_admin))

    user = db.transact(tx)
    return None if user is None else (user, sid, csrf_for(sid))


def session_user(db: Database, session_id: Optional[str], *, now: Optional[float] = None) -> Optional[tuple[User, str]]:
    """(user, CSRF token) of a live session, or None if the id is unknown or expired."""
    if not isinstance(session_id, str) or not session_id or len(session_id) > 512:
        return None
    h = _sha(session_id)
    with db.session() as conn:
        r = conn.execute(select(users.c.id, users.c.name, users.c.is_admin, sessions.c.id_hash)
                         .join(sessions, sessions.c.user_id == users.c.id)
                         .where(sessions.c.id_hash == h, sessions.c.expires_at > _now(now))).first()
    if r is None or not hmac.compare_digest(r.id_hash, h):
        return None
    return User(r.id, r.name, bool(r.is_admin)), csrf_for(session_id)


def delete_session(db: Database, session_id: str) -> None:
    if isinstance(session_id, str) and session_id:
        db.transact(lambda conn: conn.execute(delete(sessions).where(sessions.c.id_hash == _sha(session_id))))


# ---- pairs ------------------------------------------------------------------------------------------------------
def pair_key(prompt: Any, a: str, b: str) -> str:
    """sha256 of the canonical JSON of [prompt, a, b]: the same pair imported twice is one pair."""
    return _sha(json.dumps([prompt, a, b], sort_keys=True, ensure_ascii=False, separators=(",", ":")))


def check_text(text: str, where: str, what: str) -> None:
    """Text both backends store as it is: no NUL (PostgreSQL refuses it) and no lone surrogate (not UTF-8)."""
    if "\x00" in text:
        raise NextbitError(f"{where}: {what} holds a NUL character, which the labels database cannot store")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise NextbitError(f"{where}: {what} is not valid UTF-8 text (it holds a lone surrogate)")


def check_pair(rec: Any, where: str) -> tuple[Any, str, str, dict]:
    """(prompt, a, b, the other fields) of a pair record; a NextbitError starting with `where` when it is not one."""
    if not isinstance(rec, dict):
        raise NextbitError(f"{where}: a pair must be a JSON object")
    p = rec.get("prompt")
    ok_msgs = isinstance(p, list) and p and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                and isinstance(m.get("content"), str) for m in p)
    if not (isinstance(p, str) or ok_msgs):
        raise NextbitError(f"{where}: 'prompt' must be a string or a non-empty list of messages")
    if not isinstance(rec.get("a"), str) or not isinstance(rec.get("b"), str):
        raise NextbitError(f"{where}: a pair needs string fields 'a' and 'b'")
    for text in [p] if isinstance(p, str) else [t for m in p for t in (m["role"], m["content"])]:
        check_text(text, where, "'prompt'")
    check_text(rec["a"], where, "'a'")
    check_text(rec["b"], where, "'b'")
    return p, rec["a"], rec["b"], {k: v for k, v in rec.items() if k not in ("prompt", "a", "b")}


def import_pairs(db: Database, records: Iterable[dict], *, source: str = "", now: Optional[float] = None) -> tuple[int, int]:
    """Add pairs {"prompt", "a", "b", ...other fields kept as meta}; returns (added, skipped as duplicates: the same
    prompt, a and b already in the database or earlier in `records`). All or nothing: one transaction."""
    rows = []
    for i, rec in enumerate(records):
        p, a, b, meta = check_pair(rec, f"pair {i + 1}")
        if a == b:  # as `nextbit reward` and `dpo` see it: chosen == rejected states no preference
            raise NextbitError(f"pair {i + 1}: 'a' and 'b' are the same response; a pair needs two different responses "
                               f"to compare")
        rows.append(dict(key=pair_key(p, a, b), prompt_json=json.dumps(p, ensure_ascii=False), a=a, b=b,
                         source=source[:500], meta_json=json.dumps(meta)))  # ASCII: any text in meta is stored
    t = _now(now)

    def tx(conn: Connection) -> tuple[int, int]:
        ins = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
        added = 0
        for r in rows:
            stmt = ins(pairs_t).values(**r, priority=0.0, created_at=t).on_conflict_do_nothing(index_elements=["key"])
            added += conn.execute(stmt.returning(pairs_t.c.id)).first() is not None
        return added, len(rows) - added

    return db.transact(tx)


def _pair(r) -> Pair:
    return Pair(r.id, r.key, json.loads(r.prompt_json), r.a, r.b, r.source, json.loads(r.meta_json), float(r.priority),
                r.created_at)


def pairs(db: Database) -> list[Pair]:
    """Every pair, by id."""
    with db.session() as conn:
        return [_pair(r) for r in conn.execute(select(pairs_t).order_by(pairs_t.c.id)).all()]


def set_priorities(db: Database, priorities: dict[int, float]) -> int:
    """Set pairs' priorities (higher is shown first under select='disagreement'); returns how many pairs matched."""
    items = sorted((int(k), float(v)) for k, v in priorities.items())  # id order: concurrent writers lock alike

    def tx(conn: Connection) -> int:
        n = 0
        for pid, pr in items:
            n += conn.execute(update(pairs_t).where(pairs_t.c.id == pid).values(priority=pr)).rowcount
        return n

    return db.transact(tx) if items else 0


# ---- the queue --------------------------------------------------------------------------------------------------
def _lock_user(conn: Connection, user_id: int) -> None:
    if conn.execute(select(users.c.id).where(users.c.id == user_id).with_for_update(key_share=True)).first() is None:
        raise LabelError("unknown_user", f"no user with id {user_id}")


def _taken(pair_id, user_id: int, t: float):
    """How much of its overlap a pair has used, seen by `user_id`: all labels + others' live open assignments."""
    l2 = labels.alias("l2")
    n_labels = select(func.count()).select_from(labels).where(labels.c.pair_id == pair_id).scalar_subquery()
    n_open = (select(func.count()).select_from(assignments)
              .where(assignments.c.pair_id == pair_id, assignments.c.user_id != user_id, assignments.c.expires_at > t,
                     ~exists().where(l2.c.pair_id == assignments.c.pair_id, l2.c.user_id == assignments.c.user_id))
              .scalar_subquery())
    return n_labels + n_open


def _eligible(user_id: int, overlap: int, t: float):
    mine = exists().where(labels.c.pair_id == pairs_t.c.id, labels.c.user_id == user_id)
    return select(pairs_t.c.id, pairs_t.c.priority).where(~mine, _taken(pairs_t.c.id, user_id, t) < overlap)


def _coin(seed: int, user_id: int, pair_id: int, what: str) -> int:
    return int(_sha(f"{what}:{seed}:{user_id}:{pair_id}")[:15], 16)


def _open_assignment(user_id: int, t: float):
    answered = exists().where(labels.c.pair_id == assignments.c.pair_id, labels.c.user_id == user_id)
    return (select(assignments).where(assignments.c.user_id == user_id, assignments.c.expires_at > t, ~answered)
            .order_by(assignments.c.shown_at.desc(), assignments.c.id.desc()).limit(1))


def _shown(conn: Connection, pair_id: int, left_is_a: bool, expires_at: float) -> Shown:
    r = conn.execute(select(pairs_t.c.prompt_json, pairs_t.c.a, pairs_t.c.b).where(pairs_t.c.id == pair_id)).one()
    left, right = (r.a, r.b) if left_is_a else (r.b, r.a)
    return Shown(pair_id, json.loads(r.prompt_json), left, right, bool(left_is_a), expires_at)


class _Busy(Exception):
    """Every candidate pair was locked by another labeler's transaction: try again in a moment."""


def next_pair(db: Database, user_id: int, *, overlap: int, timeout_s: float, select: str = "random", seed: int = 0,
              now: Optional[float] = None) -> Optional[Shown]:
    """The pair to show this labeler now, or None when the queue holds nothing for them (module docstring)."""
    if overlap < 1:
        raise NextbitError(f"--overlap must be >= 1, got {overlap}")
    if not timeout_s > 0:
        raise NextbitError(f"--timeout must be > 0 seconds, got {timeout_s}")
    if select not in SELECTS:
        raise NextbitError(f"--select must be one of {', '.join(SELECTS)}, got {select!r}")
    order_by = select

    def tx(conn: Connection) -> Optional[Shown]:
        t = _now(now)
        _lock_user(conn, user_id)
        held = conn.execute(_open_assignment(user_id, t)).first()
        if held is not None:
            return _shown(conn, held.pair_id, held.left_is_a, held.expires_at)
        cands = conn.execute(_eligible(user_id, overlap, t)).all()
        if order_by == "random":
            cands.sort(key=lambda r: _coin(seed, user_id, r.id, "order"))
        else:
            cands.sort(key=lambda r: (-r.priority, r.id))
        busy = False
        for c in cands:
            got = conn.execute(sa.select(pairs_t.c.id).where(pairs_t.c.id == c.id)
                               .with_for_update(skip_locked=True, key_share=True)).first()
            if got is None:
                busy = True
                continue
            if conn.execute(sa.select(_taken(c.id, user_id, t))).scalar_one() >= overlap:
                continue
            left_is_a = _coin(seed, user_id, c.id, "side") % 2 == 0
            exp = t + float(timeout_s)
            old = conn.execute(sa.select(assignments.c.id).where(assignments.c.user_id == user_id,
                                                                assignments.c.pair_id == c.id)).first()
            if old is None:
                conn.execute(insert(assignments).values(pair_id=c.id, user_id=user_id, left_is_a=left_is_a, shown_at=t,
                                                        expires_at=exp))
            else:
                conn.execute(update(assignments).where(assignments.c.id == old.id)
                             .values(left_is_a=left_is_a, shown_at=t, expires_at=exp))
            return _shown(conn, c.id, left_is_a, exp)
        if busy:
            raise _Busy()
        return None

    for attempt in range(50):
        try:
            return db.transact(tx)
        except _Busy:
            time.sleep(0.005 * (1 + attempt % 10))
    return None



# ---- answers ----------------------------------------------------------------------------------------------------
def _label_rows(where=None):
    q = (sa.select(labels, users.c.name.label("user_name")).join(users, users.c.id == labels.c.user_id))
    return q if where is None else q.where(where)


def _label(r) -> Label:
    return Label(r.id, r.pair_id, r.user_id, r.user_name, r.choice, bool(r.left_is_a), r.comment, r.idempotency_key,
                 r.created_at)


def choice_of(side: str, left_is_a: bool) -> str:
    """The clicked side in terms of the pair: left/right -> a/b through the shown order; tie and cant_tell as they are."""
    if side == "left":
        return "a" if left_is_a else "b"
    if side == "right":
        return "b" if left_is_a else "a"
    return side


def answer(db: Database, user_id: int, pair_id: int, side: str, *, idempotency_key: str, comment: str = "",
           now: Optional[float] = None) -> tuple[Label, bool]:
    """Store the labeler's answer for a pair they were shown; (label, created). See the module docstring."""
    if side not in SIDES:
        raise LabelError("bad_side", f"side must be one of {', '.join(SIDES)}, got {side!r}")
    if not isinstance(idempotency_key, str) or not idempotency_key or len(idempotency_key) > MAX_KEY:
        raise LabelError("bad_key", f"an answer needs an idempotency key of 1 to {MAX_KEY} characters")
    if not isinstance(comment, str) or len(comment) > MAX_COMMENT:
        raise LabelError("bad_comment", f"a comment is text of at most {MAX_COMMENT} characters")

    def tx(conn: Connection) -> tuple[Label, bool]:
        t = _now(now)
        _lock_user(conn, user_id)
        same = conn.execute(_label_rows(and_(labels.c.user_id == user_id, labels.c.idempotency_key == idempotency_key))).first()
        if same is not None:
            if same.pair_id != pair_id:
                raise LabelError("key_reused", "this idempotency key was already used for another pair")
            return _label(same), False
        if not -MAX_ID - 1 <= pair_id <= MAX_ID or conn.execute(
                sa.select(pairs_t.c.id).where(pairs_t.c.id == pair_id).with_for_update(key_share=True)).first() is None:
            raise LabelError("unknown_pair", f"no pair with id {pair_id}")
        if conn.execute(sa.select(labels.c.id).where(labels.c.user_id == user_id, labels.c.pair_id == pair_id)).first():
            raise LabelError("already_answered", "this pair is already answered (undo it first to change the answer)")
        asg = conn.execute(sa.select(assignments).where(assignments.c.user_id == user_id,
                                                       assignments.c.pair_id == pair_id)).first()
        if asg is None:
            raise LabelError("not_assigned", "this pair was not shown to this labeler")
        if asg.expires_at <= t:
            given_since = conn.execute(sa.select(assignments.c.id).where(
                assignments.c.pair_id == pair_id, assignments.c.user_id != user_id,
                assignments.c.shown_at >= asg.expires_at).limit(1)).first()
            if given_since is not None:
                raise LabelError("expired", "this pair timed out and went to another labeler")
        choice = choice_of(side, bool(asg.left_is_a))
        assert choice in CHOICES
        lid = conn.execute(insert(labels).values(pair_id=pair_id, user_id=user_id, choice=choice, left_is_a=asg.left_is_a,
                                                 comment=comment, idempotency_key=idempotency_key, created_at=t)
                           .returning(labels.c.id)).scalar_one()
        return _label(conn.execute(_label_rows(labels.c.id == lid)).one()), True

    return db.transact(tx)


def undo_last(db: Database, user_id: int, *, timeout_s: float = 600.0, now: Optional[float] = None) -> Optional[int]:
    """Delete the labeler's most recent label and show its pair again (same left/right, expiry now + timeout_s);
    returns the pair id, or None when there is nothing to undo."""

    def tx(conn: Connection) -> Optional[int]:
        t = _now(now)
        _lock_user(conn, user_id)
        last = conn.execute(sa.select(labels.c.id, labels.c.pair_id, labels.c.left_is_a).where(labels.c.user_id == user_id)
                            .order_by(labels.c.created_at.desc(), labels.c.id.desc()).limit(1)).first()
        if last is None:
            return None
        conn.execute(delete(labels).where(labels.c.id == last.id))
        n = conn.execute(update(assignments).where(assignments.c.user_id == user_id, assignments.c.pair_id == last.pair_id)
                         .values(shown_at=t, expires_at=t + float(timeout_s))).rowcount
        if not n:
            conn.execute(insert(assignments).values(pair_id=last.pair_id, user_id=user_id, left_is_a=last.left_is_a,
                                                    shown_at=t, expires_at=t + float(timeout_s)))
        return last.pair_id

    return db.transact(tx)


def progress(db: Database, user_id: int, *, overlap: int, now: Optional[float] = None) -> dict:
    """{"done_today" (since 00:00 UTC), "done_total", "left" (pairs this labeler could still be given, the one they
    hold included)}."""
    t = _now(now)
    midnight = t - t % 86400
    with db.session() as conn:
        total = conn.execute(sa.select(func.count()).select_from(labels).where(labels.c.user_id == user_id)).scalar_one()
        today = conn.execute(sa.select(func.count()).select_from(labels)
                             .where(labels.c.user_id == user_id, labels.c.created_at >= midnight)).scalar_one()
        left = conn.execute(sa.select(func.count()).select_from(_eligible(user_id, overlap, t).subquery())).scalar_one()
    return {"done_today": int(today), "done_total": int(total), "left": int(left)}


def labels_of(db: Database, user_id: int) -> list[Label]:
    """One labeler's own labels, oldest first."""
    with db.session() as conn:
        rows = conn.execute(_label_rows(labels.c.user_id == user_id).order_by(labels.c.created_at, labels.c.id)).all()
    return [_label(r) for r in rows]


def all_labels(db: Database) -> list[Label]:
    """Every label, by id."""
    with db.session() as conn:
        return [_label(r) for r in conn.execute(_label_rows().order_by(labels.c.id)).all()]
