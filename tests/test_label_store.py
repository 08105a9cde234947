"""The labels database and store (nextbit/label/db.py, store.py) on SQLite and on a real PostgreSQL server.

Every store test runs on both backends (`db` is parametrized); the PostgreSQL server is started once for the whole
test run (tests/pg.py) and each test gets a fresh, empty schema on it (as good as a database of its own).
"""

from __future__ import annotations

import hashlib
import itertools
import sqlite3
import threading
from collections import Counter

import pytest
from sqlalchemy import func, select, text, update

from nextbit.align.reward import read_preferences
from nextbit.core.errors import NextbitError
from nextbit.label import agreement, export, store
from nextbit.label.db import SCHEMA_VERSION, labels, open_db, pairs as pairs_t, schema_of, schema_version, users
from nextbit.label.store import LabelError

from pg import fresh_schema, shared_postgres

_n = itertools.count()
T0 = 1_800_000_000.0  # a fixed clock for the tests that step time


@pytest.fixture(scope="session")
def pg_url():
    return shared_postgres()


def new_url(backend: str, tmp_path, request) -> str:
    if backend == "sqlite":
        return f"sqlite:///{tmp_path}/labels-{next(_n)}.db"
    return fresh_schema(request.getfixturevalue("pg_url"), f"t{next(_n)}")


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request):
    return request.param


@pytest.fixture
def url(backend, tmp_path, request):
    return new_url(backend, tmp_path, request)


@pytest.fixture
def db(url):
    d = open_db(url)
    yield d
    d.close()


def some_pairs(n: int) -> list[dict]:
    return [{"prompt": f"prompt {i}", "a": f"answer a{i}", "b": f"answer b{i}"} for i in range(n)]


# ---- users and sessions -------------------------------------------------------------------------------------------
def test_tokens_are_stored_only_as_hashes_and_names_are_unique(db):
    token = store.add_user(db, "ann", admin=True)
    store.add_user(db, "bob")
    with db.session() as conn:
        stored = conn.execute(select(users.c.token_hash).where(users.c.name == "ann")).scalar_one()
    assert stored == hashlib.sha256(token.encode()).hexdigest() and token not in stored
    ann = store.user_for_token(db, token)
    assert ann is not None and (ann.name, ann.is_admin) == ("ann", True)
    assert store.user_for_token(db, token + "x") is None and store.user_for_token(db, "") is None
    with pytest.raises(NextbitError, match="already exists"):
        store.add_user(db, "ann")
    with pytest.raises(NextbitError, match="non-empty"):
        store.add_user(db, "  ")
    assert [u.name for u in store.list_users(db)] == ["ann", "bob"]


def test_sessions_expire_and_carry_a_csrf_token(db):
    store.add_user(db, "ann")
    uid = store.list_users(db)[0].id
    sid, csrf = store.create_session(db, uid, ttl_s=60, now=T0)
    user, csrf2 = store.session_user(db, sid, now=T0 + 59)
    assert user.name == "ann" and csrf2 == csrf and store.csrf_ok(sid, csrf)
    assert not store.csrf_ok(sid, csrf[:-1] + ("0" if csrf[-1] != "0" else "1")) and not store.csrf_ok(sid, None)
    assert store.session_user(db, sid, now=T0 + 60) is None  # expired
    assert store.session_user(db, "not-a-session") is None
    sid2, _ = store.create_session(db, uid, now=T0)
    store.delete_session(db, sid2)
    assert store.session_user(db, sid2, now=T0) is None
    with db.session() as conn:  # the session id itself is nowhere in the database
        assert conn.execute(text("SELECT count(*) FROM sessions WHERE id_hash = :s"), {"s": sid}).scalar_one() == 0


