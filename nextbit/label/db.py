"""The labels database: its tables, its schema version, and how a connection is opened (SQLite or PostgreSQL).

    open_db(url) -> Database          .engine  .url (password hidden)  .session()  .transact(fn)  .close()

One SQLAlchemy 2 Core schema serves both backends:
    sqlite:///labels.db               the default; a file beside the app. Every connection is set to WAL journal
                                      mode, synchronous=FULL (a commit is on disk before it is acknowledged),
                                      foreign_keys=ON and a 30 s busy timeout. Every transaction starts with
                                      BEGIN IMMEDIATE (SQLite's write lock up front), so concurrent writers wait for
                                      each other instead of failing half-way with "database is locked".
    postgresql+psycopg://user:pw@host/db   (or ...?host=/socket/dir) for many labelers; `postgresql://` means the
                                      same. Transactions run at READ COMMITTED; store.py takes row locks
                                      (SELECT ... FOR UPDATE [SKIP LOCKED]) where two labelers could race.
`transact(fn)` runs fn(connection) in one transaction and runs it again (a few times, with a short random wait) when
the backend says the transaction lost a race: SQLite's "database is locked", PostgreSQL's serialization failure or
deadlock (a failure that comes after waiting out SQLite's busy timeout is reported, not retried). fn must therefore
only touch the database.

Times are UTC epoch seconds (floats) in every table, the same on both backends. Tokens and session ids are never
stored, only their sha256 (store.py).

Schema versions. The `schema_version` table holds one row (app, version). Opening a database
    - with no tables at all (or, for SQLite, no file): creates the current schema; with create=False it is refused
      as MissingDatabase, one line naming the URL and the commands that make one (`label import`, `label sample`,
      `label add-user`). This is the one rule of "the database is missing" (`label export`, `loop`, `label serve`);
    - of this app at an older version: upgrades it, one migration at a time, in the same transaction (all or nothing);
    - of this app at a newer version: refused ("written by a newer nextbit ... upgrade nextbit");
    - with tables but no nextbit schema_version (another program's database), or a file that is not a database:
      refused, with one line that says what to do.
History: version 1 had no pairs.priority; version 2 added it (the order `--select disagreement` shows pairs in).
The first open of a new database is serialized across processes (SQLite's write lock; a PostgreSQL advisory lock).
"""

from __future__ import annotations

import random
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional, TypeVar

from sqlalchemy import (Boolean, CheckConstraint, Column, Float, ForeignKey, Index, Integer, MetaData, String, Table,
                        Text, UniqueConstraint, create_engine, event, inspect, select, text)
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError, OperationalError

from nextbit.core.errors import NextbitError

APP = "nextbit-labels"
SCHEMA_VERSION = 2
DEFAULT_URL = "sqlite:///labels.db"
CHOICES = ("a", "b", "tie", "cant_tell")
RETRY_WITHIN_S = 5.0  # transact() runs again only a transaction that failed this soon (not one that waited out a lock)
T = TypeVar("T")

metadata = MetaData()

schema_version = Table(
    "schema_version", metadata,
    Column("app", String(64), primary_key=True),
    Column("version", Integer, nullable=False),
    Column("updated_at", Float, nullable=False),
)


def _table(name: str, *columns) -> Table:
    """A table whose rows have an integer id that is never reused (SQLite's AUTOINCREMENT; PostgreSQL's sequence)."""
    return Table(name, metadata, Column("id", Integer, primary_key=True), *columns, sqlite_autoincrement=True)


def _user_id() -> Column:
    """The row's user; the row goes when the user does."""
    return Column("user_id", Integer, ForeignKey("users.id", ondelete="CASCADE"), nullable=False)


def _pair_and_user() -> tuple[Column, Column]:
    """A row about one user and one pair (an assignment, a label); it goes when either does."""
    return Column("pair_id", Integer, ForeignKey("pairs.id", ondelete="CASCADE"), nullable=False), _user_id()


users = _table(
    "users",
    Column("name", String(200), nullable=False, unique=True),
    Column("token_hash", String(64), nullable=False, unique=True),  # sha256 hex of the login token
    Column("is_admin", Boolean, nullable=False, default=False),
    Column("created_at", Float, nullable=False),
)

sessions = _table(
    "sessions",
    Column("id_hash", String(64), nullable=False, unique=True),  # sha256 hex of the session id (the cookie)
    _user_id(),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
)

