"""User-facing errors: one line that says what is wrong and what to do."""


class SdtuneError(Exception):
    """An error caused by user input; the CLI prints it as one line and exits non-zero."""

    exit_code = 2


class NotFound(SdtuneError):
    """The thing a request names (a run, a file of a run, a recipe) does not exist: HTTP 404 in the server."""
