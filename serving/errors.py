"""Errors a user can meet. Each carries one line that says what is wrong and what to do."""


class UserError(Exception):
    """Bad input from a user (config, checkpoint, CLI argument): shown as one line, never a traceback."""