def test_reset_token_replaces_the_token_and_ends_only_that_users_sessions(db):
    ann, bob = store.add_user(db, "ann"), store.add_user(db, "bob")
    user, sid, csrf = store.login(db, ann, ttl_s=60)
    assert user.name == "ann" and store.session_user(db, sid)[0].name == "ann" and store.csrf_ok(sid, csrf)
    _, bob_sid, _ = store.login(db, bob)
    assert store.login(db, ann + "x") is None and store.login(db, "") is None
    new = store.reset_token(db, " ann ")
    assert new != ann and store.user_for_token(db, ann) is None and store.login(db, ann) is None
    assert store.session_user(db, sid) is None and store.session_user(db, bob_sid)[0].name == "bob"
    assert store.login(db, new)[0].name == "ann" and store.user_for_token(db, bob).name == "bob"
    with pytest.raises(NextbitError, match="^NAME: no user named 'cy'"):
        store.reset_token(db, "cy")
    store.import_pairs(db, some_pairs(2))
    uid = store.user_for_token(db, new).id
    for k in range(2):
        store.answer(db, uid, store.next_pair(db, uid, overlap=1, timeout_s=60).pair_id, "tie", idempotency_key=str(k))
    assert [(u.name, u.is_admin, u.labels) for u in store.user_summaries(db)] == [("ann", False, 2), ("bob", False, 0)]


# ---- pairs --------------------------------------------------------------------------------------------------------
def test_import_skips_duplicates_and_keeps_meta(db):
    recs = some_pairs(3) + [some_pairs(1)[0]]
    recs.append({"prompt": [{"role": "user", "content": "hi"}], "a": "x", "b": "y", "origin": "compare", "seed": 3})
    assert store.import_pairs(db, recs, source="f.jsonl") == (4, 1)
    assert store.import_pairs(db, some_pairs(4), source="g.jsonl") == (1, 3)
    ps = store.pairs(db)
    assert len(ps) == 5
    chat = [p for p in ps if isinstance(p.prompt, list)][0]
    assert chat.prompt == [{"role": "user", "content": "hi"}] and chat.meta == {"origin": "compare", "seed": 3}
    assert chat.source == "f.jsonl" and chat.priority == 0.0
    with pytest.raises(NextbitError, match="pair 2: a pair needs string fields"):
        store.import_pairs(db, [some_pairs(1)[0], {"prompt": "p", "a": 1, "b": "x"}], source="")
    assert len(store.pairs(db)) == 5  # all or nothing
    # text neither backend can hold the same way is refused up front, naming the pair (PostgreSQL refuses NUL)
    for bad, says in [({"a": "x\x00y"}, "pair 2: 'a' holds a NUL"), ({"b": "\ud800"}, "pair 2: 'b' is not valid UTF-8"),
                      ({"prompt": [{"role": "user", "content": "\x00"}]}, "pair 2: 'prompt' holds a NUL")]:
        with pytest.raises(NextbitError, match=says):
            store.import_pairs(db, [some_pairs(9)[8], {"prompt": "p", "a": "x", "b": "y", **bad}], source="")
    assert len(store.pairs(db)) == 5
    assert store.import_pairs(db, [{"prompt": "p", "a": "x", "b": "y", "note": "\ud800\x00"}], source="") == (1, 0)
    assert store.pairs(db)[-1].meta == {"note": "\ud800\x00"}  # other fields are kept whatever they hold


# ---- the queue ----------------------------------------------------------------------------------------------------
def users_of(db, *names):
    for n in names:
        store.add_user(db, n)
    return [u.id for u in store.list_users(db)]


def test_overlap_reload_and_timeout(db):
    store.import_pairs(db, some_pairs(1), source="")
    u1, u2, u3 = users_of(db, "u1", "u2", "u3")
    s1 = store.next_pair(db, u1, overlap=2, timeout_s=100, now=T0)
    assert s1 is not None
    again = store.next_pair(db, u1, overlap=2, timeout_s=100, now=T0 + 50)  # a reload: the same pair, same order
    assert (again.pair_id, again.left, again.right, again.expires_at) == (s1.pair_id, s1.left, s1.right, T0 + 100)
    assert store.next_pair(db, u2, overlap=2, timeout_s=100, now=T0 + 1) is not None
    assert store.next_pair(db, u3, overlap=2, timeout_s=100, now=T0 + 2) is None  # two labelers hold it
    assert store.progress(db, u3, overlap=2, now=T0 + 2)["left"] == 0
    s3 = store.next_pair(db, u3, overlap=2, timeout_s=100, now=T0 + 100)  # u1's assignment expired: back in the queue
    assert s3 is not None and s3.pair_id == s1.pair_id
    # u1 comes back late: u3 was given the pair after u1's assignment expired, so u1's answer no longer counts
    with pytest.raises(LabelError) as e:
        store.answer(db, u1, s1.pair_id, "left", idempotency_key="k1", now=T0 + 120)
    assert e.value.code == "expired"
    store.answer(db, u2, s1.pair_id, "tie", idempotency_key="k2", now=T0 + 120)
    store.answer(db, u3, s1.pair_id, "right", idempotency_key="k3", now=T0 + 120)
    assert store.next_pair(db, u1, overlap=2, timeout_s=100, now=T0 + 500) is None  # two labels: the pair is done
    assert sorted(l.choice for l in store.all_labels(db)) == sorted(["tie", "a" if not s3.left_is_a else "b"])


