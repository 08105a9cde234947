"""`nextbit label serve` over HTTP: a real uvicorn on 127.0.0.1 (in a thread, and `nextbit label serve` as a process
for kill -9 and Ctrl-C), talked to with httpx the way the page talks to it (login cookie + X-CSRF-Token).

Covered: login, the session cookie's flags, logout; left/right -> a/b; idempotent answers and undo; a labeler sees
only their own labels; CSRF and Origin checks (refused requests store nothing); admin routes closed to labelers;
bad input is a 4xx in the error shape (plus a hypothesis fuzz); the body size bound; 16 concurrent labelers (SQLite
and PostgreSQL) with no answer lost, doubled or over-assigned; kill -9 mid-run loses nothing acknowledged and
stores nothing unsent; the reward model's agreement on the admin page; the disagreement refresher runs every N labels.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ROOT, peaky_model
from live import label_app_in_thread as live
from nextbit.core.errors import NextbitError
from nextbit.label import store
from nextbit.label.app import COOKIE, Refresher
from nextbit.label.db import assignments, open_db
from nextbit.label.server import LabelServeConfig, label_serve

XSS = '<script>window.__pwned=1</script><img src=x onerror="window.__pwned=2"> <b>not bold</b>'


def make_pairs(n: int, tag: str) -> list[dict]:
    return [{"prompt": f"[{tag}] Which review is kinder? #{i}", "a": f"{tag} answer a{i}: lovely and warm.",
             "b": f"{tag} answer b{i}: dull and cold."} for i in range(n)]


class Labeler:
    """An httpx client logged in like the page: the session cookie, and the CSRF token in X-CSRF-Token."""

    def __init__(self, url: str, token: str):
        self.http = httpx.Client(base_url=url, timeout=30)
        r = self.http.post("/api/login", json={"token": token})
        assert r.status_code == 200, r.text
        self.me = r.json()
        self.headers = {"X-CSRF-Token": self.me["csrf"]}

    def next(self) -> dict:
        r = self.http.get("/api/next")
        assert r.status_code == 200, r.text
        return r.json()

    def answer(self, pair_id, side, key=None, comment="") -> httpx.Response:
        return self.http.post("/api/answer", headers=self.headers, json={
            "pair_id": pair_id, "side": side, "idempotency_key": key or str(uuid.uuid4()), "comment": comment})

    def post(self, path, **kw) -> httpx.Response:
        return self.http.post(path, headers={**self.headers, **kw.pop("headers", {})}, **kw)

    def close(self):
        self.http.close()


def error_of(r: httpx.Response) -> dict:
    body = r.json()
    assert set(body) == {"error"} and {"message", "type", "code"} <= set(body["error"]), body
    return body["error"]


# ---- one server for the API tests -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def site(tmp_path_factory):
    url = f"sqlite:///{tmp_path_factory.mktemp('label_app') / 'labels.db'}"
    db = open_db(url)
    tokens = {name: store.add_user(db, name, admin=name == "root") for name in ("alice", "bob", "carol", "dave", "root")}
    store.import_pairs(db, make_pairs(30, "api") + [{"prompt": "markup " + XSS, "a": XSS, "b": "plain"}], source="test")
    by_text = {(p.a, p.b): p for p in store.pairs(db)}
    db.close()
    with live(LabelServeConfig(db=url, overlap=2, timeout=600)) as (base, state):
        yield {"url": base, "db": state.db, "tokens": tokens, "pairs": by_text, "state": state}


def labels_by(db, name):
    return [lab for lab in store.all_labels(db) if lab.user_name == name]


def test_login_sets_a_strict_httponly_cookie_and_logout_ends_the_session(site):
    with httpx.Client(base_url=site["url"]) as c:
        r = c.get("/api/me")
        assert r.status_code == 401 and error_of(r)["code"] == "not_logged_in"
        r = c.post("/api/login", json={"token": "not-a-token"})
        assert r.status_code == 401 and error_of(r)["code"] == "bad_token"
        r = c.post("/api/login", json={"token": site["tokens"]["alice"]})
        assert r.status_code == 200
        cookie = r.headers["set-cookie"]
        assert cookie.startswith(f"{COOKIE}=") and "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
        assert site["tokens"]["alice"] not in cookie  # the session id, not the token
        me = c.get("/api/me").json()
        assert me["name"] == "alice" and me["is_admin"] is False and me["csrf"] == r.json()["csrf"]
        assert me["settings"] == {"overlap": 2, "timeout_s": 600, "select": "random"}
        assert c.post("/api/logout").status_code == 403  # logging out is state-changing too: CSRF token needed
        assert c.post("/api/logout", headers={"X-CSRF-Token": me["csrf"]}).status_code == 200
        c.cookies.set(COOKIE, r.cookies[COOKIE])  # the old cookie, replayed, is dead
        r = c.get("/api/me")
        assert r.status_code == 401 and error_of(r)["code"] == "session_expired"
    with httpx.Client(base_url=site["url"], headers={"Authorization": f"Bearer {site['tokens']['bob']}"}) as c:
        assert c.get("/api/me").json()["name"] == "bob"  # a script may send the token instead of logging in


def test_answers_map_left_right_to_a_b_are_idempotent_and_undo_reopens_the_pair(site):
    db, alice, bob = site["db"], Labeler(site["url"], site["tokens"]["alice"]), Labeler(site["url"], site["tokens"]["bob"])
    try:
        shown = alice.next()
        assert alice.next()["pair_id"] == shown["pair_id"]  # a reload shows the same pair, same order
        pair = next(p for p in site["pairs"].values() if p.id == shown["pair_id"])
        assert {shown["left"], shown["right"]} == {pair.a, pair.b} and shown["prompt"] == pair.prompt
        assert shown["progress"] == {"done_today": 0, "done_total": 0, "left": 31}
        key = str(uuid.uuid4())
        r = alice.answer(shown["pair_id"], "left", key, comment="the left one is kinder")
        assert r.status_code == 200 and r.json()["created"] is True
        want = "a" if shown["left"] == pair.a else "b"
        assert r.json()["choice"] == want
        again = alice.answer(shown["pair_id"], "left", key, comment="the left one is kinder")  # a retry
        assert again.status_code == 200 and again.json() == {**r.json(), "created": False}
        other = alice.answer(shown["pair_id"], "right")  # a second answer, another key
        assert other.status_code == 409 and error_of(other)["code"] == "already_answered"
        [lab] = labels_by(db, "alice")
        assert (lab.pair_id, lab.choice, lab.comment, lab.idempotency_key) == (shown["pair_id"], want, "the left one is kinder", key)

        second = alice.next()
        assert second["pair_id"] != shown["pair_id"] and second["progress"]["done_total"] == 1
        assert alice.answer(second["pair_id"], "tie").json()["choice"] == "tie"
        b = bob.next()
        assert bob.answer(b["pair_id"], "cant_tell").status_code == 200
        # each labeler sees only their own labels
        mine = alice.http.get("/api/labels").json()["labels"]
        assert [x["pair_id"] for x in mine] == [shown["pair_id"], second["pair_id"]] and {x["user_name"] for x in mine} == {"alice"}
        assert [x["pair_id"] for x in bob.http.get("/api/labels").json()["labels"]] == [b["pair_id"]]

        r = alice.post("/api/undo")
        assert r.status_code == 200 and r.json() == {"pair_id": second["pair_id"]}
        back = alice.next()
        assert (back["pair_id"], back["left"], back["right"]) == (second["pair_id"], second["left"], second["right"])
        assert [lab.pair_id for lab in labels_by(db, "alice")] == [shown["pair_id"]]
        assert alice.answer(back["pair_id"], "right").json()["choice"] == ("b" if back["left"] == next(
            p for p in site["pairs"].values() if p.id == back["pair_id"]).a else "a")
        r = alice.answer(99999, "left")
        assert r.status_code == 404 and error_of(r)["code"] == "unknown_pair"
        unshown = next(p.id for p in site["pairs"].values() if p.id not in {shown["pair_id"], second["pair_id"], b["pair_id"]})
        r = alice.answer(unshown, "left")
        assert r.status_code == 409 and error_of(r)["code"] == "not_assigned"
    finally:
        alice.close()
        bob.close()


def test_cross_site_requests_are_refused_and_store_nothing(site):
    db, carol = site["db"], Labeler(site["url"], site["tokens"]["carol"])
    try:
        shown = carol.next()
        body = {"pair_id": shown["pair_id"], "side": "left", "idempotency_key": str(uuid.uuid4())}
        good = carol.headers["X-CSRF-Token"]
        for headers, code in [({}, "csrf"), ({"X-CSRF-Token": "0" * 64}, "csrf"), ({"X-CSRF-Token": good[:-1]}, "csrf"),
                              ({"X-CSRF-Token": good, "Origin": "http://evil.example"}, "bad_origin"),
                              ({"X-CSRF-Token": good, "Origin": "null"}, "bad_origin"),
                              ({"X-CSRF-Token": good, "Referer": "http://evil.example/page"}, "bad_origin")]:
            r = carol.http.post("/api/answer", json=body, headers=headers)
            assert r.status_code == 403 and error_of(r)["code"] == code, (headers, r.text)
            r = carol.http.post("/api/undo", headers=headers)
            assert r.status_code == 403, headers
        assert labels_by(db, "carol") == []
        r = carol.http.post("/api/login", json={"token": site["tokens"]["carol"]}, headers={"Origin": "http://evil.example"})
        assert r.status_code == 403 and error_of(r)["code"] == "bad_origin"  # no login CSRF either
        # the page's own request: same origin, the session's CSRF token
        r = carol.http.post("/api/answer", json=body, headers={"X-CSRF-Token": good, "Origin": site["url"],
                                                               "Referer": site["url"] + "/"})
        assert r.status_code == 200
        assert [lab.pair_id for lab in labels_by(db, "carol")] == [shown["pair_id"]]
    finally:
        carol.close()


def test_admin_routes_are_closed_to_labelers(site):
    dave = Labeler(site["url"], site["tokens"]["dave"])
    try:
        for path in ("/api/admin/stats", "/admin"):
            r = dave.http.get(path)
            assert r.status_code == 403 and error_of(r)["code"] == "admin_only", path
            r = httpx.get(site["url"] + path, headers={"Authorization": f"Bearer {site['tokens']['dave']}"})
            assert r.status_code == 403, path
        assert httpx.get(site["url"] + "/api/admin/stats").status_code == 401
        r = httpx.get(site["url"] + "/admin")
        assert r.status_code == 303 and r.headers["location"] == "/?next=admin"
    finally:
        dave.close()
    root = Labeler(site["url"], site["tokens"]["root"])
    try:
        page = root.http.get("/admin")
        assert page.status_code == 200 and "<title>nextbit label: admin</title>" in page.text
        assert "script-src 'sha256-" in page.headers["content-security-policy"]
        stats = root.http.get("/api/admin/stats").json()
        assert stats["settings"]["overlap"] == 2 and stats["settings"]["reward"] is None
        counts = {s["name"]: s["count"] for s in stats["labelers"]}
        assert counts == {name: len(labels_by(site["db"], name)) for name in counts}
    finally:
        root.close()


BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8"


def test_a_labeler_who_opens_the_admin_page_in_a_browser_gets_a_page_saying_so(site):
    name = '<i>mal</i> & "lory"'
    token = store.add_user(site["db"], name)
    mal = Labeler(site["url"], token)
    try:
        r = mal.http.get("/admin", headers={"Accept": BROWSER_ACCEPT})
        assert r.status_code == 403 and r.headers["content-type"].startswith("text/html")
        assert "<title>nextbit label: not an admin</title>" in r.text
        assert "You are signed in as <b>&lt;i&gt;mal&lt;/i&gt; &amp; &quot;lory&quot;</b>, who is not an admin." in r.text
        assert name not in r.text and "{{name}}" not in r.text
        assert "script-src 'none'" in r.headers["content-security-policy"]
        for accept in ("application/json", "*/*", "application/json, text/html;q=0.5"):  # API clients: the JSON error
            r = mal.http.get("/admin", headers={"Accept": accept})
            assert r.status_code == 403 and error_of(r)["code"] == "admin_only", accept
        r = httpx.get(site["url"] + "/api/admin/stats", headers={"Accept": BROWSER_ACCEPT, "Authorization": f"Bearer {token}"})
        assert r.status_code == 403 and error_of(r)["code"] == "admin_only"  # the API stays JSON
    finally:
        mal.close()
    r = httpx.get(site["url"] + "/admin", headers={"Accept": BROWSER_ACCEPT})  # logged out: to the login page
    assert r.status_code == 303 and r.headers["location"] == "/?next=admin"
    root = Labeler(site["url"], site["tokens"]["root"])
    try:
        r = root.http.get("/admin", headers={"Accept": BROWSER_ACCEPT})
        assert r.status_code == 200 and "<title>nextbit label: admin</title>" in r.text
    finally:
        root.close()


def test_a_reset_token_ends_the_old_token_and_its_sessions(site, capsys):
    from nextbit.cli import main

    old = store.add_user(site["db"], "erin")
    browser = Labeler(site["url"], old)  # a session made with the old token
    other = Labeler(site["url"], site["tokens"]["carol"])  # someone else's session, which must live on
    try:
        assert browser.http.get("/api/me").status_code == 200
        capsys.readouterr()
        main(["label", "reset-token", "erin", "--db", site["db"].url])
        new = capsys.readouterr().out.strip()
        assert new and new != old and len(new.split()) == 1
        r = browser.http.get("/api/me")
        assert r.status_code == 401 and error_of(r)["code"] == "session_expired"
        r = browser.post("/api/answer", json={"pair_id": 1, "side": "left", "idempotency_key": "reset-key-1"})
        assert r.status_code == 401 and not labels_by(site["db"], "erin")
        r = httpx.post(site["url"] + "/api/login", json={"token": old})
        assert r.status_code == 401 and error_of(r)["code"] == "bad_token"
        r = httpx.get(site["url"] + "/api/me", headers={"Authorization": f"Bearer {old}"})
        assert r.status_code == 401 and error_of(r)["code"] == "bad_token"
        assert other.http.get("/api/me").status_code == 200
        again = Labeler(site["url"], new)
        try:
            assert again.me["name"] == "erin" and again.http.get("/api/me").status_code == 200
            shown = again.next()
            assert again.answer(shown["pair_id"], "left").status_code == 200
        finally:
            again.close()
    finally:
        browser.close()
        other.close()


def test_an_internal_error_tells_the_labeler_an_id_and_the_log_the_details(site, monkeypatch, capfd):
    """A fault inside a route is a 500 in the error shape whose message holds no internals (a database error's text
    can carry SQL and other labelers' data), only an id that the server's log prints beside the traceback."""
    def boom(*a, **kw):
        raise RuntimeError("SELECT token_sha256 FROM users -- secret")

    dave = Labeler(site["url"], site["tokens"]["dave"])
    try:
        monkeypatch.setattr(store, "progress", boom)
        r = dave.http.get("/api/next")
        monkeypatch.undo()
        err = error_of(r)
        assert r.status_code == 500 and err["type"] == "server_error" and err["code"] == "internal"
        assert "secret" not in r.text and "SELECT" not in r.text
        ref = re.search(r"internal error ([0-9a-f]{12})", err["message"]).group(1)
        log = capfd.readouterr().err
        assert f"internal error {ref} on GET /api/next" in log and "RuntimeError: SELECT token_sha256" in log
    finally:
        dave.close()
    again = Labeler(site["url"], site["tokens"]["dave"])  # Starlette closes the connection after a 500: a new one
    try:
        assert again.next()["pair_id"]  # and the server goes on
    finally:
        again.close()


def test_bad_input_is_a_4xx_in_the_error_shape(site):
    bob = Labeler(site["url"], site["tokens"]["bob"])
    try:
        shown = bob.next()
        ok = {"pair_id": shown["pair_id"], "side": "left", "idempotency_key": str(uuid.uuid4())}
        cases = [
            (b"{not json", 400, "bad_json"), (b"[1, 2]", 400, "bad_json"), (b"", 400, "bad_json"),
            (b"\xff\xfe", 400, "bad_json"), (b"[" * 100000 + b"]" * 100000, 413, "body_too_large"),
            (json.dumps({**ok, "pair_id": str(shown["pair_id"])}).encode(), 400, "bad_field"),
            (json.dumps({**ok, "pair_id": True}).encode(), 400, "bad_field"),
            (json.dumps({**ok, "pair_id": 1.5}).encode(), 400, "bad_field"),
            (json.dumps({**ok, "pair_id": 10 ** 30}).encode(), 400, "bad_field"),
            (json.dumps({**ok, "side": "a"}).encode(), 400, "bad_field"),
            (json.dumps({**ok, "side": None}).encode(), 400, "bad_field"),
            (json.dumps({k: v for k, v in ok.items() if k != "idempotency_key"}).encode(), 400, "bad_field"),
            (json.dumps({**ok, "idempotency_key": "short"}).encode(), 400, "bad_field"),
            (json.dumps({**ok, "comment": "x" * 5000}).encode(), 400, "bad_field"),
            (json.dumps({**ok, "comment": "nul \u0000 byte"}).encode(), 400, "bad_field"),
            (b'{"pair_id": %d, "side": "left", "idempotency_key": "abcdefgh12", "comment": "\\ud800"}' % shown["pair_id"], 400, "bad_field"),
        ]
        for raw, status, code in cases:
            r = bob.post("/api/answer", content=raw, headers={"Content-Type": "application/json"})
            assert r.status_code == status and error_of(r)["code"] == code, (raw[:80], r.status_code, r.text[:200])
        assert bob.post("/api/login", content=b'{"token": 5}').status_code == 400
        r = bob.post("/api/answer", content=json.dumps(ok).encode(), headers={"Content-Type": "text/plain"})  # a form's kind
        assert r.status_code == 415 and error_of(r)["code"] == "bad_content_type"  # as from `nextbit serve` (web/api.py)
        r = bob.http.get("/api/nowhere")
        assert r.status_code == 404 and error_of(r)["code"] == "no_route"
        r = bob.http.delete("/api/answer")
        assert r.status_code == 405 and error_of(r)["code"] == "method_not_allowed"
        assert not any(lab.pair_id == shown["pair_id"] for lab in labels_by(site["db"], "bob"))
    finally:
        bob.close()


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
                           lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=8), kids, max_size=3),
                           max_leaves=8)
answer_like = st.fixed_dictionaries({}, optional={"pair_id": st.integers(-3, 40) | json_values,
                                                  "side": st.sampled_from(["left", "right", "tie", "cant_tell", "A", ""]) | json_values,
                                                  "idempotency_key": st.text(min_size=0, max_size=140) | json_values,
                                                  "comment": st.text(max_size=50) | json_values})


@pytest.fixture(scope="module")
def fuzzer(site):
    me = Labeler(site["url"], site["tokens"]["dave"])
    me.next()  # holds a pair, so some fuzzed answers are stored
    yield me
    me.close()


@settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
@given(path=st.sampled_from(["/api/answer", "/api/login", "/api/undo"]), body=answer_like | json_values)
def test_fuzzed_bodies_never_get_a_5xx(fuzzer, path, body):
    r = fuzzer.post(path, json=body)
    assert r.status_code < 500, (path, body, r.text)
    if r.status_code >= 400:
        error_of(r)


# ---- 16 labelers at once ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pg_url():
    from pg import shared_postgres

    return shared_postgres()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_16_concurrent_labelers_lose_and_double_nothing(backend, tmp_path, request):
    n_labelers, n_pairs, overlap = 16, 24, 2
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'labels.db'}"
    else:
        from pg import fresh_database

        url = fresh_database(request.getfixturevalue("pg_url"), "label_app_concurrent")
    db = open_db(url)
    tokens = [store.add_user(db, f"labeler{i:02d}") for i in range(n_labelers)]
    store.import_pairs(db, make_pairs(n_pairs, "busy"), source="test")
    db.close()
    with live(LabelServeConfig(db=url, overlap=overlap, timeout=600)) as (base, state):
        start = threading.Barrier(n_labelers)

        def work(i: int) -> list[tuple[str, int, int, bool]]:
            me = Labeler(base, tokens[i])
            done = []
            try:
                start.wait()
                while (shown := me.next())["pair_id"] is not None:
                    key = f"k-{i}-{shown['pair_id']}-{uuid.uuid4().hex[:8]}"
                    r = me.answer(shown["pair_id"], ("left", "right", "tie")[len(done) % 3], key)
                    assert r.status_code == 200, r.text
                    done.append((key, shown["pair_id"], r.json()["label_id"], r.json()["created"]))
                    if len(done) % 2:  # a retry, as after a lost response: the same key stores nothing more
                        again = me.answer(shown["pair_id"], "left", key)
                        assert again.status_code == 200 and again.json()["label_id"] == done[-1][2]
                        assert again.json()["created"] is False
            finally:
                me.close()
            return done

        with ThreadPoolExecutor(n_labelers) as pool:
            results = list(pool.map(work, range(n_labelers)))
        stored = store.all_labels(state.db)
        acked = {key: (pid, lid, i) for i, rows in enumerate(results) for key, pid, lid, created in rows}
        assert all(created for rows in results for *_, created in rows)
        assert len(stored) == len(acked) == n_pairs * overlap  # every pair reached its overlap, nothing more
        assert {lab.idempotency_key: (lab.pair_id, lab.id) for lab in stored} == {k: v[:2] for k, v in acked.items()}
        assert len({(lab.user_id, lab.pair_id) for lab in stored}) == len(stored)
        assert Counter(lab.pair_id for lab in stored) == {p.id: overlap for p in store.pairs(state.db)}
        with state.db.session() as conn:  # no pair was ever handed to more than `overlap` labelers
            shown = conn.execute(sa.select(assignments.c.pair_id, sa.func.count()).group_by(assignments.c.pair_id)).all()
        assert max(n for _, n in shown) == overlap


# ---- kill -9 ------------------------------------------------------------------------------------------------------
class Process:
    """`nextbit label serve ...` as a child process on port 0; .url once it has printed it."""

    def __init__(self, *args):
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
        self.p = subprocess.Popen([sys.executable, "-m", "nextbit", "label", "serve", "--port", "0", *map(str, args)],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        for line in self.p.stdout:
            self.lines.append(line)
            if "labeling page" in line:
                self.url = line.split()[-1].rstrip("/")
                break
        else:
            raise AssertionError(f"label serve did not start: {''.join(self.lines)} {self.p.stderr.read()}")


def test_kill_9_loses_nothing_acknowledged_and_stores_nothing_unsent(tmp_path):
    url = f"sqlite:///{tmp_path / 'labels.db'}"
    db = open_db(url)
    tokens = [store.add_user(db, f"worker{i}") for i in range(4)]
    store.import_pairs(db, make_pairs(400, "crash"), source="test")
    db.close()

    server = Process("--db", url, "--overlap", "1")
    sent: dict[str, dict] = {}  # idempotency key -> the answer, recorded before it is sent
    lock = threading.Lock()
    stop = threading.Event()
    errors: list[str] = []  # anything but the connection going away (a 5xx, a refused answer) fails the test
    sessions = [Labeler(server.url, t) for t in tokens]

    def work(me: Labeler) -> None:
        try:
            while not stop.is_set():
                shown = me.next()
                key = str(uuid.uuid4())
                with lock:
                    sent[key] = {"user": me.me["name"], "pair_id": shown["pair_id"], "side": "left", "acked": False}
                r = me.answer(shown["pair_id"], "left", key)
                assert r.status_code == 200, r.text
                with lock:
                    sent[key]["acked"] = True
        except httpx.TransportError:
            pass  # the server is gone
        except Exception as e:  # noqa: BLE001 - reported below, from the test's thread
            errors.append(repr(e))

    threads = [threading.Thread(target=work, args=(s,)) for s in sessions]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while sum(a["acked"] for a in list(sent.values())) < 24 and time.monotonic() < deadline:
        time.sleep(0.01)
    server.p.send_signal(signal.SIGKILL)
    server.p.wait(10)
    stop.set()
    for t in threads:
        t.join(30)
    assert server.p.returncode == -signal.SIGKILL
    assert not errors, errors[:3]

    acked = {k for k, a in sent.items() if a["acked"]}
    assert len(acked) >= 24

    def check_stored(must: set[str]) -> set[str]:
        db = open_db(url, create=False)
        try:
            stored = store.all_labels(db)
        finally:
            db.close()
        keys = Counter(lab.idempotency_key for lab in stored)
        assert all(keys[k] == 1 for k in must), "an acknowledged answer is missing or doubled"
        assert set(keys) <= set(sent), "a label was stored that was never sent"
        assert max(keys.values()) == 1
        for lab in stored:
            a = sent[lab.idempotency_key]
            assert (lab.user_name, lab.pair_id) == (a["user"], a["pair_id"])
        return set(keys)

    check_stored(acked)

    # Restart on the same database: the sessions (kept in it) still work; resend what was never acknowledged.
    server = Process("--db", url, "--overlap", "1")
    try:
        for s in sessions:
            s.http.base_url = server.url
        by_user = {s.me["name"]: s for s in sessions}
        for key, a in sent.items():
            if not a["acked"]:
                r = by_user[a["user"]].answer(a["pair_id"], a["side"], key)
                assert r.status_code == 200, r.text
        assert check_stored(set(sent)) == set(sent)
        # Ctrl-C stops it cleanly
        server.p.send_signal(signal.SIGINT)
        _, err = server.p.communicate(timeout=20)
        assert server.p.returncode in (0, 130) and "Traceback" not in err and "nextbit label serve: stopped" in err, err
    finally:
        for s in sessions:
            s.close()
        if server.p.poll() is None:
            server.p.kill()


# ---- the reward model on the admin page, and the disagreement refresher -------------------------------------------
def test_admin_stats_show_agreement_with_the_reward_model(tmp_path, tokenizer):
    import torch

    from nextbit.align.reward import HEAD, score_texts
    from nextbit.core.checkpoint import save_checkpoint

    model = peaky_model(seq_len=64)
    head = model.add_scalar_head(HEAD)
    torch.manual_seed(1)
    head.weight.data.normal_(0, 1.0)
    rm = tmp_path / "rm"
    save_checkpoint(rm, model, tokenizer, meta={"kind": "reward_model", "pool": "last", "normalized": False})

    url = f"sqlite:///{tmp_path / 'labels.db'}"
    db = open_db(url)
    root, ann = store.add_user(db, "root", admin=True), store.add_user(db, "ann")
    store.import_pairs(db, make_pairs(6, "rm"), source="test")
    db.close()
    with live(LabelServeConfig(db=url, reward=str(rm))) as (base, state):
        me = Labeler(base, ann)
        try:
            for i in range(6):
                shown = me.next()
                assert me.answer(shown["pair_id"], ("left", "right")[i % 2]).status_code == 200
        finally:
            me.close()
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {root}"}) as admin:
            stats = admin.get("/api/admin/stats").json()
            assert stats["settings"]["reward"] == str(rm)
            assert admin.get("/api/admin/stats").status_code == 200  # the second call scores nothing new
        pairs = {p.id: p for p in store.pairs(state.db)}
        probs = state.reward.cache
        assert set(probs) == set(pairs)
        ps = [pairs[i] for i in sorted(pairs)]
        r_a = score_texts(model, tokenizer, [p.prompt for p in ps], [p.a for p in ps])
        r_b = score_texts(model, tokenizer, [p.prompt for p in ps], [p.b for p in ps])
        for p, ra, rb in zip(ps, r_a.tolist(), r_b.tolist()):
            assert probs[p.id] == pytest.approx(1 / (1 + math.exp(-(ra - rb))), abs=1e-5)
        labs = store.all_labels(state.db)
        agree = sum((lab.choice == "a") == (probs[lab.pair_id] > 0.5) for lab in labs) / len(labs)
        [ann_stats] = [s for s in stats["labelers"] if s["name"] == "ann"]
        assert ann_stats["count"] == 6
        assert ann_stats["reward"] == {"n": 6, "percent": pytest.approx(agree, abs=1e-4)}


def test_the_refresher_runs_every_n_labels_one_run_at_a_time():
    calls, gate = [], threading.Event()

    def fn():
        calls.append(time.monotonic())
        gate.wait(5)

    r = Refresher(fn, every=3)
    r.labelled(2)
    assert r.thread is None
    r.labelled()
    wait = time.monotonic() + 5
    while not calls and time.monotonic() < wait:
        time.sleep(0.005)
    assert len(calls) == 1 and r.running
    r.labelled(5)  # while a run is under way: counted toward the next, no second thread
    assert len(calls) == 1
    gate.set()
    r.join(5)
    assert r.runs == 1 and not r.running
    r.labelled(1)  # 5 + 1 pending since: due again at once
    r.join(5)
    assert len(calls) == 2

    def boom():
        raise RuntimeError("no backbone")

    bad = Refresher(boom, every=1)
    bad.labelled()
    bad.join(5)
    assert bad.last_error == "RuntimeError: no backbone" and bad.runs == 1


def test_bad_settings_are_one_line_naming_the_flag(tmp_path):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    for kw, msg in [({"overlap": 0}, "--overlap must be >= 1"), ({"timeout": 0}, "--timeout must be > 0"),
                    ({"select": "best"}, "--select must be one of random, disagreement"),
                    ({"select": "disagreement"}, "--select disagreement needs --backbone"),
                    ({"select": "disagreement", "backbone": str(tmp_path / "none")}, "--backbone: checkpoint not found"),
                    ({"reward": str(tmp_path / "none")}, "--reward: checkpoint not found"),
                    ({"port": 70000}, "--port must be in")]:
        with pytest.raises(NextbitError, match="^" + msg):
            label_serve(LabelServeConfig(db=url, **{"port": 0, **kw}))
        assert not (tmp_path / "x.db").exists(), kw  # refused before the database is made


def test_disagreement_selection_reranks_the_queue_every_n_labels(tmp_path, tokenizer):
    from nextbit.core.checkpoint import save_checkpoint

    backbone = save_checkpoint(tmp_path / "base", peaky_model(seq_len=64), tokenizer)
    url = f"sqlite:///{tmp_path / 'labels.db'}"
    db = open_db(url)
    ann, ben = store.add_user(db, "ann"), store.add_user(db, "ben")
    store.import_pairs(db, make_pairs(16, "rank"), source="test")
    db.close()
    cfg = LabelServeConfig(db=url, select="disagreement", backbone=str(backbone), refresh_every=10, members=3)
    with live(cfg) as (base, state):
        r = state.refresher
        r.join(30)  # the start-up run: no labels yet, nothing re-ranked
        assert (r.runs, r.last_error) == (1, None)
        assert {p.priority for p in store.pairs(state.db)} == {0.0}
        me = Labeler(base, ann)
        try:
            for i in range(10):
                shown = me.next()
                assert me.answer(shown["pair_id"], ("left", "right")[i % 2]).status_code == 200
        finally:
            me.close()
        deadline = time.monotonic() + 60
        while r.runs < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert (r.runs, r.last_error) == (2, None)
        prios = {p.id: p.priority for p in store.pairs(state.db)}
        assert len(set(prios.values())) > 1 and min(prios.values()) >= 0
        labelled = {lab.pair_id for lab in store.all_labels(state.db)}
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {ben}"}) as c:
            first = c.get("/api/next").json()["pair_id"]
        assert first == min((p for p in prios if p not in labelled), key=lambda p: (-prios[p], p))


def test_a_pair_shown_but_not_answered_goes_back_after_the_timeout(tmp_path):
    url = f"sqlite:///{tmp_path / 'labels.db'}"
    db = open_db(url)
    tokens = [store.add_user(db, n) for n in ("slow", "quick")]
    store.import_pairs(db, make_pairs(1, "timeout"), source="test")
    db.close()
    with live(LabelServeConfig(db=url, overlap=1, timeout=0.5)) as (base, state):
        slow, quick = Labeler(base, tokens[0]), Labeler(base, tokens[1])
        try:
            held = slow.next()["pair_id"]
            assert held is not None and quick.next()["pair_id"] is None  # taken while slow holds it
            time.sleep(0.6)
            assert quick.next()["pair_id"] == held
            assert quick.answer(held, "left").status_code == 200
            r = slow.answer(held, "left")
            assert r.status_code == 409 and error_of(r)["code"] == "expired"
        finally:
            slow.close()
            quick.close()
