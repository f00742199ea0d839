"""The one exception type the CLI turns into a single clear line (no traceback unless --debug)."""


class UserError(Exception):
    """Bad input from the user: the message names the problem and, where there is one, the fix."""