def test_a_late_answer_counts_when_no_one_else_took_the_pair(db):
    store.import_pairs(db, some_pairs(1), source="")
    (u1,) = users_of(db, "u1")
    s = store.next_pair(db, u1, overlap=1, timeout_s=10, now=T0)
    lab, created = store.answer(db, u1, s.pair_id, "left", idempotency_key="k", now=T0 + 1000)
    assert created and lab.choice == ("a" if s.left_is_a else "b")


def test_answers_map_sides_to_a_b_and_are_idempotent(db):
    store.import_pairs(db, some_pairs(12), source="")
    (u,) = users_of(db, "ann")
    seen_orders = set()
    for i in range(12):
        s = store.next_pair(db, u, overlap=1, timeout_s=600, now=T0 + i)
        p = {q.id: q for q in store.pairs(db)}[s.pair_id]
        assert (s.left, s.right) == ((p.a, p.b) if s.left_is_a else (p.b, p.a))
        seen_orders.add(s.left_is_a)
        side = ["left", "right", "tie", "cant_tell"][i % 4]
        lab, created = store.answer(db, u, s.pair_id, side, idempotency_key=f"key{i}", comment=f"c{i}", now=T0 + i)
        want = {"left": "a" if s.left_is_a else "b", "right": "b" if s.left_is_a else "a"}.get(side, side)
        assert created and lab.choice == want and lab.left_is_a == s.left_is_a and lab.user_name == "ann"
        again, created2 = store.answer(db, u, s.pair_id, side, idempotency_key=f"key{i}", now=T0 + i + 1)  # a retry
        assert not created2 and again.id == lab.id and again.comment == f"c{i}"
        with pytest.raises(LabelError) as e:
            store.answer(db, u, s.pair_id, "left", idempotency_key=f"other{i}", now=T0 + i)
        assert e.value.code == "already_answered"
    assert seen_orders == {True, False}  # the left/right order varies
    assert store.next_pair(db, u, overlap=1, timeout_s=600, now=T0 + 20) is None
    assert len(store.labels_of(db, u)) == 12 and store.progress(db, u, overlap=1, now=T0 + 20)["done_total"] == 12
    codes = {}
    for args, kw in [((u, 1, "up"), {"idempotency_key": "z"}), ((u, 10**6, "left"), {"idempotency_key": "z"}),
                     ((u, 1, "left"), {"idempotency_key": "key5"}), ((u, 1, "left"), {"idempotency_key": ""})]:
        with pytest.raises(LabelError) as e:
            store.answer(db, *args, **kw)
        codes[e.value.code] = True
    assert list(codes) == ["bad_side", "unknown_pair", "key_reused", "bad_key"]
    for far in (2**31, -(2**31) - 1, 2**62):  # past PostgreSQL's 32-bit INTEGER: still an unknown pair, not a DataError
        with pytest.raises(LabelError) as e:
            store.answer(db, u, far, "left", idempotency_key=f"far{far}")
        assert e.value.code == "unknown_pair"


