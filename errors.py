"""User-facing errors: one exception type whose message says what was wrong and where."""


class LowbitError(Exception):
    """A problem with the user's input or environment; the CLI prints it and exits with status 2."""
