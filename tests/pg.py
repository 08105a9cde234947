"""A throwaway PostgreSQL server for tests: `with postgres_server() as url: ...`.

    url = "postgresql+psycopg://postgres@/postgres?host=/tmp/.../sock&port=54xxx"   (a SQLAlchemy URL, Unix socket)

It runs Debian's binaries: initdb into a temporary folder (owned by the `postgres` user, since initdb refuses to run
as root; via `runuser -u postgres --` when the tests run as root), then `pg_ctl start -w` with the socket in that
folder, no TCP listener (listen_addresses=''), on a free port number (the socket's name), fsync off (a test
server: durability across a power cut is not what is tested) — and `pg_ctl stop -m fast` plus the folder's removal
at the end. The binaries are looked up on PATH, then in /usr/lib/postgresql/*/bin; where they are absent, the
calling test is skipped with one line saying what to install.

Start it once per test run and share it between test modules (start-up is ~2-3 s): `shared_postgres()` starts the
server on its first call, returns the same URL on every later call, and stops it when the test process exits.

    from pg import fresh_database, shared_postgres

    @pytest.fixture(scope="session")
    def pg_url():
        return shared_postgres()      # skips the test where the binaries are absent

For a test that needs an empty database, `fresh_schema(url, name)` (a few ms: a new PostgreSQL schema, which the
returned URL puts first on the search_path) or `fresh_database(url, name)` (~0.3 s: a whole new database).
"""

from __future__ import annotations

import atexit
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import pytest

SKIP = "PostgreSQL binaries (initdb, pg_ctl) not found: apt-get install postgresql"


def find_bin_dir() -> Optional[Path]:
    """The folder holding initdb and pg_ctl (PATH first, then Debian's versioned folders, newest first)."""
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl:
        return Path(os.path.realpath(initdb)).parent
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: [int(x) for x in p.split("/")[-2].split(".") if x.isdigit()],
                    reverse=True):
        if os.access(f"{d}/initdb", os.X_OK) and os.access(f"{d}/pg_ctl", os.X_OK):
            return Path(d)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_postgres(cmd: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return cmd
    if shutil.which("runuser") is None:
        pytest.skip("the tests run as root and runuser is missing: initdb refuses to run as root")
    return ["runuser", "-u", "postgres", "--", *cmd]


@contextmanager
def postgres_server() -> Iterator[str]:
    """Start a private PostgreSQL server; yield a SQLAlchemy URL to its `postgres` database; stop and remove it."""
    bindir = find_bin_dir()
    if bindir is None:
        pytest.skip(SKIP)
    if os.geteuid() == 0:
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("the tests run as root and there is no `postgres` user: apt-get install postgresql")
    root = Path(tempfile.mkdtemp(prefix="nextbit-pg-"))
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    if os.geteuid() == 0:
        for p in (root, sock):
            os.chown(p, pw.pw_uid, pw.pw_gid)
    port = _free_port()
    env = dict(os.environ, LC_ALL="C", LANG="C")
    started = False
    try:
        r = subprocess.run(_as_postgres([str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                                         "--no-sync", "-E", "UTF8"]), capture_output=True, text=True, env=env, timeout=120)
        if r.returncode:
            raise RuntimeError(f"initdb failed: {r.stderr.strip() or r.stdout.strip()}")
        opts = f"-k {sock} -p {port} -c listen_addresses='' -c fsync=off -c max_connections=60"
        r = subprocess.run(_as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-o", opts,
                                         "-w", "-t", "60", "start"]), capture_output=True, text=True, env=env, timeout=90)
        if r.returncode:
            log = (root / "log").read_text() if (root / "log").exists() else ""
            raise RuntimeError(f"pg_ctl start failed: {r.stderr.strip()} {log[-2000:]}")
        started = True
        yield f"postgresql+psycopg://postgres@/postgres?host={sock}&port={port}"
    finally:
        if started:
            subprocess.run(_as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]),
                           capture_output=True, text=True, env=env, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


def fresh_schema(url: str, name: str) -> str:
    """Create an empty schema `name` (dropped first if it exists) and return a URL whose connections use it: tables
    are created in it and found in it, as in a database of their own."""
    import psycopg
    from sqlalchemy.engine import make_url

    u = make_url(url)
    q = u.query
    with psycopg.connect(host=q["host"], port=q["port"], user=u.username, dbname=u.database, autocommit=True) as c:
        c.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
        c.execute(f'CREATE SCHEMA "{name}"')
    return u.update_query_dict({"options": f"-csearch_path={name}"}).render_as_string(hide_password=False)


def fresh_database(url: str, name: str) -> str:
    """Create an empty database `name` on the server of `url` (dropped first if it exists); returns its URL."""
    import psycopg
    from sqlalchemy.engine import make_url

    u = make_url(url)
    q = u.query
    with psycopg.connect(host=q["host"], port=q["port"], user=u.username, dbname=u.database, autocommit=True) as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        c.execute(f'CREATE DATABASE "{name}"')
    return u.set(database=name).render_as_string(hide_password=False)


_shared: dict = {}


def shared_postgres() -> str:
    """One server for the whole test process (every module that asks gets the same URL); stopped at exit."""
    if "url" not in _shared:
        if find_bin_dir() is None:
            pytest.skip(SKIP)
        cm = postgres_server()
        _shared["url"] = cm.__enter__()
        atexit.register(cm.__exit__, None, None, None)
    return _shared["url"]
