"""`nextbit label add-user | import | sample | export` through the real command line (nextbit.cli.main, in process):
what they print, what they store, and the one-line errors with a non-zero exit."""

from __future__ import annotations

import json

import pytest

from nextbit.align.reward import read_preferences
from nextbit.prefs.formats import read_jsonl
from nextbit import cli as nextbit_cli
from nextbit.cli import main
from nextbit.core.checkpoint import save_checkpoint
from nextbit.core.errors import NextbitError
from nextbit.label import store
from nextbit.label.db import open_db

from conftest import peaky_model
from pg import fresh_schema, shared_postgres


@pytest.fixture(autouse=True)
def parser_once(monkeypatch):
    """main() builds the whole parser (every command's config, read from source) per call: build it once here."""
    from nextbit.commands import COMMANDS

    if not hasattr(parser_once, "parser"):
        parser_once.parser = nextbit_cli.build_parser(COMMANDS)
    monkeypatch.setattr(nextbit_cli, "build_parser", lambda cmds: parser_once.parser)


def cli(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code: int, err: str, *needles: str) -> None:
    lines = [l for l in err.splitlines() if l.strip()]
    assert code == 1 and len(lines) == 1 and lines[0].startswith("nextbit: error: "), err
    for n in needles:
        assert n in lines[0], lines[0]


def test_add_user_import_export_round_trip(tmp_path, capsys):
    url = f"sqlite:///{tmp_path}/labels.db"
    code, out, err = cli(capsys, "label", "add-user", "ann", "--admin", "--db", url)
    assert code == 0 and len(out.splitlines()) == 1
    assert err == f"label add-user: 'ann' (admin) added to {url}; the token above is its login and is not stored, keep it\n"
    token = out.strip()
    with open_db(url) as db:
        u = store.user_for_token(db, token)
        assert (u.name, u.is_admin) == ("ann", True)
    one_line_error(*cli(capsys, "label", "add-user", "ann", "--db", url)[::2], "already exists")

    pairs = tmp_path / "run.pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"p{i}", "a": f"x{i}", "b": f"y{i}"}) + "\n" for i in [0, 1, 1, 2]))
    code, out, _ = cli(capsys, "label", "import", pairs, "--db", url)
    assert code == 0 and "3 pairs added, 1 skipped as duplicates" in out
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "a": "x", "b": "y"}\n{"prompt": "p", "a": "x"}\n')
    one_line_error(*cli(capsys, "label", "import", bad, "--db", url)[::2], f"{bad}:2:", "'a' and 'b'")
    bad.write_text('{"prompt": "p", "a": "x", "b": "y"}\n\n{"prompt": "p", "a": "x", "b": \n')
    one_line_error(*cli(capsys, "label", "import", bad, "--db", url)[::2], f"{bad}:3: not valid JSON")
    bad.write_text('{"prompt": "p", "a": "x", "b": "y"}\n{"prompt": "p", "a": "x\\u0000", "b": "y"}\n')
    one_line_error(*cli(capsys, "label", "import", bad, "--db", url)[::2], f"{bad}:2: 'a' holds a NUL character")
    one_line_error(*cli(capsys, "label", "import", tmp_path / "missing.jsonl", "--db", url)[::2], "file not found")

    with open_db(url) as db:  # ann answers everything: left, right, tie
        for k, side in enumerate(["left", "right", "tie"]):
            s = store.next_pair(db, u.id, overlap=1, timeout_s=60)
            store.answer(db, u.id, s.pair_id, side, idempotency_key=str(k))
    out_file = tmp_path / "prefs.jsonl"
    code, out, _ = cli(capsys, "label", "export", "--db", url, "--out", out_file)
    assert code == 0 and "3 preference lines (1 ties)" in out
    prefs, _ = read_preferences(str(out_file))
    assert [p.labeler for p in prefs] == ["ann"] * 3 and [p.tie for p in prefs] == [False, False, True]
    one_line_error(*cli(capsys, "label", "export", "--db", url, "--out", out_file)[::2], "already exists", "--force")
    code, _, _ = cli(capsys, "label", "export", "--db", url, "--out", out_file, "--aggregate", "majority", "--force")
    assert code == 0 and all(r["labeler"] == "majority:1" for _, r in read_jsonl(out_file))
    code, _, err = cli(capsys, "label", "export", "--db", url, "--out", tmp_path / "o.jsonl", "--aggregate", "mean")
    assert code == 2 and err.strip() == ("nextbit: error: argument --aggregate: invalid choice: 'mean' (choose from "
                                         "'none', 'majority') (`nextbit label export --help` lists the options)")
    assert not (tmp_path / "o.jsonl").exists()


