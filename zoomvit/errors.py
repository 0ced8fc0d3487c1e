"""Errors in what the user gave (config, command line, data): the command line prints their message
alone and exits 2. Everything else is a bug or an outage and keeps its traceback."""


class UserError(ValueError):
    """A mistake in the user's input; the message says what and how to fix it."""