def test_not_assigned_undo_and_progress(db):
    store.import_pairs(db, some_pairs(3), source="")
    u, v = users_of(db, "ann", "bob")
    s = store.next_pair(db, u, overlap=2, timeout_s=60, now=T0)
    with pytest.raises(LabelError) as e:
        store.answer(db, v, s.pair_id, "left", idempotency_key="x", now=T0)
    assert e.value.code == "not_assigned"
    assert store.undo_last(db, u) is None
    store.answer(db, u, s.pair_id, "left", idempotency_key="a1", now=T0 + 1)
    s2 = store.next_pair(db, u, overlap=2, timeout_s=60, now=T0 + 2)
    store.answer(db, u, s2.pair_id, "right", idempotency_key="a2", now=T0 + 3)
    assert store.progress(db, u, overlap=2, now=T0 + 3) == {"done_today": 2, "done_total": 2, "left": 1}
    assert store.progress(db, u, overlap=2, now=T0 + 86400 * 2) == {"done_today": 0, "done_total": 2, "left": 1}
    assert store.undo_last(db, u, timeout_s=60, now=T0 + 10) == s2.pair_id
    back = store.next_pair(db, u, overlap=2, timeout_s=60, now=T0 + 11)  # the undone pair, in the same order
    assert (back.pair_id, back.left_is_a, back.expires_at) == (s2.pair_id, s2.left_is_a, T0 + 70)
    lab, created = store.answer(db, u, s2.pair_id, "left", idempotency_key="a3", now=T0 + 12)
    assert created and [l.idempotency_key for l in store.labels_of(db, u)] == ["a1", "a3"]
    assert store.labels_of(db, v) == []


def test_selection_orders(db):
    store.import_pairs(db, some_pairs(8), source="")
    u, v = users_of(db, "ann", "bob")
    ids = [p.id for p in store.pairs(db)]
    assert store.set_priorities(db, {ids[5]: 3.0, ids[2]: 7.5, ids[6]: 3.0}) == 3
    order = []
    for i in range(4):
        s = store.next_pair(db, u, overlap=2, timeout_s=60, select="disagreement", now=T0)
        order.append(s.pair_id)
        store.answer(db, u, s.pair_id, "tie", idempotency_key=str(i), now=T0)
    assert order == [ids[2], ids[5], ids[6], ids[0]]
    # random: a per-labeler shuffle, reproducible for a seed, different between labelers and seeds
    def first(uid, seed, now):
        return store.next_pair(db, uid, overlap=8, timeout_s=1, seed=seed, now=now).pair_id
    picks = {(uid, seed): first(uid, seed, T0 + 10 * k) for k, (uid, seed) in enumerate([(v, 0), (v, 1), (v, 2), (v, 3)])}
    assert first(v, 0, T0 + 100) == picks[(v, 0)]
    assert len(set(picks.values())) > 1
    with pytest.raises(NextbitError, match="--select"):
        store.next_pair(db, u, overlap=1, timeout_s=1, select="best")


# ---- concurrency: 16 labelers at once -----------------------------------------------------------------------------
def test_sixteen_concurrent_labelers_never_exceed_the_overlap(db):
    n_pairs, overlap, n_users = 12, 3, 16
    store.import_pairs(db, some_pairs(n_pairs), source="")
    uids = users_of(db, *[f"u{i}" for i in range(n_users)])
    acked, errors = [], []
    barrier = threading.Barrier(n_users)

    def labeler(uid):
        try:
            barrier.wait()
            k = 0
            while True:
                s = store.next_pair(db, uid, overlap=overlap, timeout_s=600)
                if s is None:
                    return
                key = f"{uid}-{k}"
                lab, created = store.answer(db, uid, s.pair_id, ["left", "right", "tie"][k % 3], idempotency_key=key)
                again, created2 = store.answer(db, uid, s.pair_id, "left", idempotency_key=key)  # a client's retry
                assert created and not created2 and again.id == lab.id
                acked.append((uid, s.pair_id, lab.id))
                k += 1
        except Exception as e:  # reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=labeler, args=(u,)) for u in uids]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors[:3]
    stored = store.all_labels(db)
    per_pair = Counter(l.pair_id for l in stored)
    assert len(per_pair) == n_pairs and set(per_pair.values()) == {overlap}  # every pair went to exactly k labelers
    assert sorted((l.user_id, l.pair_id, l.id) for l in stored) == sorted(acked)  # every acknowledged answer, once
    assert len({(l.user_id, l.pair_id) for l in stored}) == len(stored)


