"""The one exception type the CLI turns into a single clear line and a non-zero exit."""


class NextbitError(Exception):
    """A user-facing error: bad input, a missing path, a corrupted file, an out-of-range option."""
