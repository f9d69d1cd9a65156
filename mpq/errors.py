"""Errors a user can cause. The command-line entry points turn them into one line on stderr and exit 2."""


class UserError(ValueError):
    """A mistake in the user's input (config value, path, budget, checkpoint), not a bug in mpq."""
