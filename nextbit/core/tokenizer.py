"""Byte-level BPE tokenizer (HF `tokenizers`) with reserved special tokens and a content hash.

Every dataset and checkpoint carries its `tokenizer.json`; the hash of that file's content is how nextbit
tells whether a tokenizer matches the data or the model it is used with.

Documents start after <|endoftext|>: `encode_document` is the one place that says so. Pretraining shards are
encoded with it (data/prepare.py), so a plain-text prompt is encoded with it too (`nextbit sample`, the server,
HumanEval, preference and SFT data): the model is conditioned as it was trained, at the start of a document.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from nextbit.core.atomic import write_text
from nextbit.core.errors import NextbitError

# Reserved first, so their ids are stable (0..5) whatever the vocabulary size.
EOT = "<|endoftext|>"
PAD = "<|pad|>"
SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
END = "<|end|>"  # end of a chat turn
SPECIAL_TOKENS = [EOT, PAD, SYSTEM, USER, ASSISTANT, END]
ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}

MIN_VOCAB = 256 + len(SPECIAL_TOKENS)
FILENAME = "tokenizer.json"


class Tokenizer:
    """A thin wrapper: encode/decode text exactly, expose special-token ids and the content hash."""

    def __init__(self, hf: HFTokenizer):
        self.hf = hf
        # Text is always text: a document that contains "<|endoftext|>" must not inject a control token.
        self.hf.encode_special_tokens = True
        self.special = {tok: self._require_id(tok) for tok in SPECIAL_TOKENS}
        self.eot_id = self.special[EOT]
        self.pad_id = self.special[PAD]
        self.end_id = self.special[END]
        self._json = hf.to_str()
        self.hash = hashlib.sha256(self._json.encode("utf-8")).hexdigest()[:16]

    def _require_id(self, tok: str) -> int:
        i = self.hf.token_to_id(tok)
        if i is None:
            raise NextbitError(f"tokenizer lacks the reserved special token {tok!r}; it was not made by nextbit")
        return i

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts at once; HF tokenizers spreads the work over all cores."""
        return [e.ids for e in self.hf.encode_batch(list(texts), add_special_tokens=False)]

    def encode_document(self, text: str) -> list[int]:
        """A document as the model reads it in training and is prompted with: <|endoftext|>, then the text."""
        return [self.eot_id] + self.encode(text)

    def encode_documents(self, texts: Sequence[str]) -> list[list[int]]:
        """encode_document for many texts at once (over all cores, as encode_batch)."""
        return [[self.eot_id] + ids for ids in self.encode_batch(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def role_id(self, role: str) -> int:
        if role not in ROLE_TOKENS:
            raise NextbitError(f"unknown chat role {role!r}; expected one of {sorted(ROLE_TOKENS)}")
        return self.special[ROLE_TOKENS[role]]

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / FILENAME
        write_text(path, self._json)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        if path.is_dir():
            path = path / FILENAME
        if not path.is_file():
            raise NextbitError(f"no tokenizer at {path}")
        try:
            hf = HFTokenizer.from_str(path.read_text(encoding="utf-8"))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise NextbitError(f"tokenizer file {path} is unreadable or corrupted ({str(e).splitlines()[0][:120]})")
        return cls(hf)

    def check_hash(self, expected: str, what: str, this: str = "this tokenizer") -> None:
        """Refuse unless this tokenizer is the one `what` (a dataset, a checkpoint) was made with, hash `expected`."""
        if expected != self.hash:
            raise NextbitError(f"tokenizer mismatch: {what} was made with tokenizer {expected}, but {this} is {self.hash}")


def train_tokenizer(texts: Iterator[str] | Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE on an iterator of documents. Every byte is in the base alphabet, so any text round-trips."""
    if vocab_size < MIN_VOCAB:
        raise NextbitError(f"--vocab-size must be at least {MIN_VOCAB} (256 bytes + {len(SPECIAL_TOKENS)} special tokens), got {vocab_size}")
    if vocab_size > 2**32 - 1:
        raise NextbitError(f"--vocab-size must be below 2**32, got {vocab_size}")
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(hf)


__all__ = ["Tokenizer", "train_tokenizer", "SPECIAL_TOKENS", "EOT", "PAD", "END", "ROLE_TOKENS"]