def test_bad_databases_are_one_line_errors(tmp_path, capsys):
    one_line_error(*cli(capsys, "label", "add-user", "bob", "--db", "not a url")[::2], "--db:", "not a database URL")
    one_line_error(*cli(capsys, "label", "add-user", "bob", "--db", "mysql://u@h/db")[::2], "--db:", "only sqlite")
    one_line_error(*cli(capsys, "label", "export", "--db", f"sqlite:///{tmp_path}/none.db", "--out", tmp_path / "p.jsonl")[::2],
                   "--db: no labels database at")
    (tmp_path / "cfg.json").write_text('{"not": "sqlite"}\n' * 100)
    one_line_error(*cli(capsys, "label", "add-user", "bob", "--db", f"sqlite:///{tmp_path}/cfg.json")[::2],
                   "is not a nextbit labels database")
    url = f"sqlite:///{tmp_path}/empty.db"
    cli(capsys, "label", "add-user", "bob", "--db", url)
    one_line_error(*cli(capsys, "label", "export", "--db", url, "--out", tmp_path / "p.jsonl")[::2], "no labels to export yet")


@pytest.fixture(scope="module")
def policy(tokenizer, tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("label-policy") / "checkpoint", peaky_model(seq_len=64), tokenizer)


def test_sample_uses_the_compare_engine(policy, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def f(x):\n    return\nimport os\nclass A:\n")
    url = f"sqlite:///{tmp_path}/labels.db"
    flags = ["--policy", policy, "--prompts", prompts, "--max-new-tokens", "6", "--pairs-per-prompt", "2", "--seed", "3",
             "--device", "cpu", "--quiet"]
    code, _, err = cli(capsys, "label", "sample", "--db", url, *flags)
    assert code == 0, err
    # the same settings through `nextbit compare --labeler none`, which writes its sampled pairs beside its output
    code, _, err = cli(capsys, "compare", "--labeler", "none", "--out", tmp_path / "c.jsonl", *flags)
    assert code == 0, err
    want = [(r["prompt"], r["a"], r["b"]) for _, r in read_jsonl(tmp_path / "c.pairs.jsonl") if r["a"] != r["b"]]
    with open_db(url) as db:
        got = store.pairs(db)
    assert len(want) >= 5 and [(p.prompt, p.a, p.b) for p in got] == want
    assert got[0].source == f"sample:{policy}" and got[0].meta["seed"] == 3
    code, _, _ = cli(capsys, "label", "sample", "--db", url, *flags)  # the same seed again: nothing new
    with open_db(url) as db:
        assert code == 0 and len(store.pairs(db)) == len(want)
    one_line_error(*cli(capsys, "label", "sample", "--db", url, *flags[:2], "--prompts", tmp_path / "nope.txt")[::2],
                   "file not found")


def test_a_failed_first_command_leaves_no_database_behind(policy, tmp_path, capsys):
    new = tmp_path / "new.db"
    one_line_error(*cli(capsys, "label", "add-user", "  ", "--db", f"sqlite:///{new}")[::2], "NAME: a user needs a non-empty name")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "a": "x", "b": "y"}\n' * 2 + '{"prompt": 5, "a": "x", "b": "y"}\n')
    assert cli(capsys, "label", "import", bad, "--db", f"sqlite:///{new}")[0] == 1
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def f(x):\n")
    one_line_error(*cli(capsys, "label", "sample", "--db", f"sqlite:///{new}", "--policy", tmp_path / "no-policy",
                        "--prompts", prompts, "--device", "cpu", "--quiet")[::2], "checkpoint not found")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "prompts.txt"]
    code, out, _ = cli(capsys, "label", "add-user", "ann", "--db", f"sqlite:///{new}")  # a command that works keeps it
    assert code == 0 and new.is_file()
    one_line_error(*cli(capsys, "label", "add-user", "ann", "--db", f"sqlite:///{new}")[::2], "already exists")
    with open_db(f"sqlite:///{new}") as db:  # a failure on a database that was there leaves it as it was
        assert [u.name for u in store.list_users(db)] == ["ann"]


