"""People's labels out of the database as TRL preference JSONL, which `nextbit reward` and `nextbit dpo` read as is.

One line per answer (`aggregate="none"`, the default):
    {"prompt", "chosen", "rejected", "labeler": NAME, "tie": bool, "timestamp": epoch seconds, "pair_id": id}
    an answer "a" is chosen=a, rejected=b; "b" the other way round; a tie is chosen=a, rejected=b with tie=true (the
    reward model's Bradley-Terry loss treats it as a half win each way); "can't tell" says nothing and is left out.
    Several labelers' answers on one pair are several lines. When the prompt is a message list (a chat pair), chosen
    and rejected are one-message assistant lists, TRL's conversational form.
One line per pair (`aggregate="majority"`), from the pair's a, b and tie votes (can't-tell votes left out):
    a wins when it has strictly more votes than b AND strictly more than tie; b likewise; anything else, an even split
    between a and b, or ties at least as many as the leading side, is a tie. The line's labeler is
    "majority:<number of voters>", its timestamp the latest vote's, and "votes" holds the counts {"a", "b", "tie"}.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Literal, Union, get_args

from nextbit.core.errors import NextbitError
from nextbit.label.db import Database
from nextbit.label.store import Pair, all_labels, pairs
from nextbit.prefs.formats import write_jsonl

Aggregate = Literal["none", "majority"]  # several people's labels of one pair: a line each, or one by majority
AGGREGATES = get_args(Aggregate)


def majority(a: int, b: int, tie: int) -> str:
    """The aggregate rule: 'a', 'b' or 'tie' (see the module docstring)."""
    if a > b and a > tie:
        return "a"
    if b > a and b > tie:
        return "b"
    return "tie"


def _text(p: Pair, text: str) -> Union[str, list]:
    return text if isinstance(p.prompt, str) else [{"role": "assistant", "content": text}]


def _line(p: Pair, choice: str, labeler: str, timestamp: float) -> dict:
    chosen, rejected = (p.b, p.a) if choice == "b" else (p.a, p.b)
    return {"prompt": p.prompt, "chosen": _text(p, chosen), "rejected": _text(p, rejected), "labeler": labeler,
            "tie": choice == "tie", "timestamp": timestamp, "pair_id": p.id}


def preference_records(db: Database, *, aggregate: str = "none") -> list[dict]:
    """The preference lines of every stated answer (or of every pair, aggregated), by label id (pair id)."""
    if aggregate not in AGGREGATES:
        raise NextbitError(f"--aggregate must be one of {', '.join(AGGREGATES)}, got {aggregate!r}")
    # labels first: a pair labelled while this reads is then in the pairs read next (pairs are never deleted)
    stated = [lab for lab in all_labels(db) if lab.choice in ("a", "b", "tie")]
    by_id = {p.id: p for p in pairs(db)}
    if aggregate == "none":
        return [_line(by_id[lab.pair_id], lab.choice, lab.user_name, lab.created_at) for lab in stated]
    votes: dict = defaultdict(lambda: {"a": 0, "b": 0, "tie": 0})
    latest: dict = defaultdict(float)
    for lab in stated:
        votes[lab.pair_id][lab.choice] += 1
        latest[lab.pair_id] = max(latest[lab.pair_id], lab.created_at)
    out = []
    for pid in sorted(votes):
        v = votes[pid]
        rec = _line(by_id[pid], majority(v["a"], v["b"], v["tie"]), f"majority:{sum(v.values())}", latest[pid])
        rec["votes"] = dict(v)
        out.append(rec)
    return out


def export_preferences(db: Database, out: str | Path, *, aggregate: str = "none") -> dict:
    """Write the preference JSONL atomically (whole or not at all); refuses when there is nothing to write."""
    rows = preference_records(db, aggregate=aggregate)
    if not rows:
        raise NextbitError(f"--db: {db.url} holds no labels to export yet (can't-tell answers are left out)")
    write_jsonl(out, rows)
    return {"lines": len(rows), "ties": sum(r["tie"] for r in rows), "labelers": len({r["labeler"] for r in rows}),
            "pairs": len({r["pair_id"] for r in rows})}
