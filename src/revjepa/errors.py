"""The one exception type for bad user input: the CLI prints its message on one line, exit 2."""


class UserError(Exception):
    """Bad input (file, flag, checkpoint) that the user must fix; never a bug in revjepa."""


def one_line(exc: BaseException, limit: int = 200) -> str:
    """`Type: first line of the message`, for a warning or a table cell (compiler errors run to
    dozens of lines)."""
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}"[:limit]
