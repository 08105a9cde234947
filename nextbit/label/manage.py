"""The labeling stage's housekeeping commands: users, pairs in, preferences out (`nextbit label serve` is server.py).

    nextbit label add-user NAME [--admin] --db URL       prints the new login token alone on stdout (shown once)
    nextbit label users --db URL [--json]                every user: name, role (admin or labeler), labels given
    nextbit label reset-token NAME --db URL              prints a new login token for NAME alone on stdout; the old
                                                         token and every session of NAME stop working
    nextbit label import FILE --db URL                   {"prompt", "a", "b"} JSONL (compare's .pairs.jsonl); other
                                                         fields are kept as the pair's meta; duplicates are skipped
    nextbit label sample --policy CKPT --prompts F --db URL   two responses per pair from a policy, through the same
                                                         sampling as `nextbit compare` (prefs/compare.sample_pairs ->
                                                         prefs/pairs -> the one engine), then imported
    nextbit label export --db URL --out prefs.jsonl [--aggregate none|majority]   TRL preference JSONL (export.py)
Every command opens the database with db.open_db, so a bad URL, a newer or foreign database is one line and exit 1.
Only add-user, import and sample make a database that is not there; the others refuse it (db.MissingDatabase).
A command that fails leaves no database behind that it created itself (a new SQLite file is removed again).
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Literal, Optional

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from nextbit.core.options import check as check_options, opt
from nextbit.core.errors import NextbitError
from nextbit.label.db import DEFAULT_URL, Database, open_db
from nextbit.label.export import Aggregate, export_preferences
from nextbit.label.store import add_user, check_name, check_pair, import_pairs, reset_token, user_summaries
from nextbit.prefs.compare import sample_pairs
from nextbit.prefs.pairs import PairSampling
from nextbit.prefs.formats import parse_prompt, read_jsonl


def sqlite_file(url: str) -> Optional[Path]:
    """The file of a sqlite:/// URL; None for any other URL (and for one open_db will refuse anyway)."""
    try:
        u = make_url(url)
    except ArgumentError:
        return None
    return Path(u.database) if u.get_backend_name() == "sqlite" and u.database else None


@contextmanager
def opened(url: str) -> Iterator[Database]:
    """open_db(url) for one command; when the command fails, a SQLite file that this open created is removed again
    (with its -wal and -shm files), so a failed first command leaves nothing behind."""
    path = sqlite_file(url)
    made = path is not None and not path.exists()
    db = open_db(url)
    try:
        yield db
    except BaseException:
        db.close()
        if made:
            for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
                p.unlink(missing_ok=True)
        raise
    finally:
        db.close()


@dataclass
class AddUserConfig:
    name: str = opt("", "the user's name, as the admin page shows it")
    admin: bool = opt(False, "the user may open the admin page (agreement statistics)")
    db: str = opt(DEFAULT_URL, "labels database: sqlite:///FILE or postgresql+psycopg://USER:PW@HOST/DB")


def new_token(command: str, name: str, url: str, make: Callable[[Database, str], str], done: str, *,
              create: bool) -> str:
    """The one way a command hands out a login token: the name is checked before the database is opened (and, with
    create, made), make(db, name) stores the token's hash and returns the token, which goes alone to stdout (shown
    once, so a script can read it); "label COMMAND: 'NAME' DONE" goes to stderr, DONE's {url} the database's."""
    check_name(name)
    with (opened(url) if create else open_db(url, create=False)) as db:
        token = make(db, name)
    print(token, flush=True)
    print(f"label {command}: {name.strip()!r}{done.format(url=db.url)}", file=sys.stderr)
    return token


def label_add_user(cfg: AddUserConfig) -> str:
    return new_token("add-user", cfg.name, cfg.db, lambda db, name: add_user(db, name, admin=cfg.admin),
                     f"{' (admin)' if cfg.admin else ''} added to {{url}}; the token above is its login and is not "
                     "stored, keep it", create=True)


@dataclass
class LabelUsersConfig:
    db: str = opt(DEFAULT_URL, "labels database: sqlite:///FILE or postgresql+psycopg://USER:PW@HOST/DB")
    json: bool = opt(False, "print a JSON list of {\"name\", \"role\", \"labels\"} instead of a table")


def label_users(cfg: LabelUsersConfig) -> list[dict]:
    with open_db(cfg.db, create=False) as db:
        rows = [{"name": u.name, "role": "admin" if u.is_admin else "labeler", "labels": u.labels}
                for u in user_summaries(db)]
    if cfg.json:
        print(json.dumps(rows, ensure_ascii=False), flush=True)
        return rows
    if not rows:
        print(f"no users in {db.url} yet (add one with `nextbit label add-user NAME`)", flush=True)
        return rows
    w = max(4, *(len(r["name"]) for r in rows))
    lines = [f"{'NAME':<{w}}  {'ROLE':<7}  {'LABELS':>6}"]
    lines += [f"{r['name']:<{w}}  {r['role']:<7}  {r['labels']:>6}" for r in rows]
    print("\n".join(lines), flush=True)
    return rows