def test_the_commands_on_postgresql(tmp_path, capsys):
    url = fresh_schema(shared_postgres(), "cli")
    plain = url.replace("postgresql+psycopg://", "postgresql://")  # the driver is implied
    code, out, _ = cli(capsys, "label", "add-user", "ann", "--db", plain)
    assert code == 0 and len(out.split()) == 1
    token = out.strip()
    pairs = tmp_path / "p.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"p{i}", "a": f"x{i}", "b": f"y{i}"}) + "\n" for i in range(3)))
    code, out, _ = cli(capsys, "label", "import", pairs, "--db", url)
    assert code == 0 and "3 pairs added, 0 skipped" in out
    with open_db(url) as db:
        uid = store.user_for_token(db, token).id
        s = store.next_pair(db, uid, overlap=1, timeout_s=60)
        store.answer(db, uid, s.pair_id, "right", idempotency_key="k")
    code, out, _ = cli(capsys, "label", "export", "--db", url, "--out", tmp_path / "prefs.jsonl")
    assert code == 0 and len(read_preferences(str(tmp_path / "prefs.jsonl"))[0]) == 1
    secret = "postgresql+psycopg://ann:s3cret-pw@/nodb?host=/nonexistent-socket-dir"
    code, _, err = cli(capsys, "label", "add-user", "bob", "--db", secret)
    one_line_error(code, err, "--db: cannot open", "***")
    assert "s3cret-pw" not in err


def test_import_leaves_out_pairs_whose_two_responses_are_the_same(tmp_path, capsys):
    """Two same responses state no preference: `label import` leaves them out with a count (as `label sample` and
    `nextbit reward` do), refuses a file of nothing else, and the store refuses them, naming the pair."""
    url = f"sqlite:///{tmp_path}/labels.db"
    same = tmp_path / "same.jsonl"
    same.write_text('{"prompt": "p", "a": "x", "b": "y"}\n{"prompt": "q", "a": "same text", "b": "same text"}\n')
    code, out, _ = cli(capsys, "label", "import", same, "--db", url)
    assert code == 0 and "1 pairs added" in out and "1 left out as their two responses are the same" in out
    with open_db(url) as db:
        assert [(p.a, p.b) for p in store.pairs(db)] == [("x", "y")]
        with pytest.raises(NextbitError, match=r"^pair 2: 'a' and 'b' are the same response"):
            store.import_pairs(db, [{"prompt": "p", "a": "v", "b": "w"}, {"prompt": "p", "a": "z", "b": "z"}])
        assert len(store.pairs(db)) == 1
    only = tmp_path / "only.jsonl"
    only.write_text('{"prompt": "q", "a": "same text", "b": "same text"}\n')
    one_line_error(*cli(capsys, "label", "import", only, "--db", f"sqlite:///{tmp_path}/other.db")[::2],
                   "every pair's 'a' and 'b' are the same response")
    assert not (tmp_path / "other.db").exists()  # refused before anything is written


def no_server(monkeypatch) -> list:
    """uvicorn.Server.run as a no-op that records it was reached: `label serve` starts, prints and stops at once."""
    import uvicorn

    ran = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: ran.append(True))
    return ran


def test_label_serve_refuses_a_database_that_is_not_there_unless_create(tmp_path, capsys, monkeypatch):
    ran = no_server(monkeypatch)
    typo = tmp_path / "mistyped.db"
    for args in (["label", "serve", "--port", "0", "--db", f"sqlite:///{typo}"],
                 ["label", "export", "--out", tmp_path / "p.jsonl", "--db", f"sqlite:///{typo}"],
                 ["label", "users", "--db", f"sqlite:///{typo}"],
                 ["label", "reset-token", "ann", "--db", f"sqlite:///{typo}"]):
        code, out, err = cli(capsys, *args)
        one_line_error(code, err, f"--db: no labels database at sqlite:///{typo}", "`nextbit label import`", "`label sample`",
                       "`label add-user`")
        assert ("--create" in err) == (args[1] == "serve"), err
        assert not typo.exists() and not ran
    code, out, err = cli(capsys, "label", "serve", "--port", "0", "--create", "--db", f"sqlite:///{typo}")
    assert code == 0 and ran == [True] and "nextbit label serve: sqlite:///" in out, err
    with open_db(f"sqlite:///{typo}", create=False) as db:  # a labels database, empty
        assert store.list_users(db) == [] and store.pairs(db) == []
    code, _, err = cli(capsys, "label", "serve", "--port", "0", "--db", f"sqlite:///{typo}")  # now it is there
    assert code == 0 and ran == [True, True], err


