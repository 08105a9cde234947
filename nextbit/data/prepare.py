"""`nextbit prepare`: sources -> (tokenizer) -> token shards + manifest, streamed to disk.

Documents are encoded in batches by HF tokenizers (parallel across cores) and appended to shard files as they
come, so memory stays flat however large the corpus. Each document is preceded by <|endoftext|>.
The output folder appears atomically when everything is written.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
from tqdm import tqdm

from nextbit.core.options import opt
from nextbit.core.atomic import atomic_dir, write_json
from nextbit.core.errors import NextbitError
from nextbit.core.shards import FORMAT, VERSION, dtype_for
from nextbit.core.tokenizer import MIN_VOCAB, Tokenizer, train_tokenizer
from nextbit.data.sources import Document, Skipped, document_stream


@dataclass
class PrepareConfig:
    sources: list[str] = opt(factory=lambda: ["stdlib"], help="where the documents come from: stdlib, reviews, imdb, rotten_tomatoes, files, folders, globs, .jsonl files")
    out: str = opt("data/stdlib", "the dataset folder: tokenizer.json, token shards, manifest.json")
    vocab_size: int = opt(4096, "for a new tokenizer; ignored with --tokenizer")
    tokenizer: Optional[str] = opt(None, "reuse: a tokenizer.json, or a dataset / checkpoint folder holding one")
    val_every: int = opt(50, "every n-th document is held out")
    text_field: str = opt("text", "field read from .jsonl files")
    shard_tokens: int = opt(2**28, "tokens per shard file")
    batch_bytes: int = opt(4 << 20, "text per encode_batch call")
    force: bool = opt(False, "replace an existing output folder")
    quiet: bool = opt(False, "no progress output")

    def validate(self) -> None:
        if not self.sources:
            raise NextbitError("no sources given")
        if self.tokenizer is None and self.vocab_size < MIN_VOCAB:
            raise NextbitError(f"--vocab-size must be at least {MIN_VOCAB}")
        if self.val_every < 0 or self.val_every == 1:
            raise NextbitError("--val-every must be 0 (no held-out split) or >= 2")
        if self.shard_tokens < 1024:
            raise NextbitError("--shard-tokens must be >= 1024")


class ShardWriter:
    def __init__(self, root: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.root, self.split, self.dtype, self.cap = root, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self.tokens = self.bytes = self.documents = 0
        self._f = None
        self._n = 0

    def _open(self) -> None:
        name = f"{self.split}_{len(self.shards):04d}.bin"
        self._f = open(self.root / name, "wb")
        self.shards.append({"file": name, "tokens": 0})
        self._n = 0

    def write(self, ids: np.ndarray, nbytes: int) -> None:
        self.documents += 1
        self.bytes += nbytes
        while len(ids):
            if self._f is None or self._n >= self.cap:
                if self._f is not None:
                    self._f.close()
                self._open()
            take = ids[: self.cap - self._n]
            self._f.write(take.astype(self.dtype, copy=False).tobytes())
            self._n += len(take)
            self.shards[-1]["tokens"] += len(take)
            self.tokens += len(take)
            ids = ids[len(take) :]

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def info(self) -> dict:
        return {"tokens": self.tokens, "bytes": self.bytes, "documents": self.documents, "shards": self.shards}


def _batches(docs: Iterator[Document], batch_bytes: int) -> Iterator[list[Document]]:
    batch, size = [], 0
    for d in docs:
        batch.append(d)
        size += len(d.text)
        if size >= batch_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def load_tokenizer_from(spec: str) -> Tokenizer:
    return Tokenizer.load(spec)


def _carve_val_from_tail(root: Path, train: ShardWriter, val: ShardWriter, val_every: int) -> None:
    """A corpus with fewer documents than val_every (one big file, say) holds out the tail of its last shard."""
    last = train.shards[-1]
    n = last["tokens"]
    k = max(1, n // val_every)
    if n - k < 2:
        return
    path = root / last["file"]
    data = np.fromfile(path, dtype=train.dtype)
    tail = data[n - k :]
    with open(path, "r+b") as f:
        f.truncate((n - k) * train.dtype.itemsize)
    moved_bytes = int(round(train.bytes * k / max(1, train.tokens)))
    last["tokens"] -= k
    train.tokens -= k
    train.bytes -= moved_bytes
    val.write(tail, moved_bytes)
    val.close()


def prepare(cfg: PrepareConfig) -> dict:
    cfg.validate()
    out = Path(cfg.out)
    if out.exists() and not cfg.force:
        raise NextbitError(f"output folder {out} already exists; pass --force to replace it")
    skipped = Skipped()
    stream = document_stream(cfg.sources, cfg.val_every, cfg.text_field, skipped)
    t0 = time.time()

    if cfg.tokenizer:
        tok = load_tokenizer_from(cfg.tokenizer)
    else:
        n_docs = 0

        def train_texts() -> Iterator[str]:
            nonlocal n_docs
            for d in stream():
                if d.split == "train" or cfg.val_every == 0:
                    n_docs += 1
                    yield d.text

        if not cfg.quiet:
            print(f"training a byte-level BPE tokenizer (vocab {cfg.vocab_size}) on {', '.join(cfg.sources)} ...", flush=True)
        tok = train_tokenizer(train_texts(), cfg.vocab_size)
        if n_docs == 0:
            raise NextbitError(_empty_message(cfg, skipped))
    dtype = dtype_for(tok.vocab_size)

    skipped.counts.clear()  # count what the encoding pass skips, not the tokenizer pass too
    skipped.examples.clear()
    with atomic_dir(out) as tmp:
        writers = {s: ShardWriter(tmp, s, dtype, cfg.shard_tokens) for s in ("train", "val")}
        bar = tqdm(desc="tokenizing", unit="MB", unit_scale=False, disable=cfg.quiet, bar_format="{desc}: {n:.1f} MB [{elapsed}, {rate_fmt}]")
        for batch in _batches(stream(), cfg.batch_bytes):
            encoded = tok.encode_documents([d.text for d in batch])
            for d, ids in zip(batch, encoded):
                nbytes = len(d.text.encode("utf-8"))
                writers[d.split].write(np.asarray(ids, dtype=np.int64), nbytes)
                bar.update(nbytes / 1e6)
        bar.close()
        for w in writers.values():
            w.close()
        if writers["train"].documents == 0 and writers["val"].documents == 0:
            raise NextbitError(_empty_message(cfg, skipped))
        carved = False
        if cfg.val_every and writers["val"].tokens == 0 and writers["train"].tokens:
            _carve_val_from_tail(tmp, writers["train"], writers["val"], cfg.val_every)
            carved = True
        tok.save(tmp)
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "tokenizer_hash": tok.hash,
            "vocab_size": tok.vocab_size,
            "dtype": dtype.name,
            "sources": cfg.sources,
            "val_every": cfg.val_every,
            "val_from_tail": carved,
            "splits": {s: w.info() for s, w in writers.items()},
            "skipped": skipped.counts,
            "config": asdict(cfg),
            "seconds": round(time.time() - t0, 2),
        }
        write_json(tmp / "manifest.json", manifest)
    if not cfg.quiet:
        tr, va = manifest["splits"]["train"], manifest["splits"]["val"]
        print(
            f"wrote {out}: train {tr['tokens']:,} tokens / {tr['documents']:,} docs, val {va['tokens']:,} tokens / "
            f"{va['documents']:,} docs, {tr['bytes'] / max(1, tr['tokens']):.2f} bytes per token, tokenizer {tok.hash}"
        )
        if skipped.counts:
            print("skipped: " + ", ".join(f"{n} {why} (e.g. {skipped.examples[why]})" for why, n in skipped.counts.items()))
    return manifest


def _empty_message(cfg: PrepareConfig, skipped: Skipped) -> str:
    extra = ""
    if skipped.counts:
        extra = " (skipped: " + ", ".join(f"{n} {why}" for why, n in skipped.counts.items()) + ")"
    return f"empty corpus: no usable text in {', '.join(cfg.sources)}{extra}"
