"""The key-file reader: a secret given on the command line (`--api-key KEY`) or, kept out of the process list, in a
file (`--api-key-file FILE`, its text stripped). One line when both are given, or the file is missing or empty.
A key must be printable ASCII without spaces (an HTTP header carries it). `nextbit serve` reads its
--api-key this way; `eval humaneval`, `eval lm` and `loop` read the key they send."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from nextbit.core.errors import NextbitError


def read_key(key: Optional[str], key_file: Optional[str], flag: str = "--api-key") -> Optional[str]:
    """`key`, or the text of `key_file`, or None; `flag` names the options in errors (FLAG and FLAG-file)."""
    if key and key_file:
        raise NextbitError(f"give {flag} or {flag}-file, not both")
    if key_file:
        p = Path(key_file)
        if not p.is_file():
            raise NextbitError(f"{flag}-file not found: {p}")
        text = p.read_text(encoding="utf-8").strip()
        if not text:
            raise NextbitError(f"{flag}-file {p} is empty")
        key, flag = text, f"{flag}-file {p}"
    if key and not (key.isascii() and key.isprintable() and " " not in key):
        # an HTTP header carries it: anything else could never be sent, or never match
        raise NextbitError(f"{flag}: a key must be printable ASCII without spaces")
    return key or None
