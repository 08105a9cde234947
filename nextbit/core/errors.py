"""The one exception type the CLI turns into a single clear line and a non-zero exit."""


class NextbitError(Exception):
    """A user-facing error: bad input, a missing path, a corrupted file, an out-of-range option."""


def check(ok: bool, message: str) -> None:
    """Raise NextbitError(message) unless `ok`: one line per rule where options are validated."""
    if not ok:
        raise NextbitError(message)