pairs = _table(
    "pairs",
    Column("key", String(64), nullable=False, unique=True),  # sha256 of the canonical JSON of [prompt, a, b]
    Column("prompt_json", Text, nullable=False),  # a string or a messages list, as JSON
    Column("a", Text, nullable=False),
    Column("b", Text, nullable=False),
    Column("source", String(500), nullable=False, default=""),
    Column("meta_json", Text, nullable=False, default="{}"),
    Column("priority", Float, nullable=False, default=0.0, server_default=text("0")),  # since version 2
    Column("created_at", Float, nullable=False),
    Index("ix_pairs_priority", "priority"),
)

assignments = _table(
    "assignments",
    *_pair_and_user(),
    Column("left_is_a", Boolean, nullable=False),
    Column("shown_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
    UniqueConstraint("user_id", "pair_id", name="uq_assignments_user_pair"),
    Index("ix_assignments_pair", "pair_id", "expires_at"),
)

labels = _table(
    "labels",
    *_pair_and_user(),
    Column("choice", String(16), nullable=False),  # in terms of the pair's a/b, never left/right
    Column("left_is_a", Boolean, nullable=False),  # how the pair was shown (position-bias studies)
    Column("comment", Text, nullable=False, default=""),
    Column("idempotency_key", String(200), nullable=False),
    Column("created_at", Float, nullable=False),
    CheckConstraint("choice IN ('a', 'b', 'tie', 'cant_tell')", name="ck_labels_choice"),
    UniqueConstraint("user_id", "pair_id", name="uq_labels_user_pair"),
    UniqueConstraint("user_id", "idempotency_key", name="uq_labels_user_key"),
    Index("ix_labels_pair", "pair_id"),
    Index("ix_labels_user_time", "user_id", "created_at"),
)

TABLES = [t.name for t in metadata.sorted_tables]


# ---- migrations: MIGRATIONS[v] turns a version-v database into version v+1 -------------------------------------
def _add_priority(conn: Connection) -> None:
    conn.execute(text("ALTER TABLE pairs ADD COLUMN priority FLOAT NOT NULL DEFAULT 0"))
    conn.execute(text("CREATE INDEX ix_pairs_priority ON pairs (priority)"))


MIGRATIONS: dict[int, Callable[[Connection], None]] = {1: _add_priority}


# ---- engines -----------------------------------------------------------------------------------------------------
def _sqlite_engine(url) -> Engine:
    db = url.database or ""
    if db in ("", ":memory:") or db.startswith("file:"):
        raise NextbitError(f"--db: {url}: give SQLite a file (sqlite:///labels.db); an in-memory database is lost at exit")
    engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        dbapi_conn.isolation_level = None  # the driver sends no BEGIN of its own; _on_begin does
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA busy_timeout = 30000")
        cur.execute("PRAGMA journal_mode = WAL")
        cur.execute("PRAGMA synchronous = FULL")
        cur.execute("PRAGMA foreign_keys = ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def _locked(e: DBAPIError) -> bool:
    """A transaction that lost a race and may simply be run again."""
    orig = getattr(e, "orig", None)
    if getattr(orig, "sqlstate", None) in ("40001", "40P01"):  # PostgreSQL: serialization failure, deadlock
        return True
    msg = str(orig or e).lower()
    return "database is locked" in msg or "database table is locked" in msg or "database is busy" in msg


class Database:
    """An open labels database. `session()` yields a Connection inside one transaction (committed at the end of the
    block, rolled back on an exception); `transact(fn)` does the same and retries a transaction that lost a race."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.url = engine.url.render_as_string(hide_password=True)
        self.dialect = engine.dialect.name  # "sqlite" | "postgresql"

    @contextmanager
    def session(self) -> Iterator[Connection]:
        with self.engine.begin() as conn:
            yield conn

    def transact(self, fn: Callable[[Connection], T], *, attempts: int = 8) -> T:
        for attempt in range(attempts):
            t0 = time.monotonic()
            try:
                with self.engine.begin() as conn:
                    return fn(conn)
            except DBAPIError as e:
                # a race lost at once is run again; a lock still held after the whole busy timeout is reported
                if not _locked(e) or attempt == attempts - 1 or time.monotonic() - t0 > RETRY_WITHIN_S:
                    raise
                time.sleep(random.uniform(0.01, 0.05) * 2 ** attempt)
        raise AssertionError("unreachable")

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> "Database":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class MissingDatabase(NextbitError):
    """open_db(..., create=False) found no labels database: no SQLite file, or a PostgreSQL database without tables.
    `where` is the URL (password hidden); `also` adds another way to make one to the message."""

    def __init__(self, where: str, also: str = ""):
        super().__init__(f"--db: no labels database at {where} (make one with `nextbit label import`, `label sample` or "
                         f"`label add-user`{also})")
        self.where = where


def _engine(url: str, create: bool) -> Engine:
    try:
        u = make_url(url)
    except ArgumentError:
        raise NextbitError(f"--db: {url!r} is not a database URL; expected sqlite:///FILE or postgresql+psycopg://USER@HOST/DB")
    if u.drivername in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+psycopg")
    backend = u.get_backend_name()
    if backend == "sqlite":
        if u.database and not create and not Path(u.database).is_file():
            raise MissingDatabase(u.render_as_string(hide_password=True))
        if u.database and u.database != ":memory:" and not Path(u.database).parent.is_dir():
            raise NextbitError(f"--db: the folder of {u.database} does not exist")
        return _sqlite_engine(u)
    if backend != "postgresql":
        raise NextbitError(f"--db: {u.render_as_string(hide_password=True)}: only sqlite:/// and postgresql+psycopg:// URLs are supported")
    try:
        return create_engine(u, pool_pre_ping=True, pool_size=10, max_overflow=30)
    except (NoSuchModuleError, ImportError) as e:
        raise NextbitError(f"--db: cannot load the PostgreSQL driver ({e}); pip install 'psycopg[binary]'")


def _check_schema(conn: Connection, where: str, create: bool) -> None:
    """Create, upgrade or refuse (see the module docstring); runs inside the opening transaction."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(7263518847110)"))  # one first-open at a time
    names = set(inspect(conn).get_table_names())
    if not names:
        if not create:
            raise MissingDatabase(where)
        metadata.create_all(conn)
        conn.execute(schema_version.insert().values(app=APP, version=SCHEMA_VERSION, updated_at=time.time()))
        return
    foreign = f"--db: {where} is not a nextbit labels database (it holds other tables); give --db a new file or database"
    if "schema_version" not in names:
        raise NextbitError(foreign)
    try:
        row = conn.execute(select(schema_version.c.version).where(schema_version.c.app == APP)).first()
    except DBAPIError:
        raise NextbitError(foreign)
    if row is None:
        raise NextbitError(foreign)
    version = int(row.version)
    if version > SCHEMA_VERSION:
        raise NextbitError(f"--db: {where} was written by a newer nextbit (labels schema version {version}; this nextbit "
                           f"reads up to {SCHEMA_VERSION}): upgrade nextbit")
    if version < 1 or any(v not in MIGRATIONS for v in range(version, SCHEMA_VERSION)):
        raise NextbitError(f"--db: {where} has labels schema version {version}, which this nextbit cannot upgrade")
    for v in range(version, SCHEMA_VERSION):
        MIGRATIONS[v](conn)
    if version < SCHEMA_VERSION:
        conn.execute(schema_version.update().where(schema_version.c.app == APP).values(version=SCHEMA_VERSION,
                                                                                      updated_at=time.time()))


def open_db(url: str = DEFAULT_URL, *, create: bool = True) -> Database:
    """Open (and on first use create) the labels database at `url`; see the module docstring for what is refused."""
    engine = _engine(url, create)
    where = engine.url.render_as_string(hide_password=True)
    try:
        with engine.begin() as conn:
            _check_schema(conn, where, create)
    except NextbitError:
        engine.dispose()
        raise
    except DBAPIError as e:
        engine.dispose()
        msg = str(getattr(e, "orig", e)).strip().splitlines()
        msg = msg[0] if msg else type(e).__name__
        if "file is not a database" in msg or "not a database" in msg:
            raise NextbitError(f"--db: {where} is not a nextbit labels database (the file is not SQLite); "
                               "give --db a new file or a labels database")
        kind = "cannot open" if isinstance(e, OperationalError) else "error opening"
        raise NextbitError(f"--db: {kind} {where}: {msg}")
    return Database(engine)


def schema_of(db: Database) -> Optional[int]:
    """The schema version stored in an open database."""
    with db.session() as conn:
        row = conn.execute(select(schema_version.c.version).where(schema_version.c.app == APP)).first()
    return None if row is None else int(row.version)