# ---- schema versions and refusals ---------------------------------------------------------------------------------
def test_a_newer_or_foreign_database_is_refused(backend, tmp_path, request):
    url = new_url(backend, tmp_path, request)
    with open_db(url) as d:
        assert schema_of(d) == SCHEMA_VERSION
        with d.session() as conn:
            conn.execute(update(schema_version).values(version=SCHEMA_VERSION + 1))
    with pytest.raises(NextbitError, match=r"written by a newer nextbit .*upgrade nextbit$"):
        open_db(url)
    other = new_url(backend, tmp_path, request)
    with open_db(other) as d:  # a database holding someone else's tables
        with d.session() as conn:
            for t in ("labels", "assignments", "sessions", "pairs", "users", "schema_version"):
                conn.execute(text(f"DROP TABLE {t}"))
            conn.execute(text("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total FLOAT)"))
    with pytest.raises(NextbitError, match="is not a nextbit labels database .*give --db a new file or database"):
        open_db(other)
    with pytest.raises(NextbitError, match="empty database|no labels database at"):
        open_db(new_url(backend, tmp_path, request), create=False)


def test_a_version_1_database_is_upgraded(backend, tmp_path, request):
    url = new_url(backend, tmp_path, request)
    with open_db(url) as d:
        store.add_user(d, "ann")
        store.import_pairs(d, some_pairs(2), source="old")
        with d.session() as conn:  # make it what version 1 wrote: no pairs.priority
            conn.execute(text("DROP INDEX ix_pairs_priority"))
            conn.execute(text("ALTER TABLE pairs DROP COLUMN priority"))
            conn.execute(update(schema_version).values(version=1))
    with open_db(url) as d:
        assert schema_of(d) == SCHEMA_VERSION
        assert [(p.source, p.priority) for p in store.pairs(d)] == [("old", 0.0), ("old", 0.0)]
        ids = [p.id for p in store.pairs(d)]
        store.set_priorities(d, {ids[1]: 1.0})
        uid = store.list_users(d)[0].id
        assert store.next_pair(d, uid, overlap=1, timeout_s=9, select="disagreement").pair_id == ids[1]


def test_sqlite_settings_and_files_that_are_not_labels_databases(tmp_path):
    with open_db(f"sqlite:///{tmp_path}/l.db") as d:
        with d.session() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    (tmp_path / "notes.txt").write_text("not a database at all\n" * 200)
    with pytest.raises(NextbitError, match=r"not a nextbit labels database \(the file is not SQLite\)"):
        open_db(f"sqlite:///{tmp_path}/notes.txt")
    sqlite3.connect(tmp_path / "other.db").execute("CREATE TABLE t (x)").connection.commit()
    with pytest.raises(NextbitError, match="not a nextbit labels database"):
        open_db(f"sqlite:///{tmp_path}/other.db")
    with pytest.raises(NextbitError, match="no labels database at"):
        open_db(f"sqlite:///{tmp_path}/missing.db", create=False)
    for bad, msg in [("nonsense", "not a database URL"), ("mysql://u@h/db", "only sqlite:/// and postgresql"),
                     (f"sqlite:///{tmp_path}/no/such/dir/l.db", "does not exist"), ("sqlite://", "in-memory")]:
        with pytest.raises(NextbitError, match=msg):
            open_db(bad)


# ---- agreement ----------------------------------------------------------------------------------------------------
def test_agreement_measures_match_textbook_values():
    # Cohen's kappa, the 2x2 example of Wikipedia's article: 20 yes/yes, 5 yes/no, 10 no/yes, 15 no/no -> 0.4
    x = ["a"] * 25 + ["b"] * 25
    y = ["a"] * 20 + ["b"] * 5 + ["a"] * 10 + ["b"] * 15
    assert agreement.percent_agreement(x, y) == pytest.approx(0.7)
    assert agreement.cohen_kappa(x, y) == pytest.approx(0.4)
    # by hand, three categories: p_o = 5/6, p_e = (3*2 + 2*3 + 1*1)/36 = 13/36 -> (30/36 - 13/36)/(23/36) = 17/23
    assert agreement.cohen_kappa(list("aaabbt"), list("aabbbt")) == pytest.approx(17 / 23)
    assert agreement.cohen_kappa(list("aaaa"), list("aaaa")) != agreement.cohen_kappa(list("aaaa"), list("aaaa"))  # NaN
    # Krippendorff (2011), "Computing Krippendorff's alpha-reliability", the 4 observers x 12 units nominal example
    obs = ["1 2 3 3 2 1 4 1 2 . . .", "1 2 3 3 2 2 4 1 2 5 . 3", ". 3 3 3 2 3 4 2 2 5 1 .", "1 2 3 3 2 4 4 1 2 5 1 ."]
    rows = [o.split() for o in obs]
    units = {i: [r[i] for r in rows if r[i] != "."] for i in range(12)}
    assert agreement.krippendorff_alpha(units) == pytest.approx(0.743, abs=5e-4)
    assert agreement.krippendorff_alpha({1: ["a", "a"], 2: ["b", "b"], 3: ["a"]}) == pytest.approx(1.0)


