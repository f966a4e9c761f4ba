"""Errors a user can meet. Each carries one line that says what is wrong and what to do."""

from experts.checkpoint import CheckpointError
from experts.shard_resources import PlacementTimeout


class UserError(Exception):
    """Bad input from a user (config, CLI argument, request): one line, never a traceback."""


# Everything shown as one line, never a traceback: experts/ cannot import UserError (it must not
# import serving), so its errors for users (a broken checkpoint, a cluster without room for the
# shards) stand beside it.
USER_ERRORS = (UserError, CheckpointError, PlacementTimeout)
