"""The one exception type for bad user input: the CLI prints its message on one line, exit 2."""


class UserError(Exception):
    """Bad input (file, flag, checkpoint) that the user must fix; never a bug in revjepa."""