def side_for(choice: str, left_is_a: bool) -> str:
    if choice == "a":
        return "left" if left_is_a else "right"
    if choice == "b":
        return "right" if left_is_a else "left"
    return choice


def cast(db, votes: dict[int, list[str]], names=("ann", "bob", "cy"), t0=T0, step=30.0):
    """Every user answers every pair: pair index i gets votes[i][k] from user k. Returns (user ids, pair ids)."""
    uids = users_of(db, *names)
    pids = [p.id for p in store.pairs(db)]
    t = t0
    for k, uid in enumerate(uids):
        while (s := store.next_pair(db, uid, overlap=len(names), timeout_s=600, now=t)) is not None:
            choice = votes[pids.index(s.pair_id)][k]
            store.answer(db, uid, s.pair_id, side_for(choice, s.left_is_a), idempotency_key=f"{uid}:{s.pair_id}", now=t)
            t += step
    return uids, pids


VOTES = {0: ["a", "a", "b"], 1: ["a", "b", "tie"], 2: ["b", "b", "cant_tell"], 3: ["tie", "tie", "a"],
         4: ["cant_tell"] * 3}


def test_labeler_stats(db):
    store.import_pairs(db, some_pairs(5), source="")
    uids, pids = cast(db, VOTES)
    st = agreement.labeler_stats(db, now=T0 + 15 * 30, reward_prob={pids[0]: 0.9, pids[1]: 0.2, pids[2]: 0.5})
    ann, bob, cy = st["labelers"]
    assert (ann["count"], ann["ties"], ann["cant_tell"], cy["cant_tell"]) == (5, 1, 1, 2)
    assert ann["rate_per_hour"] == pytest.approx(120.0) and ann["median_s"] == 30.0  # one answer every 30 s
    assert ann["today"] == 5 and ann["last_hour"] == 5
    # the reward model prefers a on pair 0, b on pair 1 and has no opinion on pair 2 (ties are left out)
    assert ann["reward"] == {"n": 2, "percent": 0.5} and bob["reward"] == {"n": 2, "percent": 1.0}
    pw = {(p["a"], p["b"]): p for p in st["pairwise"]}
    # ann and bob on pairs 0-3: a/a, a/b, b/b, tie/tie -> 3 of 4; kappa from their frequencies by hand
    x, y = ["a", "a", "b", "tie"], ["a", "b", "b", "tie"]
    assert pw[("ann", "bob")]["n"] == 4 and pw[("ann", "bob")]["percent"] == 0.75
    assert pw[("ann", "bob")]["kappa"] == pytest.approx(agreement.cohen_kappa(x, y), abs=1e-4)
    assert pw[("ann", "cy")]["n"] == 3  # cy's can't-tell on pair 2 is no answer
    units = {i: [v for v in VOTES[i] if v != "cant_tell"] for i in range(4)}
    assert st["alpha"] == pytest.approx(agreement.krippendorff_alpha(units), abs=1e-4) and st["alpha_units"] == 4


