"""The one exception type that the CLI turns into a single clear line and a non-zero exit."""


class UserError(Exception):
    """Bad input or an unusable environment: the message says what is wrong and how to fix it."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