def test_label_serve_on_postgresql_wants_the_nextbit_tables(tmp_path, capsys, monkeypatch):
    ran = no_server(monkeypatch)
    url = fresh_schema(shared_postgres(), "serve_missing")  # a database that holds no tables
    code, _, err = cli(capsys, "label", "serve", "--port", "0", "--db", url)
    one_line_error(code, err, "--db: no labels database at postgresql+psycopg://", "`label add-user`", "--create")
    one_line_error(*cli(capsys, "label", "export", "--db", url, "--out", tmp_path / "p.jsonl")[::2], "--db: no labels database at")
    assert not ran
    code, _, err = cli(capsys, "label", "serve", "--port", "0", "--create", "--db", url)
    assert code == 0 and ran == [True], err
    with open_db(url, create=False) as db:
        assert store.list_users(db) == []


def test_users_lists_names_roles_and_label_counts_and_reset_token_replaces_a_token(tmp_path, capsys):
    url = f"sqlite:///{tmp_path}/labels.db"
    code, out, _ = cli(capsys, "label", "add-user", "ann", "--admin", "--db", url)
    ann = out.strip()
    bob = cli(capsys, "label", "add-user", "Bob the long-named labeler", "--db", url)[1].strip()
    cli(capsys, "label", "add-user", "cy", "--db", url)
    with open_db(url) as db:
        store.import_pairs(db, [{"prompt": f"p{i}", "a": f"x{i}", "b": f"y{i}"} for i in range(3)])
        for token, n in ((ann, 1), (bob, 3)):
            uid = store.user_for_token(db, token).id
            for k in range(n):
                s = store.next_pair(db, uid, overlap=2, timeout_s=60)
                store.answer(db, uid, s.pair_id, "left", idempotency_key=f"k{k}")
    code, out, _ = cli(capsys, "label", "users", "--db", url)
    assert code == 0
    assert [line.rsplit(None, 2) for line in out.splitlines()] == [
        ["NAME", "ROLE", "LABELS"], ["ann", "admin", "1"], ["Bob the long-named labeler", "labeler", "3"], ["cy", "labeler", "0"]]
    assert len({len(line.rstrip()) for line in out.splitlines()}) == 1  # columns line up
    code, out, _ = cli(capsys, "label", "users", "--json", "--db", url)
    assert code == 0 and json.loads(out) == [{"name": "ann", "role": "admin", "labels": 1},
                                             {"name": "Bob the long-named labeler", "role": "labeler", "labels": 3},
                                             {"name": "cy", "role": "labeler", "labels": 0}]

    with open_db(url) as db:
        uid = store.user_for_token(db, bob).id
        sid, _ = store.create_session(db, uid)
    code, out, err = cli(capsys, "label", "reset-token", "Bob the long-named labeler", "--db", url)
    assert code == 0 and len(out.splitlines()) == 1
    assert err == (f"label reset-token: 'Bob the long-named labeler' in {url} has a new token (above, not stored: keep it); "
                   "the old token and its sessions no longer work\n")
    new = out.strip()
    with open_db(url) as db:
        assert store.user_for_token(db, bob) is None and store.session_user(db, sid) is None
        assert store.user_for_token(db, new).name == "Bob the long-named labeler"
        assert store.user_for_token(db, ann).name == "ann"  # the others keep theirs
        assert len(store.labels_of(db, uid)) == 3  # and Bob keeps his labels
    one_line_error(*cli(capsys, "label", "reset-token", "dan", "--db", url)[::2], "NAME: no user named 'dan'", "label users")
    one_line_error(*cli(capsys, "label", "reset-token", " ", "--db", url)[::2], "NAME: a user needs a non-empty name")
    empty = f"sqlite:///{tmp_path}/empty.db"
    open_db(empty).close()
    code, out, _ = cli(capsys, "label", "users", "--db", empty)
    assert code == 0 and "no users" in out and "label add-user" in out
    code, out, _ = cli(capsys, "label", "users", "--json", "--db", empty)
    assert code == 0 and json.loads(out) == []