@dataclass
class ResetTokenConfig:
    name: str = opt("", "the user whose token is replaced (`nextbit label users` lists them)")
    db: str = opt(DEFAULT_URL, "labels database: sqlite:///FILE or postgresql+psycopg://USER:PW@HOST/DB")


def label_reset_token(cfg: ResetTokenConfig) -> str:
    return new_token("reset-token", cfg.name, cfg.db, reset_token, " in {url} has a new token (above, not stored: keep "
                     "it); the old token and its sessions no longer work", create=False)


@dataclass
class LabelImportConfig:
    file: str = opt("", "JSONL of pairs {\"prompt\", \"a\", \"b\"} (e.g. what `nextbit compare` writes as <out>.pairs.jsonl)")
    db: str = opt(DEFAULT_URL, "labels database: sqlite:///FILE or postgresql+psycopg://USER:PW@HOST/DB")
    source: str = opt("", "recorded with each pair (default: the file's name)")


def read_pairs(path: str) -> list[dict]:
    """The pairs of a JSONL file, checked line by line (an error names path:line)."""
    out = []
    for n, obj in read_jsonl(path):
        where = f"{path}:{n}"
        parse_prompt(obj, where)
        check_pair(obj, where)
        out.append(obj)
    if not out:
        raise NextbitError(f"{path} holds no pairs")
    return out


def label_import(cfg: LabelImportConfig) -> tuple[int, int]:
    if not cfg.file:
        raise NextbitError("FILE: give the pairs file to import")
    records = read_pairs(cfg.file)
    differ = [r for r in records if r["a"] != r["b"]]  # two same responses state no preference (`label sample` and
    if records and not differ:  # `nextbit reward` leave them out too); `nextbit compare` at temperature 0 writes them
        raise NextbitError(f"{cfg.file}: every pair's 'a' and 'b' are the same response; there is nothing to compare")
    with opened(cfg.db) as db:
        added, skipped = import_pairs(db, differ, source=cfg.source or Path(cfg.file).name)
    same = f", {len(records) - len(differ)} left out as their two responses are the same" if len(differ) < len(records) else ""
    print(f"label import: {added} pairs added, {skipped} skipped as duplicates{same} -> {db.url}", flush=True)
    return added, skipped


@dataclass
class LabelSampleConfig:
    policy: str = opt("runs/train", "checkpoint that samples the responses")
    prompts: str = opt("prompts.jsonl", "JSONL {\"prompt\": ...} or a text file with one prompt a line")
    db: str = opt(DEFAULT_URL, "labels database: sqlite:///FILE or postgresql+psycopg://USER:PW@HOST/DB")
    sampling: PairSampling = opt(factory=PairSampling, help="how the pairs are sampled (as `nextbit compare` does; the "
                                                          "same seed and prompts give the same pairs, which are skipped)")
    device: Literal["auto", "cpu", "cuda"] = opt("auto", "where the policy samples")
    quiet: bool = opt(False, "no progress output")


def label_sample(cfg: LabelSampleConfig) -> dict:
    with opened(cfg.db) as db:  # first, so a bad --db fails before the model is loaded
        queries = sample_pairs(cfg.policy, cfg.prompts, cfg.sampling, cfg.device, cfg.quiet, command="label sample")
        records = [{"prompt": q.prompt, "a": q.a, "b": q.b, "policy": cfg.policy, "seed": cfg.sampling.seed,
                    "temperature": cfg.sampling.temperature} for q in queries if q.a != q.b]
        identical = len(queries) - len(records)
        added, skipped = import_pairs(db, records, source=f"sample:{cfg.policy}") if records else (0, 0)
    stats = {"sampled": len(queries), "identical": identical, "added": added, "skipped": skipped}
    if not cfg.quiet:
        print(f"label sample: {len(queries)} pairs sampled from {cfg.policy}, {added} added, {skipped} already there, "
              f"{identical} left out (both responses the same) -> {db.url}", flush=True)
    return stats


@dataclass
class LabelExportConfig:
    db: str = opt(DEFAULT_URL, "labels database: sqlite:///FILE or postgresql+psycopg://USER:PW@HOST/DB")
    out: str = opt("prefs.jsonl", "preference JSONL to write (what `nextbit reward --data` reads)")
    aggregate: Aggregate = opt("none", "none: one line per answer; majority: one line per pair, a or b only with strictly "
                                 "more votes than the other and than tie, else a tie")
    force: bool = opt(False, "overwrite an existing output file")


def label_export(cfg: LabelExportConfig) -> dict:
    check_options(cfg)
    if Path(cfg.out).exists() and not cfg.force:
        raise NextbitError(f"--out: {cfg.out} already exists; pass --force to replace it")
    with open_db(cfg.db, create=False) as db:
        stats = export_preferences(db, cfg.out, aggregate=cfg.aggregate)
    print(f"label export: {stats['lines']} preference lines ({stats['ties']} ties) from {stats['labelers']} "
          f"labeler(s) on {stats['pairs']} pairs -> {cfg.out}", flush=True)
    return stats
