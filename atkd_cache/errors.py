"""The one exception type that the CLI turns into a single clear line and a non-zero exit."""


class UserError(Exception):
    """Bad input or an unusable environment: the message says what is wrong and how to fix it."""