# ---- export -------------------------------------------------------------------------------------------------------
def test_export_is_read_by_reward_as_it_is_and_majority_follows_the_rule(db, tmp_path):
    recs = some_pairs(4) + [{"prompt": [{"role": "user", "content": "hi"}], "a": "hello", "b": "go away"}, some_pairs(6)[5]]
    store.import_pairs(db, recs, source="")
    cast(db, {**VOTES, 4: ["b", "b", "cant_tell"], 5: ["cant_tell"] * 3})
    out = tmp_path / "prefs.jsonl"
    assert export.export_preferences(db, out)["lines"] == 13  # every answer but the five can't-tells
    prefs, same = read_preferences(str(out))
    assert len(prefs) == 13 and same == 0 and sum(p.tie for p in prefs) == 3
    assert Counter(p.labeler for p in prefs) == {"ann": 5, "bob": 5, "cy": 3}
    assert all(isinstance(p.extra["timestamp"], float) and "pair_id" in p.extra for p in prefs)
    chat = [p for p in prefs if isinstance(p.prompt, list)]  # the chat pair: TRL's conversational form
    assert len(chat) == 2 and {(p.chosen, p.rejected) for p in chat} == {("go away", "hello")}
    by_pair = {r["pair_id"]: r for r in export.preference_records(db, aggregate="majority")}
    pids = [p.id for p in store.pairs(db)]
    got = {pids.index(pid): (r["chosen"], r["tie"], r["labeler"], r["votes"]) for pid, r in by_pair.items()}
    assert got[0] == ("answer a0", False, "majority:3", {"a": 2, "b": 1, "tie": 0})
    assert got[1] == ("answer a1", True, "majority:3", {"a": 1, "b": 1, "tie": 1})  # an even split is a tie
    assert got[2] == ("answer b2", False, "majority:2", {"a": 0, "b": 2, "tie": 0})
    assert got[3] == ("answer a3", True, "majority:3", {"a": 1, "b": 0, "tie": 2})  # ties outvote a
    assert set(got) == {0, 1, 2, 3, 4} and got[4][0] == [{"role": "assistant", "content": "go away"}]
    assert [export.majority(*v) for v in [(2, 2, 0), (2, 1, 2), (3, 1, 2), (0, 1, 0), (0, 0, 1)]] == ["tie", "tie", "a", "b", "tie"]
    agg = tmp_path / "agg.jsonl"
    export.export_preferences(db, agg, aggregate="majority")
    assert len(read_preferences(str(agg))[0]) == 5


def test_export_while_people_label_misses_nothing_it_read(db, monkeypatch):
    store.import_pairs(db, some_pairs(1), source="")
    (u,) = users_of(db, "ann")
    s = store.next_pair(db, u, overlap=1, timeout_s=60)
    store.answer(db, u, s.pair_id, "left", idempotency_key="k0")
    busy = []

    def meanwhile(read):  # a new pair is imported and labelled between export's two reads
        def wrapped(d):
            out = read(d)
            if not busy:
                busy.append(1)
                store.import_pairs(d, [{"prompt": "new", "a": "x", "b": "y"}], source="")
                s = store.next_pair(d, u, overlap=1, timeout_s=60)
                store.answer(d, u, s.pair_id, "right", idempotency_key="k1")
            return out
        return wrapped

    monkeypatch.setattr(export, "pairs", meanwhile(store.pairs))
    monkeypatch.setattr(export, "all_labels", meanwhile(store.all_labels))
    recs = export.preference_records(db)
    assert busy and [r["pair_id"] for r in recs] == [s.pair_id]  # the label read before, not the one after


# ---- SQLite: writers wait for each other; a transaction that lost a race is run again -------------------------------
def test_sqlite_writer_waits_for_a_held_write_lock(tmp_path):
    path = tmp_path / "l.db"
    with open_db(f"sqlite:///{path}") as d:
        other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock for a moment
        released = threading.Event()

        def release():
            released.wait(5)
            other.execute("COMMIT")

        t = threading.Thread(target=release)
        t.start()
        threading.Timer(0.3, released.set).start()
        store.add_user(d, "ann")  # waits (busy timeout) instead of failing with "database is locked"
        t.join()
        assert [u.name for u in store.list_users(d)] == ["ann"]


def test_transact_retries_only_lost_races(tmp_path):
    from sqlalchemy.exc import IntegrityError, OperationalError

    with open_db(f"sqlite:///{tmp_path}/l.db") as d:
        calls = []

        def flaky(conn):
            calls.append(1)
            if len(calls) < 3:
                raise OperationalError("INSERT ...", {}, sqlite3.OperationalError("database is locked"))
            return conn.execute(select(func.count()).select_from(users)).scalar_one()

        assert d.transact(flaky) == 0 and len(calls) == 3
        calls.clear()

        def broken(conn):
            calls.append(1)
            raise IntegrityError("INSERT ...", {}, sqlite3.IntegrityError("UNIQUE constraint failed"))

        with pytest.raises(IntegrityError):
            d.transact(broken)
        assert len(calls) == 1
